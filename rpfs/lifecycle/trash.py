"""Deleting points: to the trash, back out of it, and purging it.

A deleted point leaves the `points` database for `trash` (index.py): every listing, the
mount and every command that names a point stop seeing it at once, while it keeps its
extents (it is a reader for purge) until it is purged. Nothing is rewritten: each
delete, undelete or purge of one point is one index transaction, so a crash leaves the
point where it was or where it went, never half-way.

These functions work on the repository's index. In the daemon, `serve/control.py`
reaches them through `disks/service.py`, which first makes sure no point image being
read loses its extents.
"""

from __future__ import annotations

import logging

from ..errors import RpfsError
from ..index import Index, PointRecord, PointState, TrashRecord
from ..names import parse_point_ref
from .clock import now
from .purge import release

log = logging.getLogger(__name__)

TRASH_DAYS = 14  # the default of the repository's trash period (rpfs.json's trash_days)
DAY = 86400.0


def delete(
    index: Index, refs: list[str], purge: bool = False, trash_days: int = TRASH_DAYS
) -> list[dict]:
    """Move points DISK@POINT to the trash (or, with `purge` or a trash period of 0 days,
    drop them at once).

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
            if purge:
                index.delete_point(txn, disk, name)
                released = release(index, txn, point.lineage, point.gen)
            else:
                to_trash(index, txn, point, when)
        if purge:
            log.info("disk %s: point %s deleted and purged (%d extents dropped)", disk, name,
                     released.extents)
        else:
            log.info("disk %s: point %s moved to the trash", disk, name)
        out.append({"disk": disk, "name": name, "purged": purge, "deleted_at": when})
    return out


def to_trash(index: Index, txn, point: PointRecord, when: float) -> None:
    """Move `point` from the points to the trash, deleted at `when` (in `txn`)."""
    index.delete_point(txn, point.disk, point.name)
    index.put_trash(txn, TrashRecord(point, when))


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
            "shows it complete, then delete it"
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
    }


def purge_trash(
    index: Index, refs: list[str] | None = None, expired_only: bool = False,
    at: float | None = None, trash_days: int = TRASH_DAYS,
) -> list[dict]:
    """Purge what the trash holds: the points `refs` names (every one deleted under each
    name), else all of it, or with `expired_only` those deleted `trash_days` or more
    before `at` (default: now). One transaction per point."""
    at = now() if at is None else at
    with index.read() as txn:
        entries = index.list_trash(txn)
    if refs is not None:
        named = {parse_point_ref(ref) for ref in refs}
        held = {(e.point.disk, e.point.name) for e in entries}
        for disk, name in sorted(named - held):
            raise RpfsError(f"no point {disk}@{name} in the trash; 'rpfs trash' lists it")
        entries = [e for e in entries if (e.point.disk, e.point.name) in named]
    if expired_only:
        entries = [e for e in entries if e.deleted_at + trash_days * DAY <= at]
    for entry in entries:  # delete refuses held points; a hold never loses data here either
        check_not_held(entry.point, "purge")
    out = []
    for entry in entries:
        point = entry.point
        with index.write() as txn:
            if not any(e.point == point for e in index.list_trash(txn, point.disk, point.name)):
                continue  # undeleted or purged meanwhile
            index.delete_trash(txn, point)
            released = release(index, txn, point.lineage, point.gen)
        log.info("disk %s: point %s purged from the trash (%d extents dropped)", point.disk,
                 point.name, released.extents)
        out.append(_shown(entry, trash_days))
    return out
