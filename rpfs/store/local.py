"""The POSIX pack backend: packs are files NNNNNNNN.pack in one directory.

Reads are one pread on a file descriptor kept open per pack (opening a pack per read cost
more than the read); a deleted pack's descriptor leaves the cache, closed once no read is
using it. A new pack's name is made durable (directory fsync) before anything is written
to it; appended bytes are made durable with fdatasync, which PackWriter calls before the
index transaction that names them (docs/design.md, "Order of durable writes").

`fsync_dir` is the one directory fsync of rpfs: whatever creates or renames a file that
must survive a crash calls it.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from .backend import PackMissing, PackUnavailable
from .format import pack_name, pack_number


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (files created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Open:
    """A cached read descriptor and the reads using it right now."""

    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0


class LocalBackend:
    """Packs in the directory `root` (REPO/packs)."""

    can_append = True
    remote = False
    connections = 2  # preads in flight that pay on one disk: the prefetch pool's size

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self._open: dict[int, _Open] = {}
        self._lock = threading.Lock()

    def path(self, pack: int) -> Path:
        return self.root / pack_name(pack)

    def _failed(self, pack: int, exc: OSError) -> OSError:
        """The backend's error for an OSError met reading `pack`."""
        kind = PackMissing if isinstance(exc, FileNotFoundError) else PackUnavailable
        return kind(exc.errno, exc.strerror, str(self.path(pack)))

    def read(self, pack: int, offset: int, length: int) -> bytes:
        entry = self._acquire(pack)
        try:
            return os.pread(entry.fd, length, offset)
        except OSError as exc:
            raise self._failed(pack, exc) from None
        finally:
            self._release(pack, entry)

    def advise(self, ranges: list[tuple[int, int, int]]) -> None:
        """POSIX_FADV_WILLNEED each range: the kernel queues their disk reads at once,
        where preads one after the other would wait for each in turn."""
        for pack, offset, length in ranges:
            try:
                entry = self._acquire(pack)
            except (PackMissing, PackUnavailable):
                continue  # the read that follows reports it
            try:
                os.posix_fadvise(entry.fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a hint
            finally:
                self._release(pack, entry)

    def _acquire(self, pack: int) -> _Open:
        """The pack's cached descriptor, counted as in use until `_release`."""
        with self._lock:
            entry = self._open.get(pack)
            if entry is None:
                try:
                    fd = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise self._failed(pack, exc) from None
                entry = self._open[pack] = _Open(fd)
            entry.users += 1
        return entry

    def _release(self, pack: int, entry: _Open) -> None:
        with self._lock:
            entry.users -= 1
            if not entry.users and self._open.get(pack) is not entry:
                os.close(entry.fd)  # deleted while this read used it

    def size(self, pack: int) -> int:
        try:
            return os.stat(self.path(pack)).st_size
        except OSError as exc:
            raise self._failed(pack, exc) from None

    def list(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise PackUnavailable(exc.errno, exc.strerror, self.location) from None
        return sorted(n for n in map(pack_number, names) if n is not None)

    def create(self, pack: int) -> _Appender:
        path = self.path(pack)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fsync_dir(self.root)  # the new file's name is durable before anything uses it
        return _Appender(fd, path)

    def truncate(self, pack: int, length: int) -> None:
        os.truncate(self.path(pack), length)

    def put(self, pack: int, data: bytes) -> None:
        path = self.path(pack)
        tmp = path.with_name(f".{path.name}.tmp")  # not a pack's name: `list` skips it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _Appender(fd, tmp).write(data, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(self.root)

    def delete(self, pack: int) -> None:
        self.forget(pack)
        self.path(pack).unlink(missing_ok=True)

    def forget(self, pack: int) -> None:
        """Close the cached read descriptor of `pack` (its file moves away: see
        tiered.py); a read using it now finishes first."""
        with self._lock:
            entry = self._open.pop(pack, None)
            if entry is not None and not entry.users:
                os.close(entry.fd)

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                os.close(entry.fd)
            self._open.clear()


class _Appender:
    """A new pack file open for writing (see backend.PackAppender)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def write(self, data: bytes, offset: int) -> None:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        if written != len(data):  # the filesystem filled up within the record
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def seal(self) -> None:
        try:
            os.fdatasync(self.fd)
        finally:
            os.close(self.fd)

    def close(self) -> None:
        os.close(self.fd)
