"""The tree the mount shows, built from the index on demand:

    /points/<disk>/<point>.img      one read-only image per recovery point
    /disks/<disk>.img               one read-write image per writable disk

Inode numbers are assigned on first sight of a path and stay fixed for the life of the
mount, so the kernel's view of a file never changes under it. Every lookup and listing
reads the index afresh, so a point captured while mounted appears without a remount.
What an image is (size, allocation, an open handle) the tree asks `handles.Images`.
Errors are OSError with the errno the FUSE layer should return.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from ..index import Index
from .handles import Handle, Images

ROOT_INO = 1  # pyfuse3.ROOT_INODE
IMAGE_SUFFIX = ".img"

Key = tuple[str, ...]  # ("points", disk, point), ("disks", disk) and their parents
TOP = ("points", "disks")


@dataclass(frozen=True)
class Access:
    """Owner and modes of the mount's entries, which the kernel enforces
    (`default_permissions`).

    Without `allow_other` only processes of the daemon's own user and group reach the
    mount at all (FUSE refuses everyone else, even `stat` of its root). With it, the modes
    decide, so the defaults let only the owner (the daemon's user, root) in: disk images
    0600, point images the same bits minus write (0400). A directory gets read and search
    for every class that may read an image, since that class needs them to reach the
    image, and nothing for the others, since listing would tell them the disk and point
    names (0600 -> 0700, 0640 -> 0750). No class gets write on a directory but the owner:
    names are made by rpfs commands, and the owner's attempts get rpfs's own EROFS/EPERM.
    """

    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    mode: int = 0o600  # of disk images

    @property
    def point_mode(self) -> int:
        return self.mode & ~0o222

    @property
    def dir_mode(self) -> int:
        readers = self.mode & 0o444
        return readers | readers >> 2 | self.mode & 0o200


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
    """Names, inodes and attributes of the mount; opens its images."""

    def __init__(self, index: Index, images: Images, access: Access) -> None:
        self.index = index
        self.images = images
        self.access = access
        self.mounted_at = time.time()
        self._ino_of: dict[tuple, int] = {(): ROOT_INO}
        self._key_of: dict[int, Key] = {ROOT_INO: ()}
        self._identity_of: dict[int, tuple] = {}  # of the images' inodes
        self._lock = threading.Lock()

    def _ino(self, key: Key, identity: tuple = ()) -> int:
        """The inode of `key`; `identity` tells a deleted and re-created image apart, so
        the kernel never serves the old one's cached pages for the new one."""
        with self._lock:
            ino = self._ino_of.get((*key, *identity))
            if ino is None:
                ino = len(self._key_of) + ROOT_INO
                self._ino_of[(*key, *identity)] = ino
                self._key_of[ino] = key
                self._identity_of[ino] = identity
            return ino

    def key(self, ino: int) -> Key:
        try:
            return self._key_of[ino]
        except KeyError:
            raise _enoent() from None

    def _current(self, ino: int) -> Key:
        """The key of `ino`, if the entry it names still exists (and is the same one)."""
        key = self.key(ino)
        if self._stat(key).ino != ino:
            raise _enoent()
        return key

    def attr(self, ino: int) -> Attr:
        key = self.key(ino)
        try:
            attr = self._stat(key)
        except FileNotFoundError:
            attr = None
        if attr is None or attr.ino != ino:
            return self._deleted_point(ino, key)
        return attr

    def _deleted_point(self, ino: int, key: Key) -> Attr:
        """The attributes of a point image whose name is gone but which is still in the
        trash (also marked to be purged when its open images close): an image open
        before the delete reads on, and like an unlinked file's, its fstat answers, with
        no link. ENOENT for anything else."""
        if len(key) != 3:
            raise _enoent()
        info = self.images.deleted_point_info(key[1], key[2], self._identity_of[ino])
        if info is None:
            raise _enoent()
        return Attr(ino, stat.S_IFREG | self.access.point_mode, size=info.size,
                    blocks=info.allocated // 512, mtime=info.mtime, nlink=0)

    def _stat(self, key: Key) -> Attr:
        """Attributes of the entry at `key`; its inode is allocated only if it exists."""
        if key[:1] == ("disks",) and len(key) == 2:
            info = self.images.disk_info(key[1])
            mode = self.access.mode
        elif len(key) == 3:
            info = self.images.point_info(key[1], key[2])
            mode = self.access.point_mode
        else:
            if len(key) == 2:
                self._has_disk(key[1])
            return Attr(
                self._ino(key), stat.S_IFDIR | self.access.dir_mode, mtime=self.mounted_at,
                nlink=2,
            )
        return Attr(
            self._ino(key, info.instance), stat.S_IFREG | mode, size=info.size,
            blocks=info.allocated // 512, mtime=info.mtime,
        )

    def _has_disk(self, name: str) -> None:
        """ENOENT unless there is a disk `name` (writable or not: its points directory)."""
        with self.index.read() as txn:
            if self.index.get_disk(txn, name) is None:
                raise _enoent()

    def _children(self, key: Key) -> list[tuple[str, Key]]:
        if key == ():
            return [(name, (name,)) for name in TOP]
        with self.index.read() as txn:
            if key == ("disks",):
                disks = [d for d in self.index.list_disks(txn) if d.writable]
                return [(d.name + IMAGE_SUFFIX, ("disks", d.name)) for d in disks]
            if key == ("points",):
                disks = self.index.list_disks(txn)
                return [(d.name, ("points", d.name)) for d in disks]
            if len(key) == 2:
                points = self.index.list_points(txn, key[1])
                return [(p.name + IMAGE_SUFFIX, (*key, p.name)) for p in points]
        raise OSError(errno.ENOTDIR, "not a directory")

    def lookup(self, parent: int, name: str) -> Attr:
        key = self.key(parent)
        if len(key) == 3 or (key[:1] == ("disks",) and len(key) == 2):
            raise OSError(errno.ENOTDIR, "not a directory")
        if key == ():
            child: Key = (name,)
            if name not in TOP:
                raise _enoent()
        elif key == ("points",):
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

    def open(self, ino: int, flags: int) -> Handle:
        """Open an image: points read-only (EROFS for writing), disks read-write."""
        key = self._current(ino)
        if key[:1] == ("disks",) and len(key) == 2:
            if flags & os.O_TRUNC:
                raise OSError(errno.EPERM, "disk images have a fixed size")
            return self.images.open_disk(key[1])
        if len(key) != 3:
            raise OSError(errno.EISDIR, "is a directory")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "recovery points are read-only")
        handle = self.images.open_point(key[1], key[2])
        if self._ino(key, handle.instance) != ino:  # re-created while the open waited
            handle.close()
            raise _enoent()
        return handle

    def entries_of_disk(self, name: str) -> list[tuple[int, str]]:
        """(parent inode, entry name) of every name the mount may show for disk `name`."""
        return [
            (self._ino(("disks",)), name + IMAGE_SUFFIX),
            (self._ino(("points",)), name),
        ]

    def image_path(self, disk: str) -> str:
        """The path of writable disk `disk`'s image, relative to the mountpoint."""
        return f"disks/{disk}{IMAGE_SUFFIX}"

    def entry_of_point(self, disk: str, name: str) -> tuple[int, bytes]:
        """(parent inode, entry name) of point `disk`@`name`'s image."""
        return self._ino(("points", disk)), os.fsencode(name + IMAGE_SUFFIX)

    def namespace_error(self, parent: int) -> int:
        """The errno for creating, removing or renaming entries under `parent`: the tree
        mirrors the index, and changes to it go through rpfs commands."""
        return errno.EROFS if self.key(parent)[:1] in ((), ("points",)) else errno.EPERM

    def setattr(self, ino: int, size: int | None) -> Attr:
        """Points are read-only; disks have a fixed size (other changes are ignored)."""
        key = self._current(ino)
        if len(key) == 3:
            raise OSError(errno.EROFS, "recovery points are read-only")
        if size is not None and size != self._stat(key).size:
            raise OSError(errno.EPERM, "disk images have a fixed size")
        return self._stat(key)
