"""Operations on writable disks: create, clone, delete, hydrate, list.

One `DiskService` owns the open `LiveDisk` objects of a process. In the daemon it is
shared by the FUSE layer (file handles) and the control socket (commands), so a command
and a VM writing through the mount see the same in-memory block states. Without a
daemon the CLI uses its own instance directly on the repository.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from ..errors import RpfsError, describe_os_error, stall_reason
from ..index import ZERO, DiskRecord, LineageRecord, PointRecord, PointState
from ..names import ceil_div, check_name, default_point_name, parse_point_ref
from ..pipeline import ordered_map
from ..progress import ProgressFn
from ..repo import Repository
from ..store.cache import ChunkCache
from .blockmap import ABSENT, MAX_BLOCKS, BlockMap
from .livedisk import LiveDisk, create_local_file

log = logging.getLogger(__name__)

HYDRATE_BATCH = 256  # blocks per hydration task
SYNC_EVERY = 64  # hydration tasks between block-map syncs
NAMES_SHOWN = 5  # point names a refusal lists before "and N more"
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds between tries of a stalled archive (doubling)


class _Open:
    def __init__(self, disk: LiveDisk, lock_fd: int) -> None:
        self.disk = disk
        self.lock_fd = lock_fd
        self.users = 0  # acquire() calls not yet released
        self.handles = 0  # of which: open files of the mount


class DiskService:
    """Disk commands and the registry of open writable disks."""

    def __init__(
        self, repo: Repository, cache: ChunkCache | None = None, background: bool = False
    ) -> None:
        """`background`: archive new points in threads (the daemon); else before returning."""
        self.repo = repo
        self.index = repo.index
        self.cache = cache or ChunkCache(repo)
        self.background = background
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        # Disks a rollback or delete holds closed from its check to its commit (see
        # _claim); opens of their images wait on this condition of the registry lock.
        self._claimed: set[str] = set()
        self._unclaimed = threading.Condition(self._lock)
        self._archivers: dict[str, threading.Thread] = {}
        self._give_up: dict[str, threading.Event] = {}  # per archiver: stop without finishing
        # disk -> why its archive waits (e.g. "no space on device"): kept here, not only in
        # the log, because the log lives on the filesystem that may be full.
        self._stalled: dict[str, str] = {}
        self._background: list[threading.Thread] = []
        self._point_readers: dict[str, int] = {}  # disk -> open point images of the mount
        # Called with a disk's name after it is deleted (the daemon drops the kernel's
        # cached entries, so a disk re-created under that name shows at once).
        self.on_removed: Callable[[str], None] = lambda name: None
        self._stopping = threading.Event()

    # -- open disks -----------------------------------------------------------------------

    def _record(self, name: str, txn=None) -> DiskRecord:
        if txn is None:
            with self.index.read() as txn:
                return self._record(name, txn)
        return self.index.disk_named(txn, name)

    def acquire(self, name: str, handle: bool = False) -> LiveDisk:
        """Open (or share) the writable disk `name`; pair with release().

        `handle`: for an open file of the mount; it waits while a command holds the disk
        (see _claim), so it opens the disk as that command left it.
        """
        with self._lock:
            if handle:
                self._wait_unclaimed(name)
            entry = self._open.get(name)
            if entry is None:
                record = self._record(name)
                if not record.writable:
                    raise RpfsError(
                        f"disk {name} has only recovery points; clone one to get a "
                        f"writable disk: rpfs clone {name}@POINT NEWNAME"
                    )
                fd = self.repo.lock_disk(name, "it is open in another rpfs process")
                try:
                    entry = _Open(LiveDisk(self.repo, self.cache, record), fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._open[name] = entry
            entry.users += 1
            entry.handles += handle
            return entry.disk

    def release(self, name: str, handle: bool = False) -> None:
        # The last user closes the disk (sync, unlock) while holding the registry lock: an
        # acquire() arriving meanwhile must wait for the lock file, not find it still held.
        with self._lock:
            entry = self._open[name]
            entry.users -= 1
            entry.handles -= handle
            if entry.users:
                return
            try:
                entry.disk.close()
            finally:
                os.close(entry.lock_fd)
                del self._open[name]

    def open_disks(self) -> list[LiveDisk]:
        with self._lock:
            return [entry.disk for entry in self._open.values()]

    def close_all(self) -> None:
        self._stopping.set()
        for event in list(self._give_up.values()):
            event.set()  # a stalled archiver must not hold up the unmount
        for thread in [*self._archivers.values(), *self._background]:
            thread.join()
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for entry in entries:
            try:
                entry.disk.close()
            finally:
                os.close(entry.lock_fd)

    def point_opened(self, disk: str, delta: int) -> None:
        """Count the mount's open point images of `disk` (they block its deletion).

        An open (+1) waits while a command holds the disk (see _claim): look the point
        up after this call, so a point deleted meanwhile is not found.
        """
        with self._lock:
            if delta > 0:
                self._wait_unclaimed(disk)
            self._point_readers[disk] = self._point_readers.get(disk, 0) + delta

    def _wait_unclaimed(self, name: str) -> None:
        """Wait until no command holds disk `name` (caller holds the registry lock).

        Only opens of the mount wait here, in worker threads, never the trio thread; a
        claim lasts from a command's check to its commit, not through its long waits.
        """
        while name in self._claimed:
            self._unclaimed.wait()

    def _check_closed(self, name: str, action: str, points_too: bool = False) -> None:
        with self._lock:
            self._refuse_if_open(name, action, points_too)

    def _refuse_if_open(self, name: str, action: str, points_too: bool) -> None:
        """RpfsError if the mount has an image of `name` open (caller holds the lock)."""
        entry = self._open.get(name)
        handles = entry.handles if entry is not None else 0
        readers = self._point_readers.get(name, 0) if points_too else 0
        if readers:
            raise RpfsError(
                f"disk {name} has {readers} open point image(s) in the mount; close them "
                f"(see 'fuser -v MOUNT/points/{name}/*') and {action} again"
            )
        if handles:
            raise RpfsError(
                f"disk {name} is open ({handles} open file(s) of its image); close it "
                f"(see 'fuser -v MOUNT/disks/{name}.img') and {action} again"
            )

    @contextlib.contextmanager
    def _claim(self, name: str, action: str, points_too: bool = False) -> Iterator[None]:
        """Check that no image of `name` is open and hold it so until the block ends.

        Check and claim are one step under the registry lock, and opens of the disk's
        image and of its point images wait for the claim: an open between a check and
        the commit would otherwise read the old bytes and then the new ones, or zeros
        once a deleted point's extents are gone. `points_too`: open point images refuse
        too. A second command on the same disk waits for the first, then checks afresh.
        """
        with self._lock:
            self._wait_unclaimed(name)
            self._refuse_if_open(name, action, points_too)
            self._claimed.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._claimed.discard(name)
                self._unclaimed.notify_all()

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
        return self._new_disk(name, size, parent=None, origin=None)

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
            self._join_archiver(src_disk)
            disk = self.acquire(src_disk)
            try:
                disk.snapshots.finish()
            finally:
                self.release(src_disk)
        return self._new_disk(name, point.size, (point.lineage, point.gen), source)

    def _check_new_name(self, name: str) -> None:
        check_name(name, "disk name")
        with self.index.read() as txn:
            if self.index.get_disk(txn, name) is not None:
                raise RpfsError(f"a disk named {name!r} already exists; choose another name")

    def _new_disk(
        self, name: str, size: int, parent: tuple[int, int] | None, origin: str | None
    ) -> dict:
        self._check_new_name(name)
        self.repo.space.check(f"a new disk {name}")  # its writes would be refused anyway
        with self.index.write() as txn:
            file_id = self.index.next_id(txn, "file")
        # The local file is durable before the record that names it commits; a crash in
        # between leaves an orphan file, never a record without its file. A commit that
        # fails (the name taken meanwhile, a full index) takes the file away again.
        record = DiskRecord(name, size, 0, time.time(), origin, file_id)  # lineage below
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
                    raise RpfsError(f"cannot clone {origin}: it was deleted meanwhile; "
                                    f"disk {name} was not created")
                record.lineage = self.index.new_lineage(txn, name, parent).id
                self.index.put_disk(txn, record)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, RpfsError):
                detail = describe_os_error(exc, self.repo.root)
                raise RpfsError(f"cannot create disk {name}: {detail}") from None
            raise
        log.info("disk %s: created (%d bytes, origin %s)", name, size, origin or "none")
        return self._describe(record)

    def disks(self) -> list[dict]:
        with self.index.read() as txn:
            records = self.index.list_disks(txn)
        return [self._describe(r) for r in records]

    def _describe(self, record: DiskRecord) -> dict:
        out = {
            "name": record.name,
            "size": record.size,
            "origin": record.origin,
            "writable": record.writable,
            "created": record.created,
        }
        if not record.writable:
            return {**out, "hydrated_pct": None, "state": "points only", "stalled": None}
        with self._lock:
            entry = self._open.get(record.name)
            states = entry.disk.map.states if entry else None
            handles = entry.handles if entry else 0
        if states is None:
            nblocks = ceil_div(record.size, self.repo.block_size)
            with self.index.read() as txn:
                states = BlockMap.stored(self.index, txn, record.file_id, nblocks)
        absent = states.count(ABSENT) if record.origin else 0
        pct = 100.0 * (1 - absent / len(states)) if len(states) else 100.0
        return {
            **out,
            "hydrated_pct": round(pct, 2),
            "state": f"open ({handles})" if handles else "idle",
            "stalled": self._stalled.get(record.name),
        }

    # -- points of writable disks --------------------------------------------------------

    def snapshot(self, disks: list[str], name: str | None = None) -> list[dict]:
        """One point of each disk, all at the same instant, archived in the background."""
        point_name = check_name(name, "point name") if name is not None else default_point_name()
        names = sorted({check_name(d, "disk name") for d in disks})
        if not names:
            raise RpfsError("snapshot needs at least one disk name")
        opened: list[LiveDisk] = []
        try:
            for disk_name in names:
                opened.append(self.acquire(disk_name))
            while True:
                # One archiving point per disk at a time, but a disk with nothing written
                # since its pending point needs no wait: the new point rides on that one.
                for disk in opened:
                    if disk.snapshots.must_finish:
                        self._join_archiver(disk.name)
                        disk.snapshots.finish()
                with contextlib.ExitStack() as barriers:
                    for disk in opened:
                        barriers.enter_context(disk.barrier())
                    if any(d.snapshots.must_finish for d in opened):
                        continue  # a write landed before the barrier: archive, try again
                    points = self._freeze_all(opened, point_name)
                break
            for disk, point in zip(opened, points, strict=True):
                if point.rides:
                    log.info("disk %s: point %s taken, nothing written since point %s: "
                             "complete when that one is", disk.name, point_name,
                             pending.name if (pending := disk.snapshots.archiving) else "-")
                else:
                    log.info("disk %s: point %s taken (%s, %d blocks to archive)", disk.name,
                             point_name, point.method, point.frozen_blocks)
                if not self.background:
                    disk.snapshots.finish()
                elif not point.rides:  # it completes with the pending point's archiver
                    self._start_archiver(disk.name)
        finally:
            for disk in opened:
                self.release(disk.name)
        return [vars(p) for p in points]

    def _freeze_all(self, opened: list[LiveDisk], point_name: str) -> list[PointRecord]:
        """Take the point of every disk in one transaction (caller holds their barriers)."""
        now = time.time()
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
                    points.append(disk.snapshots.freeze(txn, point_name, now))
                    frozen.append(disk)
        except BaseException:
            for disk in frozen:
                disk.snapshots.unfreeze()
            raise
        for disk, point in zip(opened, points, strict=True):
            disk.snapshots.frozen(point)
        return points

    def _start_archiver(self, name: str) -> None:
        """Archive `name`'s point in a thread that holds the disk open until done.

        An OS error (a full disk above all) stalls it, not ends it: the blocks stay
        frozen, `stalls()` says why, and it tries again after 1 s, 2 s, ... at most every
        60 s, so it resumes by itself once space is back.
        """
        disk = self.acquire(name)
        give_up = threading.Event()

        def run() -> None:
            delay = RETRY_FIRST
            try:
                while not (self._stopping.is_set() or give_up.is_set()):
                    try:
                        if not disk.snapshots.archive_batch():
                            break
                    except OSError as exc:
                        self._stall(name, exc, delay)
                        give_up.wait(delay)  # set by delete, or by close_all
                        delay = min(2 * delay, RETRY_MAX)
                        continue
                    if self._stalled.pop(name, None) is not None:
                        log.info("disk %s: archiving resumed", name)
                        delay = RETRY_FIRST
            except Exception:
                log.exception("disk %s: archiving failed; it resumes at the next open", name)
                self._stalled[name] = "failed (see the daemon's log); resumes at the next mount"
                return
            finally:
                with self._lock:
                    if self._archivers.get(name) is threading.current_thread():
                        del self._archivers[name]  # not a newer archiver's entry
                        del self._give_up[name]
                self.release(name)
            self._stalled.pop(name, None)

        thread = threading.Thread(target=run, name=f"rpfs-archive-{name}", daemon=True)
        with self._lock:
            self._archivers[name] = thread
            self._give_up[name] = give_up
        thread.start()

    def _stall(self, name: str, exc: OSError, delay: float) -> None:
        reason = stall_reason(exc)
        if self._stalled.get(name) != reason:  # once per stall, not at every try
            log.warning("disk %s: archiving stalled: %s; trying again every %g-%g s",
                        name, describe_os_error(exc, self.repo.root), delay, RETRY_MAX)
        self._stalled[name] = reason

    def stalls(self) -> dict[str, str]:
        """Disks whose archive waits, and why (shown by `rpfs disks` and `rpfs points`)."""
        return dict(self._stalled)

    def _join_archiver(self, name: str) -> None:
        """Wait for `name`'s archiver; if it is stalled, say so instead of waiting."""
        with self._lock:
            thread = self._archivers.get(name)
        while thread is not None and thread.is_alive():
            reason = self._stalled.get(name)
            if reason is not None:
                raise RpfsError(
                    f"disk {name}: archiving of its newest point is stalled ({reason}); it "
                    "resumes by itself once that is resolved (see 'rpfs points'), try again "
                    "then"
                )
            thread.join(0.2)

    def _stop_archiver(self, name: str) -> None:
        """Stop `name`'s archiver without finishing (its disk is being deleted)."""
        with self._lock:
            thread, give_up = self._archivers.get(name), self._give_up.get(name)
        if thread is not None:
            give_up.set()
            thread.join()

    def resume_archiving(self, disk: str | None = None) -> None:
        """Start archivers for points a crash or stop left half archived (daemon start),
        or for `disk` only, whose archiver was stopped, if none runs."""
        with self.index.read() as txn:
            pending = {p.disk for p in self.index.list_points(txn, disk)
                       if p.state == PointState.ARCHIVING}
        for name in sorted(pending):
            with self._lock:
                running = name in self._archivers
            if not running:
                self._start_archiver(name)

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
        self._check_closed(disk_name, "roll it back")  # before waiting for the archive
        self._join_archiver(disk_name)
        with self._claim(disk_name, "roll it back"):
            disk = self.acquire(disk_name)
            try:
                dropped = disk.rollback(target)
            finally:
                self.release(disk_name)
        return {"disk": disk_name, "point": point_name, "blocks_to_fetch": dropped}

    def hydrate(
        self, name: str, progress: ProgressFn | None = None, workers: int | None = None
    ) -> dict:
        """Copy every block of a clone into its local file (resumable, safe while in use)."""
        disk = self.acquire(check_name(name, "disk name"))
        try:
            bs = disk.bs
            ranges = [(b, min(b + HYDRATE_BATCH, disk.nblocks))
                      for b in range(0, disk.nblocks, HYDRATE_BATCH)]
            fetched = 0
            fetch = functools.partial(_hydrate_range, disk)
            for i, ((_, end), n) in enumerate(ordered_map(fetch, ranges, workers)):
                if self._stopping.is_set():
                    break
                fetched += n
                if progress:
                    progress(min(end * bs, disk.size), disk.size)
                if i % SYNC_EVERY == SYNC_EVERY - 1:
                    disk.sync()
            disk.sync()
            if ABSENT not in disk.map.states:
                self._cut_origin(disk)
        finally:
            self.release(name)
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
                if self._stopping.is_set():
                    return
                if disk["writable"] and (disk["hydrated_pct"] or 0) < 100:
                    try:
                        self.hydrate(disk["name"], workers=1)
                    except RpfsError as exc:
                        log.warning("disk %s: background hydration stopped: %s",
                                    disk["name"], exc)
                    except Exception:
                        log.exception("disk %s: background hydration failed", disk["name"])

        thread = threading.Thread(target=run, name="rpfs-hydrate", daemon=True)
        self._background.append(thread)
        thread.start()

    def delete(self, name: str, force: bool = False, with_points: bool = False) -> dict:
        """Delete a disk (and a writable one's local file) with its points.

        A disk with points is deleted only with `with_points`: they may be all that is
        left of a VM (a captured disk is nothing but its points). Disks cloned from its
        points still read unhydrated blocks through it; with `force`, those blocks are
        first copied into the dependants' own lineages (chunk references, not data), so
        they no longer need it.
        """
        self._record(check_name(name, "disk name"))  # a wrong name fails before any wait
        self._check_closed(name, "delete it", points_too=True)
        self._stop_archiver(name)  # its points go too; a stalled one must not block that
        try:
            with self._claim(name, "delete it", points_too=True):
                points, dependants = self._drop(name, force, with_points)
        except BaseException:
            if self.background:  # not deleted: its pending point must still be archived
                self.resume_archiving(name)
            raise
        # After the claim: the kernel's invalidation may wait for requests of the mount,
        # and those for the worker threads that opens waiting for the claim hold.
        for open_disk in self.open_disks():  # dependants now resolve through themselves
            open_disk.reload_chain()
        self.on_removed(name)
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
                if points and not with_points:
                    raise RpfsError(
                        f"disk {name} has {len(points)} point(s): {_some(points)}; pass "
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
                for lin in dependants:
                    self._detach(txn, lin, record.size)
                for point in points:
                    self.index.delete_point(txn, name, point)
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
        lin.parent, lin.parent_gen = None, 0
        self.index.put_lineage(txn, lin)


def _hydrate_range(disk: LiveDisk, blocks: tuple[int, int]) -> int:
    return disk.hydrate_range(*blocks)


def _some(names: list[str]) -> str:
    """The first few of `names`, and how many more there are."""
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
