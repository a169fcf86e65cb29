"""Deleting points: to the trash, back out of it, and purging it.

A deleted point leaves the `points` database for `trash` (index.py): every listing, the
mount and every command that names a point stop seeing it at once, while it keeps its
extents (it is a reader for purge) until it is purged. Nothing is rewritten: each
delete, undelete or purge of one point is one index transaction, so a crash leaves the
point where it was or where it went, never half-way.

A purge does not wait for the mount's readers: a point whose image is still open
(`is_open`, which the disk service answers from its registry while it holds the disk's
claim, so no new open can start) stays in the trash marked `purge_on_close` instead,
still a reader, so the image reads its bytes to the end, like an unlinked file's. Its
name is gone already (a trash entry is never opened); `purge_closed` drops it once the
last image closes. These functions work on the repository's index; in the daemon,
`serve/control.py` reaches them through `disks/service.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ..errors import RpfsError
from ..index import Index, PointRecord, PointState, TrashRecord
from ..names import parse_point_ref
from .clock import now
from .purge import release

log = logging.getLogger(__name__)

TRASH_DAYS = 14  # the default of the repository's trash period (rpfs.json's trash_days)
DAY = 86400.0

# Whether an image of the point is open. Asked inside write transactions, so it takes no
# lock that may wait for one (the registry's answer is lock-free: see Registry).
IsOpen = Callable[[PointRecord], bool]


def _closed(point: PointRecord) -> bool:
    return False  # no mount in this process: no image is open


def delete(
    index: Index, refs: list[str], purge: bool = False, trash_days: int = TRASH_DAYS,
    is_open: IsOpen = _closed,
) -> list[dict]:
    """Move points DISK@POINT to the trash (or, with `purge` or a trash period of 0 days,
    drop them at once; one whose image `is_open` goes to the trash marked to be purged
    when that closes).

    Every name is checked first, so an unknown or archiving point changes nothing; then
    each point goes in its own transaction.
    """
    purge = purge or trash_days == 0
    if not refs:
        raise RpfsError("name at least one point to delete (DISK@POINT)")
    wanted = [parse_point_ref(ref) for ref in refs]
    with index.read() as txn:
        for disk, name in wanted:
            _deletable(index, txn, disk, name)
    out = []
    when = now()
    for disk, name in dict.fromkeys(wanted):
        with index.write() as txn:
            point = _deletable(index, txn, disk, name)
            later = purge and is_open(point)
            if later:
                to_trash(index, txn, point, when, purge_on_close=True)
            elif purge:
                index.delete_point(txn, disk, name)
                released = release(index, txn, point.lineage, point.gen)
            else:
                to_trash(index, txn, point, when)
        if later:
            log.info("disk %s: point %s deleted; purged when its open image closes", disk,
                     name)
        elif purge:
            log.info("disk %s: point %s deleted and purged (%d extents dropped)", disk, name,
                     released.extents)
        else:
            log.info("disk %s: point %s moved to the trash", disk, name)
        out.append({"disk": disk, "name": name, "purged": purge, "purge_on_close": later,
                    "deleted_at": when})
    return out


def to_trash(
    index: Index, txn, point: PointRecord, when: float, purge_on_close: bool = False
) -> None:
    """Move `point` from the points to the trash, deleted at `when` (in `txn`)."""
    index.delete_point(txn, point.disk, point.name)
    index.put_trash(txn, TrashRecord(point, when, purge_on_close))


def check_not_held(point: PointRecord, doing: str) -> None:
    """Refuse `doing` to a held point, naming its hold's tag."""
    if point.hold is not None:
        raise RpfsError(f"point {point.ref} is held ({point.hold}): cannot {doing} it; "
                        f"'rpfs release {point.ref}' first")


def _deletable(index: Index, txn, disk: str, name: str):
    point = index.point_named(txn, disk, name)
    check_not_held(point, "delete")
    if point.state != PointState.COMPLETE:
        raise RpfsError(
            f"point {point.ref} is still being archived; wait until 'rpfs points {disk}' "
            "shows it complete, then delete it, or delete it with --wait"
        )
    return point


def undelete(index: Index, ref: str, trash_days: int = TRASH_DAYS) -> dict:
    """Bring DISK@POINT back from the trash, exactly as it was, under its name (the most
    recently deleted one, if that name was deleted more than once)."""
    disk, name = parse_point_ref(ref)
    with index.write() as txn:
        entries = index.list_trash(txn, disk, name)
        if not entries:
            index.disk_named(txn, disk)
            raise RpfsError(f"no point {ref} in the trash; 'rpfs trash' lists what it holds")
        if index.get_point(txn, disk, name) is not None:
            raise RpfsError(
                f"disk {disk} has a new point named {name!r} since {ref} was deleted; "
                "delete or keep that one, the deleted point cannot take its name"
            )
        entry = entries[-1]
        if entry.purge_on_close:
            raise RpfsError(f"point {ref} is being purged (it goes when its image open in "
                            "the mount closes): it cannot be undeleted")
        index.delete_trash(txn, entry.point)
        index.put_point(txn, entry.point)
    log.info("disk %s: point %s undeleted", disk, name)
    return _shown(entry, trash_days)


def listing(index: Index, trash_days: int = TRASH_DAYS) -> list[dict]:
    """What the trash holds, oldest deletion first, with when each is purged: deleted_at
    plus the trash period as it is now (a changed period applies to what is there)."""
    with index.read() as txn:
        return [_shown(entry, trash_days) for entry in index.list_trash(txn)]


def _shown(entry: TrashRecord, trash_days: int) -> dict:
    point = entry.point
    return {
        "disk": point.disk, "name": point.name, "created": point.created,
        "size": point.size, "bytes_stored": point.bytes_stored,
        "deleted_at": entry.deleted_at, "purge_after": entry.deleted_at + trash_days * DAY,
        "purge_on_close": entry.purge_on_close,  # then it goes when its open image closes
    }


def purge_trash(
    index: Index, refs: list[str] | None = None, expired_only: bool = False,
    at: float | None = None, trash_days: int = TRASH_DAYS, is_open: IsOpen = _closed,
) -> list[dict]:
    """Purge what the trash holds: the points `refs` names (every one deleted under each
    name), else all of it, or with `expired_only` those deleted `trash_days` or more
    before `at` (default: now), and with it those marked purge_on_close whose image is
    closed. One transaction per point; a point whose image `is_open` is marked to be
    purged when that closes instead (shown with `purge_on_close`)."""
    at = now() if at is None else at
    with index.read() as txn:
        entries = index.list_trash(txn)
    if refs is not None:
        named = {parse_point_ref(ref) for ref in refs}
        held = {(e.point.disk, e.point.name) for e in entries}
        for disk, name in sorted(named - held):
            raise RpfsError(f"no point {disk}@{name} in the trash; 'rpfs trash' lists it")
        entries = [e for e in entries if (e.point.disk, e.point.name) in named]
    if expired_only:  # and those marked to go at a close that came (or a crash ended)
        entries = [e for e in entries if (not is_open(e.point) if e.purge_on_close
                                          else e.deleted_at + trash_days * DAY <= at)]
    for entry in entries:  # delete refuses held points; a hold never loses data here either
        check_not_held(entry.point, "purge")
    out = []
    for entry in entries:
        done = _purge(index, entry.point, is_open)
        if done is not None:
            out.append(_shown(done, trash_days))
    return out


def purge_closed(
    index: Index, is_open: IsOpen = _closed, point: PointRecord | None = None,
    trash_days: int = TRASH_DAYS,
) -> list[dict]:
    """Purge the trash's points marked `purge_on_close` (of `point` only, if given: the
    record as its image opened it, perhaps still archiving then) whose image `is_open`
    no longer says is open: at the last close of one, and at the daemon's
    start and each turn of its trash purge for those a crash or a failed purge left."""
    with index.read() as txn:
        entries = (index.list_trash(txn) if point is None
                   else index.list_trash(txn, point.disk, point.name))
    marked = [e for e in entries if e.purge_on_close and (
        point is None or (e.point.lineage, e.point.gen) == (point.lineage, point.gen))]
    out = []
    for entry in marked:
        if not is_open(entry.point):
            done = _purge(index, entry.point, is_open)
            if done is not None:
                out.append(_shown(done, trash_days))
    return out


def _purge(index: Index, point: PointRecord, is_open: IsOpen) -> TrashRecord | None:
    """Purge `point` from the trash in one transaction, or if its image `is_open`, mark
    it to be purged when that closes: the entry as it was, marked only if it still waits
    for that close (None if it was gone)."""
    with index.write() as txn:
        entry = next((e for e in index.list_trash(txn, point.disk, point.name)
                      if e.point == point), None)
        if entry is None:
            return None  # undeleted or purged meanwhile
        if is_open(point):
            if not entry.purge_on_close:
                entry.purge_on_close = True
                index.put_trash(txn, entry)
                log.info("disk %s: point %s: purged when its open image closes",
                         point.disk, point.name)
            return entry
        index.delete_trash(txn, point)
        released = release(index, txn, point.lineage, point.gen)
    log.info("disk %s: point %s purged from the trash (%d extents dropped)", point.disk,
             point.name, released.extents)
    return replace(entry, purge_on_close=False)
