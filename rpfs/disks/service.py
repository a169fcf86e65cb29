"""The disk commands: create, clone, snapshot, rollback, hydrate, delete, disks, and the
deletion of points (the trash: rpfs/lifecycle/trash.py) as the open images allow it.

A `DiskService` runs them on the open disks of a `Registry`: in the daemon, the one the
FUSE layer shares (the control socket calls these methods); without a daemon, the CLI's
own, on the repository directly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

from .. import checkpoint, upload
from ..errors import RpfsError, describe_os_error
from ..index import ZERO, DiskRecord, LineageRecord, PointRecord, PointState
from ..lifecycle import clock, expiry, marks, policy, retention, trash
from ..lifecycle.purge import release
from ..maintenance import check, gc, info, schedule, verify
from ..names import ceil_div, check_name, default_point_name, parse_point_ref
from ..pipeline import ordered_map
from ..progress import ProgressFn
from ..repo import Repository
from ..store.cache import ChunkCache
from ..upload import Uploader
from . import history
from .blockmap import ABSENT, MAX_BLOCKS, BlockMap
from .livedisk import LiveDisk, create_local_file
from .registry import Registry

log = logging.getLogger(__name__)

HYDRATE_BATCH = 256  # blocks per hydration task
SYNC_EVERY = 64  # hydration tasks between block-map syncs
NAMES_SHOWN = 5  # point names a refusal lists before "and N more"


class DiskService:
    """The disk commands, on the open disks of `registry`.

    Holds no lock of its own: a command takes a claim, the registry lock and the disks'
    locks through the registry and the disks, in the documented order (see Registry).
    """

    def __init__(
        self, repo: Repository, cache: ChunkCache | None = None, background: bool = False
    ) -> None:
        """`background`: archive new points in threads (the daemon); else before returning."""
        self.repo = repo
        self.index = repo.index
        self.registry = Registry(repo, cache or ChunkCache(repo), background)
        self.registry.on_point_closed = self._purge_on_close
        # the uploads of a repository with a store (upload.py): the daemon's passes and
        # `store sync` share it, so they never upload one pack twice at once
        self.uploader = Uploader(repo) if upload.backend(repo) is not None else None
        # Writes an export has acknowledged that the named disks have not seen yet (the
        # kernel's writeback cache of a `mount --writeback`) reach them when this returns;
        # it is called before every snapshot with no lock held, since the writes it sends
        # need the disks' locks and the threads that serve the mount.
        self.flush_cached_writes: Callable[[list[str]], None] | None = None

    def _record(self, name: str, txn=None) -> DiskRecord:
        if txn is None:
            with self.index.read() as txn:
                return self._record(name, txn)
        return self.index.disk_named(txn, name)

    # -- commands -------------------------------------------------------------------------

    def create(self, name: str, size: int) -> dict:
        """An empty writable disk of `size` bytes."""
        self._check_new_name(name)
        limit = MAX_BLOCKS * self.repo.block_size
        if not 0 < size <= limit:
            shown = size if size.bit_length() <= 128 else f"of {len(str(size))} digits"
            raise RpfsError(
                f"invalid size {shown} for disk {name}: a disk holds 1 to {limit} bytes "
                f"({limit >> 40} TiB, 2^32 blocks of {self.repo.block_size >> 10} KiB) in "
                "this repository"
            )
        return self._new_disk(name, size, source=None)

    def clone(self, source: str, name: str) -> dict:
        """A writable disk whose content is `source`, at once.

        `source` is DISK@POINT, or a writable DISK, of which a point is taken first.
        """
        self._check_new_name(name)  # before that point is taken
        if "@" not in source:
            if not self._record(check_name(source, "disk name")).writable:
                raise RpfsError(
                    f"disk {source} has only recovery points: name one, e.g. "
                    f"'rpfs clone {source}@POINT {name}' ('rpfs points {source}' lists them)"
                )
            point = self.snapshot([source])[0]
            source = f"{point['disk']}@{point['name']}"
        src_disk, src_point = parse_point_ref(source)
        with self.index.read() as txn:
            point = self.index.point_named(txn, src_disk, src_point)
        if point.state != PointState.COMPLETE:  # the clone reads through the index: archive first
            self.registry.join_archiver(src_disk)
            with self.registry.using(src_disk) as disk:
                disk.snapshots.finish()
        return self._new_disk(name, point.size, point)

    def _check_new_name(self, name: str) -> None:
        check_name(name, "disk name")
        with self.index.read() as txn:
            if self.index.get_disk(txn, name) is not None:
                raise RpfsError(f"a disk named {name!r} already exists; choose another name")

    def _new_disk(self, name: str, size: int, source: PointRecord | None) -> dict:
        """A writable disk of `size` bytes, empty or a clone of point `source`."""
        self._check_new_name(name)
        self.repo.space.check(f"a new disk {name}")  # its writes would be refused anyway
        with self.index.write() as txn:
            file_id = self.index.next_id(txn, "file")
        # The local file is durable before the record that names it commits; a crash in
        # between leaves an orphan file, never a record without its file. A commit that
        # fails (the name taken meanwhile, a full index) takes the file away again.
        record = DiskRecord(name, size, 0, clock.now(), file_id=file_id)  # lineage below
        parent = None
        if source is not None:
            record.started_from(source, clone=True)
            parent = source.lineage, source.gen
        path = self.repo.root / record.file
        try:
            create_local_file(path, size)
            with self.index.write() as txn:
                if self.index.get_disk(txn, name) is not None:
                    raise RpfsError(
                        f"a disk named {name!r} already exists; choose another name"
                    )
                # The origin was read in an earlier transaction: a `disk delete` of it may
                # have committed since (it saw no dependant yet), and the clone would read
                # zeros where its origin's blocks were.
                if parent is not None and self.index.get_lineage(txn, parent[0]) is None:
                    raise RpfsError(f"cannot clone {source.ref}: it was deleted meanwhile; "
                                    f"disk {name} was not created")
                record.lineage = self.index.new_lineage(txn, name, parent).id
                self.index.put_disk(txn, record)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, RpfsError):
                detail = describe_os_error(exc, self.repo.root)
                raise RpfsError(f"cannot create disk {name}: {detail}") from None
            raise
        log.info("disk %s: created (%d bytes, origin %s)", name, size, record.origin or "none")
        return self._describe(record)

    def disks(self) -> list[dict]:
        with self.index.read() as txn:
            records = self.index.list_disks(txn)
        return [self._describe(r) for r in records]

    def _describe(self, record: DiskRecord) -> dict:
        with self.index.read() as txn:
            found = history.origins(self.index, txn, record)
        origin = found.rolled_back_to or found.cloned_from  # the one `origin` names
        out = {
            "name": record.name,
            "size": record.size,
            "origin": record.origin,
            "origin_deleted": record.origin is not None and origin.deleted,
            **found.as_json(),
            "writable": record.writable,
            "created": record.created,
        }
        if not record.writable:
            return {**out, "hydrated_pct": None, "state": "points only", "stalled": None}
        disk, handles = self.registry.opened(record.name)
        if disk is not None:
            states = disk.map.states
        else:
            nblocks = ceil_div(record.size, self.repo.block_size)
            with self.index.read() as txn:
                states = BlockMap.stored(self.index, txn, record.file_id, nblocks)
        absent = states.count(ABSENT) if record.origin else 0
        pct = 100.0 * (1 - absent / len(states)) if len(states) else 100.0
        return {
            **out,
            "hydrated_pct": round(pct, 2),
            "state": f"open ({handles})" if handles else "idle",
            "stalled": self.registry.stalls().get(record.name),
        }

    # -- points of writable disks --------------------------------------------------------

    def snapshot(
        self, disks: list[str], name: str | None = None, description: str = "",
        expires: float | None = None,
    ) -> list[dict]:
        """One point of each disk, all at the same instant, archived in the background;
        each point's record, and whether it `rides` (completes with a pending point).
        Each point gets `description` and, if given, its own expiry (`expires`, seconds
        since the epoch, in the future: then the daemon moves it to the trash)."""
        point_name = check_name(name, "point name") if name is not None else default_point_name()
        marks.check_description(description)
        if expires is not None:
            clock.check_expiry(expires)
        names = sorted({check_name(d, "disk name") for d in disks})
        if not names:
            raise RpfsError("snapshot needs at least one disk name")
        if self.flush_cached_writes is not None:
            self.flush_cached_writes(names)
        opened: list[LiveDisk] = []
        try:
            for disk_name in names:
                opened.append(self.registry.acquire(disk_name))
            while True:
                # One archiving point per disk at a time, but a disk with nothing written
                # since its pending point needs no wait: the new point rides on that one.
                for disk in opened:
                    if disk.snapshots.must_finish:
                        self.registry.join_archiver(disk.name)
                        disk.snapshots.finish()
                with contextlib.ExitStack() as barriers:
                    for disk in opened:
                        barriers.enter_context(disk.barrier())
                    if any(d.snapshots.must_finish for d in opened):
                        continue  # a write landed before the barrier: archive, try again
                    points = self._freeze_all(opened, point_name, description, expires)
                break
            for disk, point in zip(opened, points, strict=True):
                if point.rides:
                    log.info("disk %s: point %s taken, nothing written since point %s: "
                             "complete when that one is", disk.name, point_name,
                             pending.name if (pending := disk.snapshots.archiving) else "-")
                else:
                    log.info("disk %s: point %s taken (%s, %d blocks to archive)", disk.name,
                             point_name, point.method, point.frozen_blocks)
                if not self.registry.background:
                    disk.snapshots.finish()
                elif not point.rides:  # it completes with the pending point's archiver
                    self.registry.start_archiver(disk.name)
        finally:
            for disk in opened:
                self.registry.release(disk.name)
        return [{**vars(p), "rides": p.rides} for p in points]

    def _freeze_all(self, opened: list[LiveDisk], point_name: str, description: str,
                    expires: float | None) -> list[PointRecord]:
        """Take the point of every disk in one transaction (caller holds their barriers)."""
        now = clock.now()
        frozen: list[LiveDisk] = []
        try:
            with self.index.write() as txn:
                for disk in opened:
                    if self.index.get_point(txn, disk.name, point_name):
                        raise RpfsError(
                            f"point {disk.name}@{point_name} already exists; choose "
                            "another --name"
                        )
                points = []
                for disk in opened:
                    points.append(disk.snapshots.freeze(txn, point_name, now, description,
                                                        expires))
                    frozen.append(disk)
        except BaseException:
            for disk in frozen:
                disk.snapshots.unfreeze()
            raise
        for disk, point in zip(opened, points, strict=True):
            disk.snapshots.frozen(point)
        return points

    def stalls(self) -> dict[str, str]:
        """Disks whose archive waits, and why (shown by `rpfs disks` and `rpfs points`)."""
        return self.registry.stalls()

    def rollback(self, point: str) -> dict:
        """Bring a closed disk back to one of its points; newer points stay as a branch."""
        disk_name, point_name = parse_point_ref(point)
        record = self._record(disk_name)
        if not record.writable:
            raise RpfsError(
                f"disk {disk_name} has only recovery points; restore one with "
                f"'rpfs restore {point} TARGET' or clone it"
            )
        with self.index.read() as txn:
            target = self.index.point_named(txn, disk_name, point_name)
        self.registry.check_closed(disk_name, "roll it back")  # before waiting for the archive
        self.registry.join_archiver(disk_name)
        with (
            self.registry.claim(disk_name, "roll it back"),
            self.registry.using(disk_name) as disk,
        ):
            dropped = disk.rollback(target)
        return {"disk": disk_name, "point": point_name, "blocks_to_fetch": dropped}

    def hydrate(
        self, name: str, progress: ProgressFn | None = None, workers: int | None = None
    ) -> dict:
        """Copy every block of a clone into its local file (resumable, safe while in use)."""
        with self.registry.using(check_name(name, "disk name")) as disk:
            bs = disk.bs
            ranges = [(b, min(b + HYDRATE_BATCH, disk.nblocks))
                      for b in range(0, disk.nblocks, HYDRATE_BATCH)]
            fetched = 0
            fetch = functools.partial(_hydrate_range, disk)
            for i, ((_, end), n) in enumerate(ordered_map(fetch, ranges, workers)):
                if self.registry.stopping.is_set():
                    break
                fetched += n
                if progress:
                    progress(min(end * bs, disk.size), disk.size)
                if i % SYNC_EVERY == SYNC_EVERY - 1:
                    disk.sync()
            disk.sync()
            if ABSENT not in disk.map.states:
                self._cut_origin(disk)
        log.info("disk %s: hydrated, %d blocks fetched", name, fetched)
        return {"name": name, "blocks_fetched": fetched, "bytes_fetched": fetched * bs}

    def _cut_origin(self, disk: LiveDisk) -> None:
        """A fully hydrated disk (its map synced) no longer needs its origin: its lineage
        takes its own references to what it read through it, so the origin can go."""
        with self.index.write() as txn:
            lineage = self.index.get_lineage(txn, disk.record.lineage)
            if lineage.parent is None:
                return
            self._detach(txn, lineage, disk.size)
        disk.reload_chain()
        log.info("disk %s: fully hydrated, no longer depends on %s", disk.name,
                 disk.record.origin)

    def start_background_hydration(self) -> None:
        """Hydrate every clone that still reads through its origin, one worker, in a thread."""

        def run() -> None:
            for disk in self.disks():
                if self.registry.stopping.is_set():
                    return
                if disk["writable"] and (disk["hydrated_pct"] or 0) < 100:
                    try:
                        self.hydrate(disk["name"], workers=1)
                    except RpfsError as exc:
                        log.warning("disk %s: background hydration stopped: %s",
                                    disk["name"], exc)
                    except Exception:
                        log.exception("disk %s: background hydration failed", disk["name"])

        self.registry.run_in_background("rpfs-hydrate", run)

    def delete(self, name: str, force: bool = False, with_points: bool = False) -> dict:
        """Delete a disk (and a writable one's local file) with its points.

        A disk with points is deleted only with `with_points`: they may be all that is
        left of a VM (a captured disk is nothing but its points). Disks cloned from its
        points still read unhydrated blocks through it; with `force`, those blocks are
        first copied into the dependants' own lineages (chunk references, not data), so
        they no longer need it.
        """
        self._record(check_name(name, "disk name"))  # a wrong name fails before any wait
        self.registry.check_closed(name, "delete it", points_too=True)
        self.registry.stop_archiver(name)  # its points go too; a stalled one must not block that
        try:
            with self.registry.claim(name, "delete it", points_too=True):
                points, dependants = self._drop(name, force, with_points)
        except BaseException:
            if self.registry.background:  # not deleted: its pending point must still be archived
                self.registry.resume_archiving(name)
            raise
        # After the claim: the kernel's invalidation may wait for requests of the mount,
        # and those for the worker threads that opens waiting for the claim hold.
        for open_disk in self.registry.open_disks():  # dependants now resolve through themselves
            open_disk.reload_chain()
        self.registry.on_removed(name)
        detached = sorted({d for lin in dependants for d in lin.disks})
        log.info("disk %s: deleted with %d point(s) (%d dependants detached)", name,
                 len(points), len(detached))
        return {"name": name, "detached": detached, "points": points}

    def _drop(
        self, name: str, force: bool, with_points: bool
    ) -> tuple[list[str], list[LineageRecord]]:
        """Delete's commit, then its local file; returns the points and dependants.

        Everything is read in the write transaction, so what it checks is what it deletes.
        """
        lock_fd = self.repo.lock_disk(name, "it is open in another rpfs process")
        try:
            with self.index.write() as txn:
                record = self._record(name, txn)
                points = [p.name for p in self.index.list_points(txn, name)]
                trashed = self.index.list_trash(txn, name)  # still undeletable
                if (points or trashed) and not with_points:
                    names = points + [f"{e.point.name} (in the trash)" for e in trashed]
                    raise RpfsError(
                        f"disk {name} has {len(names)} point(s): {_some(names)}; pass "
                        "--with-points to delete them too"
                    )
                mine = {lin.id for lin in self.index.list_lineages(txn) if name in lin.disks}
                dependants = self._dependants(txn, mine)
                if dependants and not force:
                    users = ", ".join(sorted({d for lin in dependants for d in lin.disks}))
                    raise RpfsError(
                        f"disk {name} is the origin of {users}, which still read blocks from "
                        f"it; pass --force to copy those blocks into them first"
                    )
                # Only those that read a lineage of this disk directly: the others read
                # through one of them, which then holds what they read (so a clone's
                # rollback branches keep their place under the points they started from).
                for lin in dependants:
                    if lin.parent in mine:
                        self._detach(txn, lin, record.size)
                for point in points:
                    self.index.delete_point(txn, name, point)
                for entry in trashed:  # deleted already: they go with their extents
                    self.index.delete_trash(txn, entry.point)
                for lineage in mine:
                    self.index.delete_lineage(txn, lineage)
                if record.writable:
                    self.index.drop_map(txn, record.file_id)
                self.index.delete_disk(txn, name)
            if record.writable:
                (self.repo.root / record.file).unlink(missing_ok=True)
        finally:
            os.close(lock_fd)
        return points, dependants

    # -- deleting points ------------------------------------------------------------------

    def delete_points(
        self, points: list[str], purge: bool = False, wait: bool = False
    ) -> list[dict]:
        """Move points DISK@POINT to the trash, or with `purge` drop them at once.

        The name is gone at once; an image of the point open in the mount reads on until
        it is closed (the trash keeps its extents: a purged one stays there, marked to be
        purged at that close). With the trash off (a trash period of 0 days) every delete
        is a purge. A point still being archived is refused, or with `wait` waited for
        (see `_wait_archived`).
        """
        purge = purge or self.trash_days == 0
        refs = [parse_point_ref(ref) for ref in points]
        if wait:
            self._wait_archived(refs)
        with self._purging({disk for disk, _ in refs} if purge else set()):
            out = trash.delete(self.index, points, purge, is_open=self.registry.point_open)
        for point in out:  # after the claims: see delete()
            self.registry.on_point_changed(point["disk"], point["name"])
        return out

    def _wait_archived(self, refs: list[tuple[str, str]]) -> None:
        """Wait until the points `refs` names that are still being archived are complete.

        A disk's archiver thread archives its points in order; joining it is the wait
        (`join_archiver`: no polling of the index). A stalled archive (a full disk) is
        an error naming why, at once or as soon as it stalls, rather than a command that
        hangs until someone frees space: archiving resumes by itself, the delete is
        then run again. Without a daemon nothing archives in this process (a point left
        archiving by a crash resumes at the next mount), so there is nothing to wait for
        and waiting would never end: that is an error saying to mount the repository.
        """
        with self.index.read() as txn:
            archiving = sorted({disk for disk, name in refs
                                if self.index.point_named(txn, disk, name).state
                                != PointState.COMPLETE})
        if archiving and not self.registry.background:
            raise RpfsError(
                f"point(s) of disk {_some(archiving)} are still being archived, which "
                "resumes only in the daemon: 'rpfs mount' the repository, then delete again"
            )
        for disk in archiving:
            self.registry.join_archiver(disk)

    def prune(self, disk: str, dry_run: bool = False, **keep: int | None) -> list[dict]:
        """Apply a retention policy (`keep`: keep_last, keep_hourly, ... keep_yearly) to
        the points of `disk`: the plan for every point, newest first, with the rule that
        decided it; unless `dry_run`, the points it removes go to the trash, in one step
        that checks every name first (a point deleted meanwhile changes nothing)."""
        keep_policy = retention.Policy(**keep)
        decisions = self._retention(disk, keep_policy, dry_run)
        log.info("disk %s: prune %s: %d of %d points %s", disk, keep,
                 sum(not d["keep"] for d in decisions), len(decisions),
                 "would go to the trash" if dry_run else "moved to the trash")
        return decisions

    def _retention(self, disk: str, keep: retention.Policy, dry_run: bool = False
                   ) -> list[dict]:
        """The retention plan of `keep` for the points of `disk`, carried out unless
        `dry_run` (see prune)."""
        with self.index.read() as txn:
            self.index.disk_named(txn, check_name(disk, "disk name"))
            points = self.index.list_points(txn, disk)
        decisions = retention.plan(
            (retention.Candidate(p.name, p.created, p.state, p.hold, p.expires)
             for p in points), keep)
        removed = [f"{disk}@{d.name}" for d in decisions if not d.keep]
        if removed and not dry_run:
            self.delete_points(removed)
        return [{"disk": disk, "name": d.name, "keep": d.keep, "rule": d.rule}
                for d in decisions]

    # -- stored policies --------------------------------------------------------------

    def set_policy(self, disk: str, every: int | None = None, **keep: int | None) -> dict:
        """Store the policy of `disk` (replacing its old one) and apply its retention to
        the points it has now (a policy change applies to existing points): the policy
        as `policies` shows it, and the retention's plan."""
        stored = policy.set_policy(self.index, disk, retention.Policy(**keep, every=every))
        plan = self.apply_policy(disk)
        log.info("disk %s: policy set: %s", disk, policy.describe(stored))
        [(_, _, next_at)] = policy.policies(self.index, disk)
        return {"policy": policy.shown(disk, stored, next_at), "plan": plan}

    def policies(self, disk: str | None = None) -> list[dict]:
        """The stored policies (of `disk` alone if given), with when each schedule takes
        its next point."""
        return [policy.shown(*entry) for entry in policy.policies(self.index, disk)]

    def clear_policy(self, disk: str) -> dict:
        """Drop the policy of `disk`: no more scheduled points, no retention; its points
        stay as they are."""
        had = policy.clear_policy(self.index, disk)
        if had:
            log.info("disk %s: policy cleared", disk)
        return {"disk": disk, "cleared": had}

    def apply_policy(self, disk: str) -> list[dict]:
        """Apply the retention of the disk's stored policy, if it has one that keeps
        something (after a capture, and in each turn of the daemon's schedule): the plan,
        or [] when there is none."""
        if not policy.has_retention(self.repo, disk):
            return []
        with self.index.read() as txn:
            stored = policy.policy_of(self.index, txn, disk)
        plan = self._retention(disk, stored)
        removed = [d["name"] for d in plan if not d["keep"]]
        if removed:
            log.info("disk %s: policy (%s) moved %d points to the trash: %s", disk,
                     policy.describe(stored), len(removed), _some(removed))
        return plan

    def run_policies(self) -> dict[str, str]:
        """One turn of the daemon's schedule: for each disk with a policy, apply its
        retention (the points completed since the last turn count now), then take a
        point if its `every` is due. A disk that fails does not stop the others: why
        each failed, by disk (the daemon logs it)."""
        failed: dict[str, str] = {}
        for disk, stored, next_at in policy.policies(self.index):
            try:
                self.apply_policy(disk)
                if next_at is not None and next_at <= clock.now():
                    [point] = self.snapshot(
                        [disk], default_point_name(clock.now()),
                        description=f"scheduled (every {clock.fmt_duration(stored.every)})")
                    log.info("disk %s: scheduled point %s taken", disk, point["name"])
            except RpfsError as exc:
                failed[disk] = str(exc)
            except OSError as exc:  # a full disk: the operator's to act on
                failed[disk] = describe_os_error(exc, self.repo.root)
        return failed

    def expire(self) -> list[dict]:
        """Move the on-demand points whose expiry has come to the trash (the daemon's
        check, every minute); the mount stops showing them at once."""
        out = expiry.expire(self.index)
        for point in out:
            self.registry.on_point_changed(point["disk"], point["name"])
        if out and self.trash_days == 0:  # the trash is off: they are purged at once
            self.purge_expired()
        return out

    def hold(self, point: str, tag: str = marks.DEFAULT_TAG) -> dict:
        """Hold DISK@POINT under `tag`: no delete, prune or purge until it is released."""
        return marks.hold(self.index, point, tag)

    def release(self, point: str) -> dict:
        """Release the hold of DISK@POINT."""
        return marks.release(self.index, point)

    def describe(self, point: str, text: str) -> dict:
        """Set (or with "" clear) the description of DISK@POINT."""
        return marks.describe(self.index, point, text)

    def undelete(self, point: str) -> dict:
        """Bring DISK@POINT back from the trash under its name."""
        out = trash.undelete(self.index, point, self.trash_days)
        self.registry.on_point_changed(out["disk"], out["name"])
        return out

    def list_trash(self) -> list[dict]:
        """What the trash holds and when each point in it is purged."""
        return trash.listing(self.index, self.trash_days)

    def purge_trash(self, points: list[str] | None = None, expired: bool = False) -> list[dict]:
        """Purge the trash (all of it, the points named, or those whose time has come);
        a point whose image is open goes when that closes (`purge_on_close`)."""
        named = None if points is None else {parse_point_ref(ref)[0] for ref in points}
        disks = {e["disk"] for e in trash.listing(self.index)} if named is None else named
        with self._purging(disks):
            return trash.purge_trash(self.index, points, expired_only=expired,
                                     trash_days=self.trash_days,
                                     is_open=self.registry.point_open)

    def purge_expired(self) -> tuple[list[dict], dict[str, str]]:
        """The daemon's own purge, at its start and each turn: the points marked
        purge_on_close whose images are all closed (a crash left them, or their close's
        purge failed), then those whose trash period is over, disk by disk, so that a
        failure on one disk holds back that disk's only: what was purged, and why each
        disk held back was (an expired point whose image is open is purged when that
        closes: listed with `purge_on_close`)."""
        self._purge_on_close()  # each logged as purged by the trash
        at = clock.now()
        due = sorted({e["disk"] for e in trash.listing(self.index, self.trash_days)
                      if e["purge_after"] <= at and not e["purge_on_close"]})
        purged: list[dict] = []
        held: dict[str, str] = {}
        for disk in due:
            try:
                with self._purging({disk}):
                    refs = [f"{e['disk']}@{e['name']}" for e in trash.listing(self.index)
                            if e["disk"] == disk]
                    purged += trash.purge_trash(
                        self.index, refs, expired_only=True, at=at,
                        trash_days=self.trash_days, is_open=self.registry.point_open)
            except RpfsError as exc:  # e.g. undeleted meanwhile
                held[disk] = str(exc)
        return purged, held

    # -- the repository as a whole ---------------------------------------------------------

    def info(self) -> dict:
        """The repository's totals (maintenance/info.py)."""
        return info.summary(self.repo)

    def check(self, progress: ProgressFn | None = None) -> dict:
        """The repository's consistency report; changes nothing (maintenance/check.py)."""
        return check.check(self.repo, progress)

    def gc(self, threshold: float = gc.THRESHOLD, dry_run: bool = False,
           progress: ProgressFn | None = None) -> dict:
        """Free unreferenced chunks and compact packs, online (maintenance/gc.py); then a
        checkpoint, so that the newest one names the packs the chunks moved to."""
        result = gc.run(self.repo, threshold, dry_run, progress, self.uploader)
        if result["packs_deleted"]:
            checkpoint.take(self.repo)
        return result

    def verify(self, points: list[str] | None = None, max_duration: float | None = None,
               progress: ProgressFn | None = None) -> dict:
        """Read stored chunks back and check them; marks the bad (maintenance/verify.py)."""
        return verify.verify(self.repo, points, max_duration, progress)

    def store_status(self) -> dict:
        """Pending, stored and cached bytes, requests, the last failure (upload.py)."""
        return upload.status(self.repo, self.uploader)

    def store_sync(self, wait: bool = True, progress: ProgressFn | None = None) -> dict:
        """Upload every sealed pending pack now, then push an index checkpoint if any
        pack was uploaded since the last one (at once: the caller may recover from it
        next); what was uploaded and what is left. In the daemon, `wait=False` starts the
        pass in the background and returns at once (a CLI process is the only uploader
        there is: it always waits)."""
        if self.uploader is None:
            return upload.status(self.repo, None)  # says there is no store
        if not wait and self.registry.background:
            self.registry.run_in_background("rpfs-upload", self.upload_pass)
            return {**upload.status(self.repo, self.uploader), "started": True, "packs": 0,
                    "bytes": 0, "seconds": 0.0, "error": None, "checkpoint": None,
                    "checkpoint_error": None}
        done = self.uploader.run(progress=progress)
        pushed, failed = self.push_checkpoint(now=True)
        return {**upload.status(self.repo, self.uploader), "started": False,
                "packs": done.packs, "bytes": done.bytes, "seconds": done.seconds,
                "error": done.error, "checkpoint": pushed, "checkpoint_error": failed}

    def upload_pass(self) -> None:
        """The daemon's pass every few seconds; then an index checkpoint to the store if
        packs were uploaded, at most every checkpoint.PUSH_MIN seconds (a stream of small
        points does not push one each)."""
        assert self.uploader is not None
        self.uploader.run()
        self.push_checkpoint()

    def push_checkpoint(self, now: bool = False) -> tuple[str | None, str | None]:
        """Packs were uploaded since the last checkpoint pushed: points may now be wholly
        in the store, so the store gets an index checkpoint that names them: `now`, else
        at most every checkpoint.PUSH_MIN seconds (the daemon's upload passes). The name
        pushed (None if none was due), and why it failed (the next pass tries again)."""
        uploader = self.uploader
        if uploader is None or not uploader.unpushed or not (now or checkpoint.push_due()):
            return None, None
        uploader.unpushed = False  # before the copy: an upload committed after it sets it
        try:
            return checkpoint.push(self.repo), None
        except (RpfsError, OSError) as exc:
            uploader.unpushed = True
            log.warning("index checkpoint not pushed to the store: %s", exc)
            return None, str(exc)

    def upkeep(self) -> dict:
        """The daemon's own gc and turn of rolling verify, each if its interval has
        passed (maintenance/schedule.py): what ran, and its figures."""
        config, out = self.repo.config, {}
        if schedule.due(self.index, "gc", config.gc_interval):
            out["gc"] = self.gc()
            schedule.done(self.index, "gc")
        if schedule.due(self.index, "verify", config.verify_interval):
            out["verify"] = self.verify(max_duration=schedule.VERIFY_TURN)
            schedule.done(self.index, "verify")
        if self.uploader is not None:  # retired packs' objects whose grace is over
            with contextlib.suppress(RpfsError), self.repo.gc_lock():  # else that gc does
                out["objects_deleted"] = gc.delete_objects(self.repo)[0]
        return out

    def _purge_on_close(self, point: PointRecord | None = None) -> list[dict]:
        """Purge the points marked purge_on_close (of `point`, whose last open image just
        closed, or all) that no image reads any more.

        No claim is needed: a point in the trash cannot be opened, so no image of it
        starts meanwhile. At a close it runs in the closing thread (a FUSE worker), and
        a failure (a full index) is logged, not raised into the close: the daemon's next
        turn of its trash purge tries again.
        """
        try:
            return trash.purge_closed(self.index, self.registry.point_open, point,
                                      self.trash_days)
        except (RpfsError, OSError) as exc:
            if point is None:
                raise
            log.warning("disk %s: point %s: purge after its image closed failed (%s); the "
                        "daemon's trash purge tries again", point.disk, point.name, exc)
            return []

    @property
    def trash_days(self) -> int:
        """The repository's trash period, as it is now (`set_setting` changes it)."""
        return self.repo.config.trash_days

    def config(self) -> dict:
        """The repository's settings that `rpfs config show` prints."""
        config = self.repo.config
        return {"block_size": config.block_size, "hash": config.hash, "codec": config.codec,
                "reserve": config.reserve, "trash_days": config.trash_days,
                "gc_interval": config.gc_interval, "verify_interval": config.verify_interval}

    def set_setting(self, key: str, value: int) -> dict:
        """Change one repository setting (repo.SETTINGS); the settings as they are now."""
        self.repo.set_setting(key, value)
        return self.config()

    @contextlib.contextmanager
    def _purging(self, disks: set[str]):
        """Claims on `disks` (in name order), so that opens of their point images wait
        for the purge's commits; open images refuse nothing (see `Registry.claim`)."""
        with contextlib.ExitStack() as claims:
            for name in sorted(disks):
                claims.enter_context(self.registry.claim(
                    name, "purge its points", disk_too=False))
            yield

    def _dependants(self, txn, lineages: set[int]) -> list[LineageRecord]:
        """Lineages outside `lineages` whose reads fall through to one of them."""
        out = []
        for lin in self.index.list_lineages(txn):
            if lin.id in lineages or lin.parent is None:
                continue
            chain = self.index.chain(txn, lin.parent, lin.parent_gen)
            if any(lineage in lineages for lineage, _ in chain):
                out.append(lin)
        return out

    def _detach(self, txn, lin: LineageRecord, size: int) -> None:
        """Copy what `lin` reads through its origin into it as generation 0; drop the origin.

        Generation 0 sorts below every point of the lineage, so each block keeps the value
        it had; the chunks gain references, no data is copied. (A clone has the size of
        its origin, so `size` is the deleted disk's.)
        """
        chain = self.index.chain(txn, lin.parent, lin.parent_gen)
        for block in range(ceil_div(size, self.repo.block_size)):
            value = self.index.resolve(txn, chain, block)
            if value != ZERO and self.index.lookup(txn, lin.id, block, 0) is None:
                self.index.add_extent(txn, lin.id, block, 0, value)
        origin = lin.parent, lin.parent_gen
        lin.parent, lin.parent_gen = None, 0
        self.index.put_lineage(txn, lin)
        release(self.index, txn, *origin)  # lin no longer reads it
        # Copies of blocks lin rewrote before its oldest reader (its older points
        # purged) are read by nothing: they go at once.
        release(self.index, txn, lin.id, 0)


def _hydrate_range(disk: LiveDisk, blocks: tuple[int, int]) -> int:
    return disk.hydrate_range(*blocks)


def _some(names: list[str]) -> str:
    """The first few of `names`, and how many more there are."""
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
