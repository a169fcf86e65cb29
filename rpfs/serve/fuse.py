"""pyfuse3 Operations: translate kernel requests to the Tree and image handles, nothing more.

Every call that can block for long (locks, fetches that other requests could overlap)
runs in a worker thread behind one CapacityLimiter, so the trio thread that pyfuse3 runs
all requests on never waits on them. Reads are the measured exception: one whose blocks
are at hand, or a small one alone in flight whose read waits on no lock, is answered on
the trio thread, because the hand-off to a thread and back costs more than such a read;
other small reads of points go to the reader thread, which serves them in batches
(readqueue.py).
Only FUSEError may leave a handler: anything else would end the mount.

With the kernel's writeback cache (`mount --writeback`) the kernel owns the images' sizes,
so this layer also answers for what that changes: the flush a snapshot needs first, and a
cached write past a disk's end (docs/design.md, "Daemon and mount").
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyfuse3
import trio

from ..errors import ChunkError
from ..index import IndexDamaged
from .handles import INLINE_READ_MAX, INLINE_WRITE_MAX, Handle, Images
from .readqueue import ReadQueue, takes
from .vfs import Attr, Tree

log = logging.getLogger(__name__)

T = TypeVar("T")
ENTRY_TIMEOUT = 1.0  # seconds the kernel may trust a name or attribute
BLKSIZE = 1 << 20  # advertised I/O size: tools read in 1 MiB pieces
BUSY_HOLD = 0.05  # seconds reads keep going to threads after others were seen in flight
PROBE_EVERY = 16  # one in this many lone small reads still goes to a thread (see read())


class Operations(pyfuse3.Operations):
    def __init__(
        self, tree: Tree, images: Images, reads: ReadQueue, threads: int = 4,
        writeback: Path | None = None,
    ) -> None:
        """`writeback`: the mountpoint, to let the kernel cache buffered writes there
        (FUSE's writeback cache): they then reach `write` in large pieces at fsync, close
        or writeback time instead of one round trip per page-sized piece (see
        docs/performance.md), and the daemon must flush the mount before a snapshot
        (`DiskService.flush_cached_writes`)."""
        super().__init__()
        self.enable_writeback_cache = writeback is not None  # read by pyfuse3.init
        self._mountpoint = writeback
        self._trimming: set[str] = set()  # disks whose image size is being set (trim_size)
        self._trimming_lock = threading.Lock()
        self.tree = tree
        self.images = images
        self.reads = reads
        self.limiter = trio.CapacityLimiter(threads)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[str, Attr]]] = {}
        self._fh = itertools.count(1)
        self._reads = 0  # read requests in flight
        self._busy_until = 0.0  # monotonic time: reads see others in flight until then
        self._lone = itertools.count(1)

    def forget_disk(self, name: str) -> None:
        """Drop the kernel's cached entries of a deleted disk, before the command that
        deleted it returns. Call it from a worker thread, never from a request handler."""
        for parent, entry in self.tree.entries_of_disk(name):
            with contextlib.suppress(OSError):  # ENOENT: the kernel had nothing cached
                pyfuse3.invalidate_entry(parent, os.fsencode(entry))

    def forget_point(self, disk: str, name: str) -> None:
        """Drop the kernel's cached entry (or cached absence) of a point deleted or
        undeleted, so the name goes or comes at once; from a worker thread, as above."""
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(*self.tree.entry_of_point(disk, name))

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking `fn` in a worker thread; map errors to FUSEError."""
        with self._errors(fn):
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @contextlib.contextmanager
    def _errors(self, fn: Callable) -> Iterator[None]:
        """Map what `fn` raised to a FUSEError: EIO for bad or unreadable data (logged where
        it was met, with disk, point and block) and for internal errors."""
        try:
            yield
        except ChunkError:  # CorruptChunk or ChunkUnavailable
            raise pyfuse3.FUSEError(errno.EIO) from None
        except IndexDamaged as exc:  # the operator's to repair: one line, no traceback
            log.error("%s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", getattr(fn, "__name__", fn))
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_size = attr.size
        entry.st_blocks = attr.blocks
        entry.st_blksize = BLKSIZE
        entry.st_uid = self.tree.access.uid
        entry.st_gid = self.tree.access.gid
        ns = int(attr.mtime * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
        entry.entry_timeout = entry.attr_timeout = ENTRY_TIMEOUT
        return entry

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            text = os.fsdecode(name)
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        return self._entry(await self._run(self.tree.lookup, parent_inode, text))

    async def getattr(self, inode, ctx=None):
        return self._entry(await self._run(self.tree.attr, inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        size = attr.st_size if fields.update_size else None
        return self._entry(await self._run(self.tree.setattr, inode, size))

    async def _refuse(self, parent_inode: int) -> None:
        raise pyfuse3.FUSEError(await self._run(self.tree.namespace_error, parent_inode))

    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._refuse(parent_inode)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._refuse(parent_inode)

    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._refuse(parent_inode)

    async def symlink(self, parent_inode, name, target, ctx):
        await self._refuse(parent_inode)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._refuse(new_parent_inode)

    async def unlink(self, parent_inode, name, ctx):
        await self._refuse(parent_inode)

    async def rmdir(self, parent_inode, name, ctx):
        await self._refuse(parent_inode)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._refuse(parent_inode_old)

    async def opendir(self, inode, ctx):
        fh = next(self._fh)
        self._dirs[fh] = await self._run(self.tree.listdir, inode)
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), i + 1):
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def open(self, inode, flags, ctx):
        handle = await self._run(self.tree.open, inode, flags)
        fh = next(self._fh)
        self._handles[fh] = handle
        # A point never changes: the kernel may keep its pages across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=not handle.writable)

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    async def read(self, fh, off, size):
        handle = self._handle(fh)
        self._reads += 1
        try:
            # Answered on this thread when nothing needs fetching (measured: +26 % cold
            # sequential), or when a small read is alone: the thread hand-off then costs
            # more than the fetch (4 KiB qd1: 267 -> 163 us). But requests still queued in
            # the kernel are invisible here and would wait behind an inline fetch (qd16:
            # 3570 -> 3057 IOPS), so one lone read in PROBE_EVERY goes to a thread anyway:
            # meanwhile the queued ones arrive, and seeing them keeps reads on threads.
            now = time.monotonic()
            if self._reads > 1:
                self._busy_until = now + BUSY_HOLD
            lone_small = (
                size <= INLINE_READ_MAX and now >= self._busy_until
                and next(self._lone) % PROBE_EVERY != 0
            )
            # A lone small read fetches here, unless its fetch may wait on a lock another
            # thread holds; any other read is answered here only from what is at hand.
            read_here = (
                handle.read if lone_small and not handle.read_may_wait
                else handle.read_at_hand
            )
            with self._errors(read_here):
                data = read_here(off, size)
            if data is not None:
                return data
            if takes(handle, size):
                with self._errors(handle.read):
                    return await self.reads.read(handle.read_many, off, size)
            return await self._run(handle.read, off, size)
        finally:
            self._reads -= 1

    async def write(self, fh, off, buf):
        handle = self._handle(fh)
        if self._mountpoint is not None and off + len(buf) > handle.size:
            return await self._refuse_cached_past_end(handle, off, buf)
        # A small write into local blocks whose locks are free is a pwrite into the page
        # cache: cheaper here than the hand-off to a thread and back.
        if len(buf) <= INLINE_WRITE_MAX:
            with self._errors(handle.write_at_hand):
                written = handle.write_at_hand(off, buf)
            if written is not None:
                return written
        return await self._run(handle.write, off, buf)

    async def _refuse_cached_past_end(self, handle: Handle, off: int, buf: bytes) -> int:
        """Writeback: the kernel took a write past the disk's end into its pages and grew
        the image's size, which it owns in this mode. Keep what fits, then refuse, so
        fsync and close report ENOSPC, and set the kernel's size back."""
        if off < handle.size:
            await self._run(handle.write, off, buf)
        log.warning("disk %s: a write of %d bytes at %d reaches past its end (%d bytes): "
                    "refused", handle.disk, len(buf), off, handle.size)
        self._trim_size(handle.disk, handle.size)
        raise pyfuse3.FUSEError(errno.ENOSPC)

    def flush_cached_writes(self, disks: list[str]) -> None:
        """Bring the kernel's cached writes to the images of `disks` to the daemon now: an
        fsync of each image through the mount, from a thread other than the one serving
        requests, which must answer its WRITEs (and its FSYNC: the disk's sync).

        An fsync, not a syncfs: syncfs waits for the pages' writeback, which FUSE ends
        when a WRITE is queued, not answered, so under load a snapshot froze before its
        WRITE arrived (the point lacked a 4 KiB piece written before it; seen with
        another process dirtying 5 GB beside the test). fsync also waits for every WRITE
        of the inode to be answered (the kernel's fuse_sync_writes). Its descriptor is
        new, so a writeback error it reports stays reported to the writer's own."""
        for disk in disks:
            try:
                fd = os.open(self._mountpoint / self.tree.image_path(disk), os.O_RDONLY)
            except FileNotFoundError:
                continue  # no such writable disk: the snapshot says so
            try:
                os.fsync(fd)
            except OSError as exc:  # a refused cached write: the point holds the rest
                log.warning("disk %s: flushing its cached writes before a snapshot: %s",
                            disk, exc)
            finally:
                os.close(fd)

    def _trim_size(self, disk: str, size: int) -> None:
        """Set the kernel's size of disk `disk`'s image back to `size`, in a thread: a
        truncate to its own size through the mount is a no-op for the disk (setattr), and
        makes the kernel take the size and drop its pages past it."""
        with self._trimming_lock:
            if disk in self._trimming:
                return
            self._trimming.add(disk)

        def trim() -> None:
            try:
                os.truncate(self._mountpoint / self.tree.image_path(disk), size)
            except OSError as exc:  # the disk was closed and deleted meanwhile
                log.info("disk %s: its image's size not set back: %s", disk, exc)
            finally:
                with self._trimming_lock:
                    self._trimming.discard(disk)

        threading.Thread(target=trim, name=f"rpfs-trim-{disk}", daemon=True).start()

    async def fsync(self, fh, datasync):
        await self._run(self._handle(fh).sync)

    async def flush(self, fh):
        await self._run(self._handle(fh).sync)

    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await self._run(handle.close)

    async def statfs(self, ctx):
        st = self.images.statvfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = st.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        out.f_files, out.f_ffree, out.f_favail = st.f_files, st.f_ffree, st.f_favail
        out.f_namemax = 255
        return out
