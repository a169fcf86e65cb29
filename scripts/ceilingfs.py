#!/usr/bin/env python3
"""The ceiling filesystem: the fastest a pyfuse3 filesystem can serve a file here.

One file, `image.img`, at the root of the mount, whose content is a bytearray held in
memory: a copy of SOURCE, or with SOURCE `pattern:SIZE` (e.g. `pattern:64M`) a
deterministic pattern of that size. Reads are slices of a memoryview of it and writes are
stored into it, both answered on the trio thread; fsync and flush do nothing (there is
nothing to make durable), the size is fixed and SOURCE is never written. Nothing else
happens. The mount uses rpfs's FUSE settings: the same options (allow_other,
default_permissions), keep_cache on an open for reading only (as rpfs on a point's open)
and not on one for writing (as rpfs on a writable disk's), st_blksize 1 MiB and the same
bdi read_ahead_kb, so the difference between rpfs and this is rpfs's own work, for reads
and for writes (the bench writes after all its reads: a write changes what reads see).

    python scripts/ceilingfs.py SOURCE MOUNTPOINT

Runs in the foreground; prints `ready` on stdout once it answers requests; SIGTERM,
SIGINT or `fusermount3 -u MOUNTPOINT` end it with a clean unmount.
"""

from __future__ import annotations

import argparse
import array
import errno
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from rpfs.names import parse_size

# The very values and code rpfs uses (the bench runs in rpfs's virtualenv).
from rpfs.serve.daemon import tune_readahead
from rpfs.serve.fuse import BLKSIZE
from rpfs.serve.fuse import ENTRY_TIMEOUT as TIMEOUT

log = logging.getLogger("ceilingfs")

FILE_NAME = b"image.img"
FILE_INO = pyfuse3.ROOT_INODE + 1


def pattern_bytes(size: int) -> bytes:
    """Deterministic, not all-zero content: each 8-byte word holds its own offset (LE)."""
    words = array.array("Q", range(0, size + 7, 8))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()[:size]


def load_source(source: str) -> bytearray:
    """The file's content, writable: a copy of `source` in memory (or the pattern)."""
    if source.startswith("pattern:"):
        return bytearray(pattern_bytes(parse_size(source.removeprefix("pattern:"))))
    with open(source, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)  # one copy, not a bytes object and then a bytearray of it
    return data


class CeilingOps(pyfuse3.Operations):
    def __init__(self, data: bytearray) -> None:
        super().__init__()
        self.data = data
        # reads slice this (no copy); writes assign into it. The bytearray is never
        # resized, which an exported memoryview would forbid anyway.
        self.view = memoryview(data)
        self.mtime_ns = time.time_ns()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
        elif ino == FILE_INO:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_nlink = 1
            entry.st_size = len(self.data)
            entry.st_blocks = (len(self.data) + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_blksize = BLKSIZE
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.mtime_ns
        entry.entry_timeout = entry.attr_timeout = TIMEOUT
        return entry

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != FILE_INO or (fields.update_size and attr.st_size != len(self.data)):
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk image's size is fixed
        return self._attr(inode)  # times and modes are not kept: nothing to change

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INO), 1)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk image's size is fixed
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        return pyfuse3.FileInfo(fh=FILE_INO, keep_cache=not writable)

    async def read(self, fh, off, size):
        return self.view[off : off + size]

    async def write(self, fh, off, buf):
        if not buf:
            return 0
        end = min(off + len(buf), len(self.data))
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # at or past the end: it does not grow
        self.view[off:end] = buf[: end - off]
        return end - off

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = (len(self.data) + 4095) // 4096
        out.f_files = 2
        out.f_namemax = 255
        return out


async def _serve(mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            # Once a stat is answered the kernel has our INIT reply, which caps the bdi's
            # readahead at what it offered (128 KiB): only now does a larger value stick.
            await trio.to_thread.run_sync(os.stat, mountpoint / FILE_NAME.decode())
            await trio.to_thread.run_sync(tune_readahead, mountpoint)
            print("ready", flush=True)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="file to serve (read into memory), or pattern:SIZE")
    parser.add_argument("mountpoint", help="an empty directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ceilingfs: %(message)s")
    mountpoint = Path(args.mountpoint).absolute()
    try:
        data = load_source(args.source)
    except (OSError, ValueError) as exc:
        print(f"ceilingfs: cannot load {args.source}: {exc}", file=sys.stderr)
        return 1
    if not mountpoint.is_dir() or os.path.ismount(mountpoint):
        print(f"ceilingfs: {mountpoint} is not an unmounted directory", file=sys.stderr)
        return 1
    options = set(pyfuse3.default_options) | {
        "fsname=ceilingfs", "subtype=ceilingfs", "allow_other",
    }
    try:
        pyfuse3.init(CeilingOps(data), str(mountpoint), options)
    except RuntimeError as exc:
        print(f"ceilingfs: cannot mount at {mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
