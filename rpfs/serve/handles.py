"""Image handles for any export: a point opened read-only or a disk read-write, by name.

The FUSE mount opens images through `Images` today and an NBD export will tomorrow, so
what opening an image involves lives here once, not in either: an open point image is
counted with the disk registry, which looks the point up with that count (waiting while
a rollback or delete holds the disk): the count keeps a purged point's extents until the
image closes, and blocks the disk's deletion. A point still being archived reads its
frozen blocks through its live disk (the overlay). Here too are the answers about an
image that come from the repository's files (size, bytes allocated, modification time;
a deleted point's from its trash entry while an image of it may still be open) and the
room the repository's filesystem has left, so no export reaches into the repository for
them.

Everything here blocks (LMDB, the registry lock, pread): exports call it from worker
threads. Errors are OSError with the errno an export returns (ENOENT, EBUSY, EROFS) and a
message that names the image.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from ..disks.livedisk import LiveDisk
from ..disks.point import PointImage
from ..disks.registry import Registry
from ..disks.status import DiskStatus, PointStatus
from ..errors import RpfsError
from ..index import MAX_GEN, DiskRecord, PointRecord, PointState
from ..lineage import share_history
from ..repo import Repository
from ..store.cache import ChunkCache

log = logging.getLogger(__name__)

HYDRATE_PIECE = 4 << 20  # a point's hydrate (NBD CACHE) reads in pieces of this size
# What an export may do on its event thread, where the hand-off to a worker costs more
# than the work (docs/performance.md): a read this small, alone in flight, fetching; a
# write this small into local blocks whose locks are free (`write_at_hand`).
INLINE_READ_MAX = 64 << 10
INLINE_WRITE_MAX = 64 << 10


@dataclass(frozen=True)
class ImageInfo:
    """What an image is, without opening it."""

    size: int
    allocated: int  # bytes it occupies: a disk's local file, a point's stored blocks
    mtime: float
    instance: tuple  # tells a deleted and re-created image of the same name apart


class PointHandle:
    """An open point image: reads only. `close()` once."""

    writable = False

    def __init__(
        self, registry: Registry, image: PointImage, overlay: LiveDisk | None
    ) -> None:
        self._registry = registry
        self._point = image.point
        self._overlay = overlay
        self.disk = image.point.disk
        self.size = image.size
        self.instance = _instance(image.point)
        self.read = image.read
        self.read_at_hand = image.read_at_hand
        self.read_many = image.read_many
        self.status = PointStatus(image.repo.index, image.point)
        # A point still being archived reads frozen blocks under its disk's locks, which
        # another thread may hold for long; a complete one waits on nothing but its
        # chunks, which an object store may take a retry bound to answer.
        self.read_may_wait = overlay is not None or image.repo.store.backend.remote

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "recovery points are read-only")

    def write_at_hand(self, offset: int, data: bytes) -> None:
        return None  # `write` refuses

    def zero_range(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "recovery points are read-only")

    def hydrate(self, offset: int, length: int) -> None:
        """Bring a byte range close: a point's chunks stay where they are, so its blocks
        are read into the chunk cache (decoded, for the reads that follow), in pieces
        that keep each read's buffer small."""
        end = min(offset + length, self.size)
        for at in range(offset, end, HYDRATE_PIECE):
            self.read(at, min(HYDRATE_PIECE, end - at))

    def sync(self) -> None:
        pass

    def close(self) -> None:
        if self._overlay is not None:
            self._registry.release(self._point.disk)
        self._registry.close_point(self._point)  # last: this may purge the point


class DiskHandle:
    """An open writable disk image, shared with the daemon's disk commands. `close()` once."""

    writable = True
    # A read of ABSENT blocks copies them in under stripe locks another thread may hold.
    read_may_wait = True

    def __init__(self, registry: Registry, name: str, disk: LiveDisk) -> None:
        self._registry = registry
        self.name = self.disk = name
        self.size = disk.size
        self._bs = disk.bs
        self._hydrate = disk.hydrate_range
        self.read = disk.read
        self.read_at_hand = disk.read_at_hand
        self.write = disk.write
        self.write_at_hand = disk.write_at_hand
        self.zero_range = disk.zero_range
        self.sync = disk.sync
        self.status = DiskStatus(disk)

    def hydrate(self, offset: int, length: int) -> None:
        """Copy the ABSENT blocks of a byte range into the local file now (a clone's)."""
        end = min(offset + length, self.size)
        if offset < end:
            self._hydrate(offset // self._bs, (end - 1) // self._bs + 1)

    def close(self) -> None:
        self._registry.release(self.name, handle=True)


Handle = PointHandle | DiskHandle


def _instance(point: PointRecord) -> tuple:
    return (point.lineage, point.gen)


class Images:
    """Opens images by name and answers what they are."""

    def __init__(self, repo: Repository, cache: ChunkCache, registry: Registry) -> None:
        self.repo = repo
        self.cache = cache
        self.registry = registry

    def open_point(self, disk: str, name: str) -> PointHandle:
        """Open point `disk`@`name` for reading; ENOENT if there is none.

        Looked up with its count (this waits while a rollback or delete holds the disk):
        a point deleted meanwhile is ENOENT, never an image of extents that are gone; one
        purged while open reads on until closed.
        """
        point = self.registry.open_point(disk, name)
        if point is None:
            raise OSError(errno.ENOENT, f"no point {disk}@{name}")
        overlay = None
        try:
            if point.state != PointState.COMPLETE:
                overlay = self.registry.acquire(disk)
            image = PointImage(self.repo, self.cache, point, overlay)
        except BaseException:
            if overlay is not None:
                self.registry.release(disk)
            self.registry.close_point(point)
            raise
        return PointHandle(self.registry, image, overlay)

    def open_disk(self, name: str) -> DiskHandle:
        """Open writable disk `name` for reading and writing.

        Waits while a rollback or delete holds the disk, so it opens the disk as that
        command left it: ENOENT if it deleted it, EBUSY if the disk cannot be opened (e.g.
        another rpfs process has it open).
        """
        try:
            disk = self.registry.acquire(name, handle=True)
        except RpfsError as exc:
            self._disk(name)  # ENOENT if it is gone
            log.warning("open of disk %s refused: %s", name, exc)
            raise OSError(errno.EBUSY, str(exc)) from None
        return DiskHandle(self.registry, name, disk)

    def names(self) -> tuple[list[tuple[str, str]], list[str]]:
        """Every image there is: the (disk, point) pairs and the writable disks' names."""
        with self.repo.index.read() as txn:
            disks = self.repo.index.list_disks(txn)
            points = [(d.name, p.name) for d in disks
                      for p in self.repo.index.list_points(txn, d.name)]
        return points, [d.name for d in disks if d.writable]

    def history_points(self, disk: str) -> list[str]:
        """The points of a disk, by name: what an image of it can be compared with (a
        dirty bitmap) without naming a disk."""
        with self.repo.index.read() as txn:
            return [p.name for p in self.repo.index.list_points(txn, disk)]

    def compared_point(self, disk: str, point: str | None, name: str) -> PointRecord | None:
        """The point `name` (POINT of `disk`, or DISK@POINT) if it shares the history of
        the image `disk`@`point` (the writable disk `disk` when `point` is None), so
        their differences mean something; else None."""
        index = self.repo.index
        other_disk, _, other = name.rpartition("@")
        with index.read() as txn:
            found = index.get_point(txn, other_disk or disk, other)
            if point is not None:
                ours = index.get_point(txn, disk, point)
                chain = None if ours is None else index.chain(txn, ours.lineage, ours.gen)
            else:
                record = index.get_disk(txn, disk)
                chain = None if record is None else index.chain(txn, record.lineage, MAX_GEN)
            if found is None or chain is None:
                return None
            theirs = index.chain(txn, found.lineage, found.gen)
        return found if share_history(chain, theirs) else None

    def point_info(self, disk: str, name: str) -> ImageInfo:
        return self._point_info(self._point(disk, name))

    def deleted_point_info(self, disk: str, name: str, instance: tuple) -> ImageInfo | None:
        """What the point `disk`@`name` of identity `instance` was, if it is in the trash
        (an image of it opened before its delete still reads)."""
        with self.repo.index.read() as txn:
            entries = self.repo.index.list_trash(txn, disk, name)
        return next((self._point_info(e.point) for e in entries
                     if _instance(e.point) == instance), None)

    def _point_info(self, point: PointRecord) -> ImageInfo:
        return ImageInfo(
            size=point.size, allocated=point.allocated_blocks * self.repo.block_size,
            mtime=point.created, instance=_instance(point),
        )

    def disk_info(self, name: str) -> ImageInfo:
        """Size, allocation and mtime of writable disk `name`: its local file's, whose
        blocks are what the disk occupies and whose mtime is its last write."""
        disk = self._disk(name)
        local = os.stat(self.repo.root / disk.file)
        return ImageInfo(
            size=disk.size, allocated=local.st_blocks * 512, mtime=local.st_mtime,
            instance=(disk.file_id,),
        )

    def statvfs(self) -> os.statvfs_result:
        """The repository's filesystem: the room left for images to grow into."""
        return os.statvfs(self.repo.root)

    def _point(self, disk: str, name: str) -> PointRecord:
        with self.repo.index.read() as txn:
            point = self.repo.index.get_point(txn, disk, name)
        if point is None:
            raise OSError(errno.ENOENT, f"no point {disk}@{name}")
        return point

    def _disk(self, name: str) -> DiskRecord:
        with self.repo.index.read() as txn:
            disk = self.repo.index.get_disk(txn, name)
        if disk is None or not disk.writable:
            raise OSError(errno.ENOENT, f"no writable disk {name}")
        return disk
