"""Restore: write a point to a file or block device, leaving holes where it reads zeros."""

from __future__ import annotations

import errno
import functools
import os
import stat
from pathlib import Path

from .disks.point import PointImage
from .errors import RpfsError
from .pipeline import ordered_map
from .progress import ProgressFn

BATCH_BYTES = 4 << 20


def _open_target(target: Path, size: int, force: bool) -> tuple[int, bool]:
    """Open the target; refuse to overwrite a non-empty file or a too-small device."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            os.close(fd)
            raise RpfsError(f"device {target} has {dev_size} bytes, the point needs {size}")
        return fd, False
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RpfsError(f"restore target {target} is neither a regular file nor a block device")
    if st is not None and st.st_size and not force:
        raise RpfsError(
            f"restore target {target} exists and is not empty; pass --force to overwrite it"
        )
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RpfsError(f"cannot create {target}: {exc.strerror}") from None
    return fd, True


def restore(
    image: PointImage, target: Path, force: bool, progress: ProgressFn | None = None
) -> None:
    """Write every byte of `image` to `target`; zero blocks become holes in a file."""
    fd, sparse = _open_target(target, image.size, force)
    try:
        bs = image.bs
        zero = bytes(bs)
        offsets = range(0, image.size, BATCH_BYTES)
        read = functools.partial(_read_batch, image)
        for offset, data in ordered_map(read, offsets):
            for pos in range(0, len(data), bs):
                piece = data[pos : pos + bs]  # bytes: its == is a memcmp
                if not (sparse and piece == zero[: len(piece)]):
                    _write(fd, piece, offset + pos)
            if progress:
                progress(offset + len(data), image.size)
        if sparse:
            os.ftruncate(fd, image.size)
        os.fsync(fd)
    except OSError as exc:  # a full or failing target: name it, not the repository
        raise OSError(exc.errno, exc.strerror, exc.filename or str(target)) from None
    finally:
        os.close(fd)


def _write(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of `data`; a short write (the target filled up) is ENOSPC."""
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_batch(image: PointImage, offset: int) -> bytes:
    return image.read(offset, BATCH_BYTES)
