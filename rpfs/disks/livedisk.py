"""A writable disk: a sparse local file plus a persistent per-block state map.

Block states:
    ABSENT   the local file holds nothing trustworthy; the block resolves through the
             disk's lineage and origins in the index (copy-on-read fetches it)
    PRESENT  the local file is authoritative and equals the newest point / origin
    DIRTY    the local file is authoritative and was written since the newest point
    FROZEN   belongs to the point being archived and is not archived yet; a write to it
             first archives it (copy-before-write)

Snapshot (`freeze`): under a barrier that holds every stripe lock (no write in flight),
fdatasync the file, then in one index transaction take generation g, create the point
("archiving") and turn DIRTY into FROZEN (every local block if the dirty map is not
trusted). Archiving copies FROZEN blocks into the store and, in one transaction, writes
their extents at g, the point's figures and their new map pages: a persisted FROZEN
state therefore always means "not archived yet", and a crash resumes where it stopped.

Durability: a state change reaches the index only after the local file's data is on
disk (fdatasync, then the LMDB commit of the changed map pages). So the persistent map
never calls a block present whose bytes might not be there; a crash forgets at most
states changed since the last `sync()`, and such blocks fall back to ABSENT (re-fetched
from the origin) or keep their older state. `fsync`/`flush` on the image call `sync()`.

Concurrency: callers are worker threads. Writes and copy-on-read fetches of a block
hold that block's stripe lock, so a fetch never overwrites a newer write and two readers
of one missing block fetch it once. Reads of local blocks take no lock. Lock order:
stripe locks (ascending) -> archive lock -> sync lock.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import perms
from ..errors import SPACE_ERRNOS
from ..index import MAX_GEN, ZERO, DiskRecord, Index, LineageRecord, PointRecord
from ..ingest import Ingest, examine
from ..lineage import can_differ, reads_differ
from ..repo import Repository
from ..store.cache import ChunkCache, Readahead

log = logging.getLogger(__name__)

ABSENT, PRESENT, DIRTY, FROZEN = 0, 1, 2, 3
PAGE_BLOCKS = 4096  # block states per LMDB value of the `blockmap` table
STRIPES = 64
ARCHIVE_BATCH = 64  # frozen blocks archived per index transaction
FETCH_BATCH = 16  # absent blocks hydration fetches (and writes) at a time
# The most blocks a writable disk may have. Its block states live in memory, one byte
# per block (and `rpfs disks` loads those of each closed disk), so this keeps them at
# most 4 GiB: 256 TiB at 64 KiB blocks, 16 TiB at 4 KiB; even with 4 MiB blocks far
# below the 2^63-1 bytes a file offset holds.
MAX_BLOCKS = 1 << 32

_FREEZE_DIRTY = bytes([ABSENT, PRESENT, FROZEN, FROZEN]) + bytes(range(4, 256))
_FREEZE_ALL = bytes([ABSENT, FROZEN, FROZEN, FROZEN]) + bytes(range(4, 256))
_LOCAL_BLOCK = re.compile(rb"[^\x00]")  # any state but ABSENT: scans the map at C speed
_UNFREEZE = bytes([ABSENT, PRESENT, DIRTY, DIRTY]) + bytes(range(4, 256))

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


def load_states(index: Index, txn, file_id: int, nblocks: int) -> bytearray:
    """The persisted block states of a disk's local file (ABSENT where none stored)."""
    states = bytearray(nblocks)
    for page, value in index.map_pages(txn, file_id):
        start = page * PAGE_BLOCKS
        n = min(len(value), nblocks - start)
        if n > 0:
            states[start : start + n] = value[:n]
    return states


class LiveDisk:
    """Reads and writes of one writable disk image (blocking: call from threads)."""

    def __init__(self, repo: Repository, cache: ChunkCache, record: DiskRecord) -> None:
        self.repo = repo
        self.index = repo.index
        self.cache = cache
        self.space = repo.space
        self.name = record.name
        self.record = record
        self.size = record.size
        self.bs = repo.block_size
        self.nblocks = -(-self.size // self.bs)
        self.path = repo.root / record.file
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        with self.index.read() as txn:
            self.states = load_states(self.index, txn, record.file_id, self.nblocks)
        self.reload_chain()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._pages: set[int] = set()
        self._sync_lock = threading.Lock()
        self._archive_lock = threading.Lock()
        self._ingest: Ingest | None = None
        self._zero = bytes(self.bs)
        self.readahead = Readahead(self.nblocks)
        # A map left by a crash may miss writes: the next point compares every block.
        self.tracked = record.clean
        # Points taken while `archiving` was pending, with nothing written since: they read
        # exactly as it does, so they complete with it instead of waiting for it.
        self.riders: list[PointRecord] = []
        self.archiving = self._find_archiving()
        if self.archiving is None and FROZEN in self.states:
            self.states[:] = self.states.translate(_UNFREEZE)
        self._mark_clean(False)

    def reload_chain(self) -> None:
        """Re-read where ABSENT blocks resolve (after an origin was detached or changed)."""
        with self.index.read() as txn:
            self.chain = self.index.chain(txn, self.record.lineage, MAX_GEN)

    def close(self) -> None:
        self.sync()
        if self._ingest is not None:
            self._ingest.close()
        self._mark_clean(self.tracked)
        os.close(self.fd)

    def _mark_clean(self, clean: bool) -> None:
        with self.index.write() as txn:
            record = self.index.get_disk(txn, self.name)
            if record is not None and record.clean != clean:
                record.clean = clean
                self.index.put_disk(txn, record)

    def _find_archiving(self) -> PointRecord | None:
        """The point whose frozen blocks are still to archive (the oldest pending one);
        newer pending points of the lineage are its riders."""
        with self.index.read() as txn:
            pending = sorted(
                (p for p in self.index.list_points(txn, self.name)
                 if p.state == "archiving" and p.lineage == self.record.lineage),
                key=lambda p: p.gen,
            )
            if not pending:
                return None
            self._prev_chain = self.index.chain(txn, pending[0].lineage, pending[0].gen - 1)
        self.riders = pending[1:]
        return pending[0]

    # -- state bookkeeping ----------------------------------------------------------------

    def _set(self, first: int, end: int, state: int) -> None:
        """Set blocks [first, end) to `state`; the change is persisted by the next sync."""
        self.states[first:end] = bytes([state]) * (end - first)
        for page in range(first // PAGE_BLOCKS, (end - 1) // PAGE_BLOCKS + 1):
            self._pages.add(page)  # after the state: a concurrent sync sees both or redoes

    def absent_blocks(self) -> int:
        return self.states.count(ABSENT)

    @property
    def needs_sync(self) -> bool:
        """Block states changed since the last sync."""
        return bool(self._pages)

    @contextmanager
    def _locked_blocks(self, blocks: Iterable[int]) -> Iterator[None]:
        """Hold the stripe locks of arbitrary blocks, in ascending stripe order."""
        stripes = sorted({b % STRIPES for b in blocks})
        for s in stripes:
            self._stripes[s].acquire()
        try:
            yield
        finally:
            for s in reversed(stripes):
                self._stripes[s].release()

    def _locked(self, first: int, end: int):
        """Hold the stripe locks of blocks [first, end)."""
        return self._locked_blocks(range(first, min(end, first + STRIPES)))

    # -- reads ----------------------------------------------------------------------------

    def read_at_hand(self, offset: int, length: int) -> bytes | None:
        """The bytes if every block is local (one pread, on the caller's thread), else None:
        it never fetches (a copy-on-read takes stripe locks another thread may hold)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.bs, (end - 1) // self.bs
        if ABSENT in self.states[first : last + 1]:
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
        absent = [b for b in ahead if self.states[b] == ABSENT]
        if absent:
            self.cache.prefetch(self.chain, absent)
        if len(absent) < len(ahead):
            os.posix_fadvise(
                self.fd, ahead.start * self.bs, len(ahead) * self.bs, os.POSIX_FADV_WILLNEED
            )

    def _fetch_absent(self, first: int, end: int, keep: bool = True) -> dict[int, bytes]:
        """Copy-on-read of the ABSENT blocks in [first, end): the blocks it fetched.
        With `keep` False they are only read (they stay ABSENT)."""
        blocks = [b for b in range(first, end) if self.states[b] == ABSENT]
        if not blocks:
            return {}
        with self._locked_blocks(blocks):
            blocks = [b for b in blocks if self.states[b] == ABSENT]  # a racer may have won
            return self._fetch(blocks, keep) if blocks else {}

    def _pread_block(self, block: int) -> bytes:
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
            return {b: self._zero if d is None else d for b, d in zip(blocks, datas, strict=True)}
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
            self._set(blocks[i], blocks[j - 1] + 1, PRESENT)
            i = j
        return {b: self._zero if d is None else d for b, d in zip(blocks, datas, strict=True)}

    # -- writes ---------------------------------------------------------------------------

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
            frozen = [b for b in range(first, last + 1) if self.states[b] == FROZEN]
            self._archive_locked(frozen)  # copy-before-write: the point keeps the old bytes
            for b in {first, last}:
                covered = offset <= b * self.bs and end >= min((b + 1) * self.bs, self.size)
                if not covered and self.states[b] == ABSENT:
                    self._fetch([b])  # read-modify-write of a partial block
            written = os.pwrite(self.fd, data, offset)
            self.space.spend(written)
            if written < len(data):  # the filesystem filled up: keep what the file backs
                done = offset + written
                if done % self.bs and self.states[done // self.bs] == ABSENT:
                    done -= done % self.bs  # the rest of that block is not local
                if done <= offset:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = done - offset
            self._set(first, (offset + written - 1) // self.bs + 1, DIRTY)
        return written

    def _has_hole(self, first: int, end: int) -> bool:
        """Whether blocks [first, end) of the local file hold a hole (a write there would
        allocate space). Asked only below the space reserve: one lseek."""
        start = first * self.bs
        return os.lseek(self.fd, start, os.SEEK_HOLE) < min(end * self.bs, self.size)

    # -- durability -----------------------------------------------------------------------

    def sync(self) -> None:
        """Make every completed write durable: file data first, then the block map."""
        with self._sync_lock:
            values = self._take_pages()
            try:
                os.fdatasync(self.fd)
                if values:
                    with self.index.write() as txn:
                        self._put_pages(txn, values)
            except BaseException:
                self._pages.update(page for page, _ in values)  # still to persist
                raise

    def _take_pages(self) -> list[tuple[int, bytes]]:
        """Snapshot the changed map pages (caller holds the sync lock, then fdatasyncs)."""
        pages = []
        while self._pages:
            try:
                pages.append(self._pages.pop())
            except KeyError:
                break
        return [(p, bytes(self.states[p * PAGE_BLOCKS : (p + 1) * PAGE_BLOCKS])) for p in pages]

    def _put_pages(self, txn, values: list[tuple[int, bytes]]) -> None:
        for page, value in values:
            self.index.put_map_page(txn, self.record.file_id, page, value)

    # -- snapshots ------------------------------------------------------------------------

    @contextmanager
    def barrier(self) -> Iterator[None]:
        """No write, copy-on-read or sync in flight while held; the file is made durable.

        Holds the sync lock too, so the caller may open the index write transaction:
        the lock order is stripes -> archive lock -> sync lock -> LMDB write transaction.
        """
        with self._locked(0, STRIPES), self._sync_lock:
            os.fdatasync(self.fd)
            yield

    def freeze(self, txn, name: str, now: float) -> PointRecord:
        """Create point `name` at a new generation (caller holds barrier(), checked that
        the name is free, and commits txn).

        Call `frozen(point)` after the transaction commits.
        """
        index = self.index
        lineage = index.get_lineage(txn, self.record.lineage)
        base = index.point_at(txn, lineage.id, lineage.head_gen) if lineage.head_gen else (
            index.point_at(txn, lineage.parent, lineage.parent_gen) if lineage.parent else None
        )
        lineage.head_gen += 1
        index.put_lineage(txn, lineage)
        old = self._before_freeze = bytes(self.states)
        if self.archiving is not None:
            if self.must_finish_archive:
                raise RuntimeError(f"disk {self.name}: freeze while archiving with writes")
            frozen = 0  # a rider: its blocks are the pending point's, nothing to freeze
        else:
            self.states[:] = self.states.translate(
                _FREEZE_DIRTY if self.tracked else _FREEZE_ALL
            )
            frozen = self.states.count(FROZEN)
            for p in range(-(-self.nblocks // PAGE_BLOCKS)):
                window = slice(p * PAGE_BLOCKS, (p + 1) * PAGE_BLOCKS)
                if old[window] != self.states[window]:
                    self._pages.add(p)
            self._put_pages(txn, self._take_pages())  # the barrier made the data durable
            self._prev_chain = index.chain(txn, lineage.id, lineage.head_gen - 1)
        point = PointRecord(
            disk=self.name, name=name, lineage=lineage.id, gen=lineage.head_gen, created=now,
            size=self.size, allocated_blocks=base.allocated_blocks if base else 0,
            method="tracked" if self.tracked else "full-compare",
            state="archiving" if frozen or self.archiving else "complete",
            frozen_blocks=frozen,
        )
        index.put_point(txn, point)
        return point

    @property
    def must_finish_archive(self) -> bool:
        """A point is still archiving and something was written since (or the map is not
        trusted): the next point must wait for that archive. Otherwise the next point
        rides on the pending one. Exact only under barrier()."""
        return self.archiving is not None and (not self.tracked or DIRTY in self.states)

    def unfreeze(self) -> None:
        """The freeze's transaction did not commit: take back its state changes."""
        self.states[:] = self._before_freeze
        self._pages.update(range(-(-self.nblocks // PAGE_BLOCKS)))

    def frozen(self, point: PointRecord) -> None:
        """The freeze committed: start tracking writes anew and archive `point` (or let
        it ride on the point being archived)."""
        self.tracked = True
        if self.archiving is not None:
            self.riders.append(point)
        else:
            self.archiving = point if point.state == "archiving" else None

    def archive_batch(self, limit: int = ARCHIVE_BATCH) -> int:
        """Archive up to `limit` frozen blocks; 0 once the point is complete."""
        if self.archiving is None:
            return 0
        blocks, pos = [], 0
        while len(blocks) < limit:
            pos = self.states.find(FROZEN, pos)
            if pos < 0:
                break
            blocks.append(pos)
            pos += 1
        if not blocks:
            self._complete()
            return 0
        with self._locked_blocks(blocks):
            return self._archive_locked([b for b in blocks if self.states[b] == FROZEN])

    def finish_archiving(self) -> None:
        while self.archive_batch():
            pass

    def frozen_block(self, block: int, gen: int) -> bytes | None:
        """For readers of the archiving point: its block still in the local file, if so."""
        point = self.archiving
        if point is None or (point.gen != gen and all(r.gen != gen for r in self.riders)):
            return None
        # Under the stripe lock: an archiver holds it from unfreezing the block until its
        # extent is committed, so "not frozen" here means "readable through the index".
        with self._locked(block, block + 1):
            if self.states[block] == FROZEN:
                return self._pread_block(block)
        return None

    def _archive_locked(self, blocks: list[int]) -> int:
        """Copy frozen `blocks` into the point (caller holds their stripe locks).

        All or nothing: if anything fails (a full disk, say), the blocks stay FROZEN, the
        records this batch appended are cut from the pack, and the next attempt starts
        on a new Ingest. Below the space reserve it does not start (NoSpace).
        """
        if not blocks:
            return 0
        with self._archive_lock:
            self.space.check(f"archiving point {self.archiving.ref}")
            ingest = self._ingest = self._ingest or Ingest(self.repo)
            try:
                self._archive_into(ingest, blocks)
            except BaseException:
                self._ingest = None
                for b in blocks:
                    self._set(b, b + 1, FROZEN)
                try:
                    ingest.discard()
                except OSError as exc:  # left as garbage that nothing names
                    log.warning("disk %s: cannot remove unregistered pack bytes: %s",
                                self.name, exc)
                raise
        return len(blocks)

    def _archive_into(self, ingest: Ingest, blocks: list[int]) -> None:
        point = self.archiving
        stored_before = ingest.bytes_stored
        changes = []
        with self.index.read() as txn:
            for b in blocks:
                prev = self.index.resolve(txn, self._prev_chain, b)
                change = examine(self.index, txn, b, self._pread_block(b), self._zero, prev)
                if change is not None:
                    ingest.take(change)
                    changes.append(change)
        ingest.sync()
        for b in blocks:
            self._set(b, b + 1, PRESENT)
        with self._sync_lock:
            values = self._take_pages()
            try:
                os.fdatasync(self.fd)
                with self.index.write() as txn:
                    ingest.register(txn)
                    for change in changes:
                        self.index.put_extent(txn, point.lineage, change.block, point.gen,
                                              change.value)
                        if change.value != ZERO:
                            self.index.incref(txn, change.value)
                    rec = self.index.get_point(txn, point.disk, point.name)
                    rec.archived_blocks += len(blocks)
                    rec.blocks_written += len(changes)
                    rec.bytes_stored += ingest.bytes_stored - stored_before
                    rec.allocated_blocks += sum(c.allocated_delta for c in changes)
                    self.index.put_point(txn, rec)
                    self._put_pages(txn, values)
            except BaseException:
                self._pages.update(page for page, _ in values)
                raise
        ingest.committed()
        self.archiving = rec

    def _complete(self) -> None:
        # The sync lock keeps this out of a barrier, so a point is never made a rider
        # between this commit and the end of the freeze that took it.
        with self._archive_lock, self._sync_lock:
            point = self.archiving
            if point is None:
                return
            with self.index.write() as txn:
                rec = self.index.get_point(txn, point.disk, point.name)
                rec.state = "complete"
                self.index.put_point(txn, rec)
                for rider in self.riders:
                    other = self.index.get_point(txn, rider.disk, rider.name)
                    other.state, other.allocated_blocks = "complete", rec.allocated_blocks
                    self.index.put_point(txn, other)
            self.archiving, riders, self.riders = None, self.riders, []
        log.info("disk %s: point %s archived (%d blocks written, %d bytes stored)",
                 self.name, rec.name, rec.blocks_written, rec.bytes_stored)
        for rider in riders:
            log.info("disk %s: point %s complete with %s (nothing written between them)",
                     self.name, rider.name, rec.name)

    # -- rollback -------------------------------------------------------------------------

    def rollback(self, point: PointRecord) -> int:
        """Make the disk read as `point` (caller checked nobody has it open).

        A new lineage with origin `point` becomes the disk's; local blocks that differ
        from the point become ABSENT in the same commit, so they are fetched from the point
        on read or by hydration. Returns how many were dropped.
        """
        self.finish_archiving()
        with self.barrier():
            with self.index.read() as txn:
                changed = self._changed_since(txn, point)
                local = (m.start() for m in _LOCAL_BLOCK.finditer(self.states))
                # After a crash a PRESENT block may hold an unrecorded write: drop them all.
                drop = [
                    b for b in local
                    if self.states[b] != PRESENT or not self.tracked or changed(b)
                ]
            before = bytes(self.states)
            for b in drop:
                self._set(b, b + 1, ABSENT)
            try:
                with self.index.write() as txn:  # the barrier holds the sync lock
                    lineage = LineageRecord(
                        self.index.next_id(txn, "lineage"), parent=point.lineage,
                        parent_gen=point.gen, disks=[self.name],
                    )
                    self.index.put_lineage(txn, lineage)
                    record = self.index.get_disk(txn, self.name)
                    record.lineage, record.origin = lineage.id, point.ref
                    self.index.put_disk(txn, record)
                    self._put_pages(txn, self._take_pages())
            except BaseException:  # the disk stays as it was: its local blocks too
                self.states[:] = before
                self._pages.update(range(-(-self.nblocks // PAGE_BLOCKS)))
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
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as exc:
        path.unlink()
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
