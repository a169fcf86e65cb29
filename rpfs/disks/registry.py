"""The open writable disks of a process, who uses them, and the threads that work on them.

One `Registry` owns the open `LiveDisk` objects of a process. In the daemon it is
shared by the FUSE layer (file handles) and the control socket's commands, so a command
and a VM writing through the mount see the same in-memory block states. Without a
daemon the CLI's DiskService has its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator

from ..errors import RpfsError, describe_os_error, stall_reason
from ..index import PointRecord, PointState
from ..repo import Repository
from ..store.cache import ChunkCache
from .livedisk import LiveDisk

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds between tries of a stalled archive (doubling)


class _Open:
    def __init__(self, disk: LiveDisk, lock_fd: int) -> None:
        self.disk = disk
        self.lock_fd = lock_fd
        self.users = 0  # acquire() calls not yet released
        self.handles = 0  # of which: open files of the mount


class Registry:
    """Open disks, their users and claims, and the archiver and hydration threads.

    Locks, in the order they are taken (then a disk's own: stripe locks -> archive lock
    -> sync lock -> LMDB write transaction, see LiveDisk):

    - a claim (`claim`): a disk a rollback or delete holds closed from its check to its
      commit. Not a lock object but a name in `_claimed`; opens of the disk's images
      wait for it on `_unclaimed`, a condition of the registry lock (waiting releases
      that lock).
    - the registry lock (`_lock`): guards `_open` (entries and their counts),
      `_claimed`, `_point_readers`, `_archivers` and `_give_up`. The last release of a
      disk closes it (sync, unlock) under it, and acquire() opens one under it, so it is
      held across that disk's locks, LMDB commits and fdatasync; nothing holding a
      disk's lock takes it.

    Only a snapshot of several disks holds locks of two disks at once: it takes their
    barriers one disk after the other, in name order, so one disk's sync lock is held
    while the next one's stripe locks are taken.

    `_stalled` is read and written without a lock (one dict operation at a time), and
    `point_open` reads `_point_readers` without one: it is asked inside LMDB write
    transactions, where the registry lock may not be taken (the last release of a disk
    holds it while it commits: the two would wait on each other).
    """

    def __init__(self, repo: Repository, cache: ChunkCache, background: bool) -> None:
        """`background`: archive new points in threads (the daemon); else before returning."""
        self.repo = repo
        self.index = repo.index
        self.cache = cache
        self.background = background
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        # Disks a rollback or delete holds closed from its check to its commit (see
        # claim); opens of their images wait on this condition of the registry lock.
        self._claimed: set[str] = set()
        self._unclaimed = threading.Condition(self._lock)
        self._archivers: dict[str, threading.Thread] = {}
        self._give_up: dict[str, threading.Event] = {}  # per archiver: stop without finishing
        # disk -> why its archive waits (e.g. "no space on device"): kept here, not only in
        # the log, because the log lives on the filesystem that may be full.
        self._stalled: dict[str, str] = {}
        self._background: list[threading.Thread] = []
        # (disk, lineage, gen) -> open images of that point in the mount: per point, not
        # per name (a name is reused after a delete) nor per disk (a purge of one point
        # need not wait for images of another, each a reader of its own).
        self._point_readers: Counter[tuple[str, int, int]] = Counter()
        # Called with a disk's name after it is deleted (the daemon drops the kernel's
        # cached entries, so a disk re-created under that name shows at once).
        self.on_removed: Callable[[str], None] = lambda name: None
        # Called with (disk, point) after a point is deleted or undeleted (the same, for
        # the entry of its image).
        self.on_point_changed: Callable[[str, str], None] = lambda disk, point: None
        # Called with a point's record after the last of its open images closed (the disk
        # service purges it then if a purge marked it purge_on_close).
        self.on_point_closed: Callable[[PointRecord], None] = lambda point: None
        self.stopping = threading.Event()

    # -- open disks -----------------------------------------------------------------------

    def acquire(self, name: str, handle: bool = False) -> LiveDisk:
        """Open (or share) the writable disk `name`; pair with release().

        `handle`: for an open file of the mount; it waits while a command holds the disk
        (see claim), so it opens the disk as that command left it.
        """
        with self._lock:
            if handle:
                self._wait_unclaimed(name)
            entry = self._open.get(name)
            if entry is None:
                with self.index.read() as txn:
                    record = self.index.disk_named(txn, name)
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

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[LiveDisk]:
        """The writable disk `name`, open for the block (a command's own use)."""
        disk = self.acquire(name)
        try:
            yield disk
        finally:
            self.release(name)

    def sync_changed(self) -> dict[str, OSError]:
        """Sync every open disk whose block map changed; the errors, by disk.

        Each is held open while it syncs (a user reference, taken under the registry
        lock): a last close meanwhile then waits for the sync instead of closing the
        local file under it.
        """
        with self._lock:
            changed = [name for name, e in self._open.items() if e.disk.map.needs_sync]
            for name in changed:
                self._open[name].users += 1
        failed: dict[str, OSError] = {}
        for name in changed:
            try:
                self._open[name].disk.sync()
            except OSError as exc:
                failed[name] = exc
            finally:
                self.release(name)
        return failed

    def open_disks(self) -> list[LiveDisk]:
        with self._lock:
            return [entry.disk for entry in self._open.values()]

    def opened(self, name: str) -> tuple[LiveDisk | None, int]:
        """The open disk `name` (None if it is closed) and its open files of the mount."""
        with self._lock:
            entry = self._open.get(name)
            return (entry.disk, entry.handles) if entry else (None, 0)

    def close_all(self) -> None:
        self.stopping.set()
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

    def open_point(self, disk: str, name: str) -> PointRecord | None:
        """Count an open image of point `disk`@`name` of the mount; None if there is none.

        It waits while a command holds the disk (see claim) and looks the point up under
        the registry lock, so a purge either sees this image (and leaves the point's
        extents until it closes) or commits first (and the point is not found): never an
        image of extents that are gone. Pair with close_point().
        """
        with self._lock:
            self._wait_unclaimed(disk)
            with self.index.read() as txn:
                point = self.index.get_point(txn, disk, name)
            if point is not None:
                self._point_readers[_reader_key(point)] += 1
            return point

    def close_point(self, point: PointRecord) -> None:
        """An open image of `point` closed; after the last one, `on_point_closed`.

        The last close waits for a claim on the disk first: a purge that saw this image
        open and marks the point purge_on_close commits under its claim, so the mark is
        there to be seen once the claim is gone (a purge claimed after the close sees no
        image and purges at once).
        """
        key = _reader_key(point)
        with self._lock:
            self._point_readers[key] -= 1
            if self._point_readers[key]:
                return
            del self._point_readers[key]
            self._wait_unclaimed(point.disk)
        self.on_point_closed(point)

    def point_open(self, point: PointRecord) -> bool:
        """Whether the mount has an image of `point` open. Without the registry lock (see
        the class): a caller that holds the disk's claim gets an answer that may turn
        False, never True, before its commit, since opens wait for the claim."""
        return self._point_readers.get(_reader_key(point), 0) > 0

    # -- claims ---------------------------------------------------------------------------

    def _wait_unclaimed(self, name: str) -> None:
        """Wait until no command holds disk `name` (caller holds the registry lock).

        Only opens of the mount wait here, in worker threads, never the trio thread; a
        claim lasts from a command's check to its commit, not through its long waits.
        """
        while name in self._claimed:
            self._unclaimed.wait()

    def check_closed(self, name: str, action: str, points_too: bool = False) -> None:
        """RpfsError if the mount has an image of `name` open (a check before a long wait;
        the claim checks again)."""
        with self._lock:
            self._refuse_if_open(name, action, points_too)

    def _refuse_if_open(
        self, name: str, action: str, points_too: bool, disk_too: bool = True
    ) -> None:
        """RpfsError if the mount has an image of `name` open (caller holds the lock)."""
        entry = self._open.get(name)
        handles = entry.handles if entry is not None and disk_too else 0
        readers = sum(n for (disk, _, _), n in self._point_readers.items()
                      if disk == name) if points_too else 0
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
    def claim(
        self, name: str, action: str, points_too: bool = False, disk_too: bool = True
    ) -> Iterator[None]:
        """Check that no image of `name` is open and hold it so until the block ends.

        Check and claim are one step under the registry lock, and opens of the disk's
        image and of its point images wait for the claim: an open between a check and
        the commit would otherwise read the old bytes and then the new ones, or zeros
        once a deleted point's extents are gone. `points_too`: open point images refuse
        too (a disk's deletion); `disk_too=False`: an open image of the disk itself does
        not. A purge of points refuses neither: what the disk reads the head keeps, and
        an open point image keeps its point (see `point_open`); it claims only so that
        opens wait for its commit. A second command on the same disk waits for the
        first, then checks afresh.
        """
        with self._lock:
            self._wait_unclaimed(name)
            self._refuse_if_open(name, action, points_too, disk_too)
            self._claimed.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._claimed.discard(name)
                self._unclaimed.notify_all()

    # -- archiver threads -----------------------------------------------------------------

    def start_archiver(self, name: str) -> None:
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
                while not (self.stopping.is_set() or give_up.is_set()):
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

    def join_archiver(self, name: str) -> None:
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

    def stop_archiver(self, name: str) -> None:
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
                self.start_archiver(name)

    # -- other background work ------------------------------------------------------------

    def run_in_background(self, name: str, run: Callable[[], None]) -> None:
        """Run `run` in a thread that close_all() waits for (it should return once
        `stopping` is set)."""
        thread = threading.Thread(target=run, name=name, daemon=True)
        self._background.append(thread)
        thread.start()


def _reader_key(point: PointRecord) -> tuple[str, int, int]:
    return point.disk, point.lineage, point.gen
