"""A writable disk: reads, copy-on-read, writes and sync of its sparse local file.

Where each block's bytes are is the block map's (`blockmap.py`: states and the persist
order); the points in the making are `snapshot.py`'s. `fsync`/`flush` on the image call
`sync()`.

Concurrency: callers are worker threads. Writes and copy-on-read fetches of a block
hold that block's stripe lock, so a fetch never overwrites a newer write and two readers
of one missing block fetch it once. Reads of local blocks take no lock. The locks of one
disk, in the order they are taken: stripe locks (ascending) -> archive lock (Snapshots)
-> sync lock (BlockMap) -> LMDB write transaction.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import perms
from ..errors import SPACE_ERRNOS
from ..index import MAX_GEN, DiskRecord, Index, PointRecord
from ..lifecycle.purge import release
from ..lineage import can_differ, reads_differ
from ..names import ceil_div
from ..repo import Repository
from ..store.cache import ChunkCache, Readahead
from ..store.local import fsync_dir
from .blockmap import ABSENT, DIRTY, FROZEN, PRESENT, BlockMap
from .snapshot import Snapshots

log = logging.getLogger(__name__)

STRIPES = 64
FETCH_BATCH = 16  # absent blocks hydration fetches (and writes) at a time


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _next_data(fd: int, offset: int, size: int) -> int:
    """Where the first byte of data at or after `offset` lies in a file (`size` if none):
    the range before it is a hole. One lseek answers for all the zero blocks of a fetch;
    punching a hole instead takes a journal transaction on ext4 (measured: 0.6 s of a
    1 GiB copy-on-read read, most of whose zero blocks were holes already)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset
            return size
        raise


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of the local file so it reads as zeros and stays sparse."""
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LiveDisk:
    """Reads and writes of one writable disk image (blocking: call from threads).

    Owns the stripe locks: STRIPES locks, block b's is b % STRIPES, taken in ascending
    order. A writer or fetcher of a block holds its lock from checking the block's state
    to setting the new one; a barrier holds them all. Holds the block map (`map`) and
    the points in the making (`snapshots`).
    """

    def __init__(self, repo: Repository, cache: ChunkCache, record: DiskRecord) -> None:
        self.repo = repo
        self.index = repo.index
        self.cache = cache
        self.space = repo.space
        self.name = record.name
        self.record = record
        self.size = record.size
        self.bs = repo.block_size
        self.nblocks = ceil_div(self.size, self.bs)
        self.path = repo.root / record.file
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.map = BlockMap(self.index, record.file_id, self.nblocks,
                            lambda: os.fdatasync(self.fd), tracked=record.clean)
        self.reload_chain()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self.zero = bytes(self.bs)
        self.readahead = Readahead(self.nblocks)
        self.snapshots = Snapshots(self)
        if self.snapshots.archiving is None:
            self.map.thaw()
        self._mark_clean(False)

    def reload_chain(self) -> None:
        """Re-read where ABSENT blocks resolve (after an origin was detached or changed)."""
        with self.index.read() as txn:
            self.chain = self.index.chain(txn, self.record.lineage, MAX_GEN)

    def close(self) -> None:
        self.sync()
        self.snapshots.close()
        self._mark_clean(self.map.tracked)
        os.close(self.fd)

    def _mark_clean(self, clean: bool) -> None:
        with self.index.write() as txn:
            record = self.index.get_disk(txn, self.name)
            if record is not None and record.clean != clean:
                record.clean = clean
                self.index.put_disk(txn, record)

    # -- stripe locks ---------------------------------------------------------------------

    @contextmanager
    def locked_blocks(self, blocks: Iterable[int], wait: bool = True) -> Iterator[bool]:
        """Hold the stripe locks of arbitrary blocks, taken in ascending stripe order, and
        yield whether all are held: always, unless `wait=False`, which takes only those
        free at once and stops at the first that is not (the caller then backs off)."""
        stripes = sorted({b % STRIPES for b in blocks})
        held: list[threading.Lock] = []
        try:
            for s in stripes:
                if not self._stripes[s].acquire(blocking=wait):
                    break
                held.append(self._stripes[s])
            yield len(held) == len(stripes)
        finally:
            for lock in reversed(held):
                lock.release()

    def _locked(self, first: int, end: int):
        """Hold the stripe locks of blocks [first, end)."""
        return self.locked_blocks(range(first, min(end, first + STRIPES)))

    @contextmanager
    def barrier(self) -> Iterator[None]:
        """No write, copy-on-read or sync in flight while held; the file is made durable.

        Holds the sync lock too, so the caller may open the index write transaction and
        store the block map's pages in it (a freeze, a rollback).
        """
        with self._locked(0, STRIPES), self.map.quiesced():
            yield

    # -- reads ----------------------------------------------------------------------------

    def read_at_hand(self, offset: int, length: int) -> bytes | None:
        """The bytes if every block is local (one pread, on the caller's thread), else None:
        it never fetches (a copy-on-read takes stripe locks another thread may hold)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.bs, (end - 1) // self.bs
        if ABSENT in self.map.states[first : last + 1]:
            return None
        self._read_ahead(offset, end, last)
        return os.pread(self.fd, end - offset, offset)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.bs, (end - 1) // self.bs
        self._read_ahead(offset, end, last)
        # Below the space reserve (or on ENOSPC) the fetched blocks are served but not
        # kept: a read must not fail for space, and the next read fetches them again.
        keep = not self.space.low()
        try:
            fetched = self._fetch_absent(first, last + 1, keep)
        except OSError as exc:
            if not keep or exc.errno not in SPACE_ERRNOS:
                raise
            fetched = self._fetch_absent(first, last + 1, keep=False)
        # The fetched blocks as they were decoded (not read back from the local file),
        # runs of the others with one pread each.
        parts, block = [], first
        while block <= last:
            if block in fetched:
                parts.append(fetched[block])
                block += 1
                continue
            run_end = block + 1
            while run_end <= last and run_end not in fetched:
                run_end += 1
            parts.append(os.pread(self.fd, (run_end - block) * self.bs, block * self.bs))
            block = run_end
        start = offset - first * self.bs
        return b"".join(parts)[start : start + end - offset]

    def _read_ahead(self, offset: int, end: int, last: int) -> None:
        """Ahead of a sequential reader, prefetch the chunks of ABSENT blocks and start
        reading the local ones from disk (WILLNEED), so neither waits when it comes."""
        ahead = self.readahead.after_read(offset, end, last)
        if ahead is None:
            return
        states = self.map.states
        absent = [b for b in ahead if states[b] == ABSENT]
        if absent:
            self.cache.prefetch(self.chain, absent)
        if len(absent) < len(ahead):
            os.posix_fadvise(
                self.fd, ahead.start * self.bs, len(ahead) * self.bs, os.POSIX_FADV_WILLNEED
            )

    def _fetch_absent(self, first: int, end: int, keep: bool = True) -> dict[int, bytes]:
        """Copy-on-read of the ABSENT blocks in [first, end): the blocks it fetched.
        With `keep` False they are only read (they stay ABSENT)."""
        states = self.map.states
        blocks = [b for b in range(first, end) if states[b] == ABSENT]
        if not blocks:
            return {}
        with self.locked_blocks(blocks):
            blocks = [b for b in blocks if states[b] == ABSENT]  # a racer may have won
            return self._fetch(blocks, keep) if blocks else {}

    def pread_block(self, block: int) -> bytes:
        """Block `block` of the local file, the last one padded with zeros."""
        data = os.pread(self.fd, self.bs, block * self.bs)
        return data if len(data) == self.bs else data + bytes(self.bs - len(data))

    def _fetch(self, blocks: list[int], keep: bool = True) -> dict[int, bytes]:
        """Copy-on-read of ABSENT blocks, ascending (the caller holds their stripe locks);
        returns their bytes. Their chunks are loaded together, and each run of adjacent
        blocks is written to the local file with one pwritev (unless not `keep`)."""
        with self.index.read() as txn:
            values = [self.index.resolve(txn, self.chain, b) for b in blocks]
            datas = self.cache.load(txn, blocks, values, f"disk {self.name}")
        if not keep:
            return {b: self.zero if d is None else d for b, d in zip(blocks, datas, strict=True)}
        i, data_from = 0, -1  # the local file was a hole from the last lseek's offset to here
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and (
                (datas[j] is None) == (datas[i] is None)
            ):
                j += 1
            pos = blocks[i] * self.bs
            n = min((j - i) * self.bs, self.size - pos)
            if datas[i] is not None:
                _pwrite_all(self.fd, datas[i:j], pos, n)
                self.space.spend(n)
            else:
                if data_from <= pos:  # not known yet what lies at pos
                    data_from = _next_data(self.fd, pos, self.size)
                if data_from < pos + n:  # stale bytes in the run (we hold its locks)
                    punch_hole(self.fd, pos, n)
            self.map.set(blocks[i], blocks[j - 1] + 1, PRESENT)
            i = j
        return {b: self.zero if d is None else d for b, d in zip(blocks, datas, strict=True)}

    # -- writes ---------------------------------------------------------------------------

    def write_at_hand(self, offset: int, data: bytes) -> int | None:
        """Write now, on the caller's thread, if that waits on nothing: the range within
        the disk, every block local and not frozen (no fetch, no copy-before-write), its
        stripe locks free at once, space above the reserve; else None, and `write` does
        it (in a worker). Same result as `write` for such a range."""
        end = offset + len(data)
        if not data or end > self.size:
            return None
        first, last = offset // self.bs, (end - 1) // self.bs
        if last - first >= STRIPES:
            return None
        with self.locked_blocks(range(first, last + 1), wait=False) as held:
            if not held:
                return None
            states = self.map.states[first : last + 1]
            if ABSENT in states or FROZEN in states or self.space.low():
                return None
            written = os.pwrite(self.fd, data, offset)
            if written == 0:
                return None  # the filesystem is full: `write` says so
            self.space.spend(written)
            self.map.set(first, (offset + written - 1) // self.bs + 1, DIRTY)
            return written

    def write(self, offset: int, data: bytes) -> int:
        """Write like a block device of fixed size: short at the end, ENOSPC past it."""
        if offset >= self.size:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        end = min(offset + len(data), self.size)
        if end - offset < len(data):
            data = data[: end - offset]
        first, last = offset // self.bs, (end - 1) // self.bs
        with self._locked(first, last + 1):
            if self.space.low() and self._has_hole(first, last + 1):
                raise self.space.error(f"a write to new blocks of disk {self.name}")
            states = self.map.states
            frozen = [b for b in range(first, last + 1) if states[b] == FROZEN]
            # Copy-before-write: the point keeps the old bytes.
            self.snapshots.archive_locked(frozen)
            for b in {first, last}:
                covered = offset <= b * self.bs and end >= min((b + 1) * self.bs, self.size)
                if not covered and states[b] == ABSENT:
                    self._fetch([b])  # read-modify-write of a partial block
            written = os.pwrite(self.fd, data, offset)
            self.space.spend(written)
            if written < len(data):  # the filesystem filled up: keep what the file backs
                done = offset + written
                if done % self.bs and states[done // self.bs] == ABSENT:
                    done -= done % self.bs  # the rest of that block is not local
                if done <= offset:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = done - offset
            self.map.set(first, (offset + written - 1) // self.bs + 1, DIRTY)
        return written

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros (an NBD WRITE_ZEROES or TRIM):
        whole blocks become holes of the local file, DIRTY, so nothing is written out and
        the next point records them as zero blocks; the parts of blocks at the ends are
        written with zeros. A frozen block is archived first (copy-before-write)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        first = ceil_div(offset, self.bs)
        last = self.nblocks if end == self.size else end // self.bs  # whole blocks: [first, last)
        if first >= last:  # inside one block
            self.write(offset, bytes(end - offset))
            return
        if offset < first * self.bs:
            self.write(offset, bytes(first * self.bs - offset))
        if last * self.bs < end:
            self.write(last * self.bs, bytes(end - last * self.bs))
        with self._locked(first, last):
            states = self.map.states
            self.snapshots.archive_locked([b for b in range(first, last) if states[b] == FROZEN])
            start = first * self.bs
            punch_hole(self.fd, start, min(last * self.bs, self.size) - start)
            self.map.set(first, last, DIRTY)

    def local_data(self, first: int, end: int) -> list[bool]:
        """For each block of [first, end) whether the local file holds data there (not a
        hole): a local block that is a hole reads as zeros. One lseek per data run."""
        out = [False] * (end - first)
        pos, stop = first * self.bs, min(end * self.bs, self.size)
        while pos < stop:
            data = _next_data(self.fd, pos, self.size)
            if data >= stop:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), stop)
            for b in range(data // self.bs, ceil_div(hole, self.bs)):
                out[b - first] = True
            pos = hole
        return out

    def _has_hole(self, first: int, end: int) -> bool:
        """Whether blocks [first, end) of the local file hold a hole (a write there would
        allocate space). Asked only below the space reserve: one lseek."""
        start = first * self.bs
        return os.lseek(self.fd, start, os.SEEK_HOLE) < min(end * self.bs, self.size)

    # -- durability -----------------------------------------------------------------------

    def sync(self) -> None:
        """Make every completed write durable: file data first, then the block map."""
        self.map.persist()

    # -- readers of a point still archiving -----------------------------------------------

    def frozen_block(self, block: int, gen: int) -> bytes | None:
        """For readers of the archiving point: its block still in the local file, if so."""
        if not self.snapshots.pending(gen):
            return None
        # Under the stripe lock: an archiver holds it from unfreezing the block until its
        # extent is committed, so "not frozen" here means "readable through the index".
        with self._locked(block, block + 1):
            if self.map.states[block] == FROZEN:
                return self.pread_block(block)
        return None

    # -- rollback -------------------------------------------------------------------------

    def rollback(self, point: PointRecord) -> int:
        """Make the disk read as `point` (caller checked nobody has it open).

        A new lineage with origin `point` becomes the disk's; local blocks that differ
        from the point become ABSENT in the same commit, so they are fetched from the point
        on read or by hydration. Returns how many were dropped.
        """
        self.snapshots.finish()
        states = self.map.states
        with self.barrier():
            with self.index.read() as txn:
                changed = self._changed_since(txn, point)
                # After a crash a PRESENT block may hold an unrecorded write: drop them all.
                drop = [
                    b for b in self.map.local_blocks()
                    if states[b] != PRESENT or not self.map.tracked or changed(b)
                ]
            before = bytes(states)
            for b in drop:
                self.map.set(b, b + 1, ABSENT)
            try:
                with self.index.write() as txn:  # the barrier holds the sync lock
                    record = repoint(self.index, txn, self.name, (point.lineage, point.gen),
                                     point)
                    self.map.store_pages(txn)
            except BaseException:  # the disk stays as it was: its local blocks too
                self.map.restore(before)
                raise
            self.record = record
            self.reload_chain()
            # No hole punching here: fallocate took ~4 ms a call (26 s for a 2 GiB disk of
            # random writes). ABSENT bytes are never read; a fetch rewrites or punches them.
        log.info("disk %s: rolled back to %s, %d blocks to fetch again",
                 self.name, point.ref, len(drop))
        return len(drop)

    def _changed_since(self, txn, point: PointRecord) -> Callable[[int], bool]:
        """A test: does block b read differently at the disk's head than at `point`?

        Only the blocks `lineage.can_differ` names are resolved (both ways): one scan of
        the extents where the two chains part replaces two resolutions of every local
        block (measured: 0.13 s of a 2 GiB rollback to a point of an abandoned branch).
        """
        target = self.index.chain(txn, point.lineage, point.gen)
        candidates = can_differ(self.index, txn, self.chain, target)
        return lambda b: b in candidates and reads_differ(self.index, txn, self.chain, target, b)

    # -- hydration ------------------------------------------------------------------------

    def hydrate_range(self, first: int, end: int) -> int:
        """Fetch every ABSENT block in [first, end); returns how many were fetched."""
        self.space.check(f"hydrating disk {self.name}")
        return sum(
            len(self._fetch_absent(b, min(b + FETCH_BATCH, end)))
            for b in range(first, end, FETCH_BATCH)
        )


def _pwrite_all(fd: int, parts: list[bytes], offset: int, length: int) -> None:
    """Write the first `length` bytes of `parts` at `offset` (the last block of a disk may
    be short), with one pwritev; a short write is an error, never silently ignored."""
    total = sum(len(p) for p in parts)
    if total > length:
        parts = [*parts[:-1], parts[-1][: len(parts[-1]) - (total - length)]]
    written = os.pwritev(fd, parts, offset)
    if written != length:  # a regular file writes short when its filesystem fills up
        raise OSError(errno.ENOSPC, f"short write to the local file ({written} of {length} "
                      "bytes)")


def repoint(
    index: Index, txn, name: str, base: tuple[int, int] | None, point: PointRecord | None
) -> DiskRecord:
    """Give writable disk `name` a new lineage that reads through `base` (lineage, gen),
    or nothing (an empty disk): its head leaves the old lineage, whose extents no other
    reader reads go. `point` is the point at `base`, recorded as the disk's origin (None
    with a base: the origin stays as recorded). The caller sets the block map: every
    local block that differs from `base` must be ABSENT in the same commit."""
    lineage = index.new_lineage(txn, name, base)
    record = index.get_disk(txn, name)
    left = record.lineage
    record.lineage = lineage.id
    if point is not None:
        record.started_from(point)
    elif base is None:
        record.origin = record.origin_at = None
    index.put_disk(txn, record)
    release(index, txn, left, MAX_GEN)  # the head leaves that lineage
    return record


def create_local_file(path: Path, size: int) -> None:
    """A new sparse local file of `size` bytes, durable with its directory entry (removed
    again if that fails: no orphan file stays behind). An OSError names the file."""
    path.parent.mkdir(mode=perms.DIR_MODE, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    except BaseException as exc:
        path.unlink()
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
