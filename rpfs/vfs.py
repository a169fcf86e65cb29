"""The tree the mount shows, built from the index on demand:

    /points/<disk>/<point>.img      one read-only image per recovery point

Inode numbers are assigned on first sight of a path and stay fixed for the life of the
mount, so the kernel's view of a file never changes under it. Every lookup and listing
reads the index afresh, so a point captured while mounted appears without a remount.
Errors are OSError with the errno the FUSE layer should return.
"""

from __future__ import annotations

import errno
import stat
import threading
import time
from dataclasses import dataclass

from .image import ChunkCache, PointImage
from .index import PointRecord
from .repo import Repository

ROOT_INO = 1  # pyfuse3.ROOT_INODE
IMAGE_SUFFIX = ".img"

Key = tuple[str, ...]  # ("points",), ("points", disk), ("points", disk, point)


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    size: int = 0
    blocks: int = 0  # in 512-byte units
    mtime: float = 0.0
    nlink: int = 1


def _enoent() -> OSError:
    return OSError(errno.ENOENT, "no such entry")


class Tree:
    """Names, inodes and attributes of the mount; opens point images for reading."""

    def __init__(self, repo: Repository, cache: ChunkCache) -> None:
        self.repo = repo
        self.cache = cache
        self.mounted_at = time.time()
        self._ino_of: dict[Key, int] = {(): ROOT_INO}
        self._key_of: dict[int, Key] = {ROOT_INO: ()}
        self._lock = threading.Lock()

    def _ino(self, key: Key) -> int:
        with self._lock:
            ino = self._ino_of.get(key)
            if ino is None:
                ino = len(self._key_of) + ROOT_INO
                self._ino_of[key] = ino
                self._key_of[ino] = key
            return ino

    def key(self, ino: int) -> Key:
        try:
            return self._key_of[ino]
        except KeyError:
            raise _enoent() from None

    def _point(self, key: Key) -> PointRecord:
        with self.repo.index.read() as txn:
            point = self.repo.index.get_point(txn, key[1], key[2])
        if point is None:
            raise _enoent()
        return point

    def attr(self, ino: int) -> Attr:
        return self._stat(self.key(ino))

    def _stat(self, key: Key) -> Attr:
        """Attributes of the entry at `key`; its inode is allocated only if it exists."""
        if len(key) < 3:
            if len(key) == 2 and not self._disk_exists(key[1]):
                raise _enoent()
            return Attr(self._ino(key), stat.S_IFDIR | 0o755, mtime=self.mounted_at, nlink=2)
        point = self._point(key)
        allocated = point.allocated_blocks * self.repo.block_size
        return Attr(
            self._ino(key), stat.S_IFREG | 0o444, size=point.size, blocks=allocated // 512,
            mtime=point.created,
        )

    def _disk_exists(self, disk: str) -> bool:
        with self.repo.index.read() as txn:
            return self.repo.index.get_disk(txn, disk) is not None

    def _children(self, key: Key) -> list[tuple[str, Key]]:
        if key == ():
            return [("points", ("points",))]
        with self.repo.index.read() as txn:
            if key == ("points",):
                disks = self.repo.index.list_disks(txn)
                return [(d.name, ("points", d.name)) for d in disks]
            if len(key) == 2:
                points = self.repo.index.list_points(txn, key[1])
                return [(p.name + IMAGE_SUFFIX, (*key, p.name)) for p in points]
        raise OSError(errno.ENOTDIR, "not a directory")

    def lookup(self, parent: int, name: str) -> Attr:
        key = self.key(parent)
        if len(key) == 3:
            raise OSError(errno.ENOTDIR, "not a directory")
        if key == ():
            child: Key = (name,)
            if name != "points":
                raise _enoent()
        elif len(key) == 1:
            child = (*key, name)
        else:
            if not name.endswith(IMAGE_SUFFIX):
                raise _enoent()
            child = (*key, name[: -len(IMAGE_SUFFIX)])
        return self._stat(child)

    def listdir(self, ino: int) -> list[tuple[str, Attr]]:
        out = []
        for name, child in self._children(self.key(ino)):
            try:
                out.append((name, self._stat(child)))
            except FileNotFoundError:
                continue  # deleted between listing and stat
        return out

    def open_image(self, ino: int) -> PointImage:
        key = self.key(ino)
        if len(key) != 3:
            raise OSError(errno.EISDIR, "is a directory")
        return PointImage(self.repo, self.cache, self._point(key))
