"""A writable disk: a sparse local file plus a persistent per-block state map.

Block states:
    ABSENT   the local file holds nothing trustworthy; the block resolves through the
             disk's lineage and origins in the index (copy-on-read fetches it)
    PRESENT  the local file is authoritative and equals the newest point / origin
    DIRTY    the local file is authoritative and was written since the newest point

Durability: a state change reaches the index only after the local file's data is on
disk (fdatasync, then the LMDB commit of the changed map pages). So the persistent map
never calls a block present whose bytes might not be there; a crash forgets at most
states changed since the last `sync()`, and such blocks fall back to ABSENT (re-fetched
from the origin) or keep their older state. `fsync`/`flush` on the image call `sync()`.

Concurrency: callers are worker threads. Writes and copy-on-read fetches of a block
hold that block's stripe lock, so a fetch never overwrites a newer write and two readers
of one missing block fetch it once. Reads of local blocks take no lock.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CorruptChunk
from .image import ChunkCache
from .index import MAX_GEN, ZERO, DiskRecord, Index, u64
from .repo import Repository

log = logging.getLogger(__name__)

ABSENT, PRESENT, DIRTY = 0, 1, 2
PAGE_BLOCKS = 4096  # block states per LMDB value of the `blockmap` table
STRIPES = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of the local file so it reads as zeros and stays sparse."""
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _page_key(file_id: int, page: int) -> bytes:
    return u64(file_id) + u64(page)


def load_states(index: Index, txn, file_id: int, nblocks: int) -> bytearray:
    """The persisted block states of a disk's local file (ABSENT where none stored)."""
    states = bytearray(nblocks)
    prefix = u64(file_id)
    with txn.cursor(db=index.db["blockmap"]) as cur:
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:8] != prefix:
                    break
                start = int.from_bytes(key[8:], "big") * PAGE_BLOCKS
                n = min(len(value), nblocks - start)
                if n > 0:
                    states[start : start + n] = value[:n]
    return states


def drop_states(index: Index, txn, file_id: int) -> None:
    prefix = u64(file_id)
    with txn.cursor(db=index.db["blockmap"]) as cur:
        if cur.set_range(prefix):
            while cur.key()[:8] == prefix:
                if not cur.delete():
                    break


class LiveDisk:
    """Reads and writes of one writable disk image (blocking: call from threads)."""

    def __init__(self, repo: Repository, cache: ChunkCache, record: DiskRecord) -> None:
        self.repo = repo
        self.index = repo.index
        self.cache = cache
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
        self._zero = bytes(self.bs)

    def reload_chain(self) -> None:
        """Re-read where ABSENT blocks resolve (after an origin was detached or changed)."""
        with self.index.read() as txn:
            self.chain = self.index.chain(txn, self.record.lineage, MAX_GEN)

    def close(self) -> None:
        self.sync()
        os.close(self.fd)

    # -- state bookkeeping ----------------------------------------------------------------

    def _set(self, first: int, end: int, state: int) -> None:
        """Set blocks [first, end) to `state`; the change is persisted by the next sync."""
        self.states[first:end] = bytes([state]) * (end - first)
        for page in range(first // PAGE_BLOCKS, (end - 1) // PAGE_BLOCKS + 1):
            self._pages.add(page)  # after the state: a concurrent sync sees both or redoes

    @property
    def needs_sync(self) -> bool:
        """Block states changed since the last sync."""
        return bool(self._pages)

    @contextmanager
    def _locked(self, first: int, end: int) -> Iterator[None]:
        """Hold the stripe locks of blocks [first, end), in a fixed order."""
        stripes = sorted({b % STRIPES for b in range(first, min(end, first + STRIPES))})
        for s in stripes:
            self._stripes[s].acquire()
        try:
            yield
        finally:
            for s in reversed(stripes):
                self._stripes[s].release()

    # -- reads ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.bs, (end - 1) // self.bs
        if ABSENT not in self.states[first : last + 1]:
            return os.pread(self.fd, end - offset, offset)
        parts = [self._block(b) for b in range(first, last + 1)]
        start = offset - first * self.bs
        return b"".join(parts)[start : start + end - offset]

    def _block(self, block: int) -> bytes:
        if self.states[block] == ABSENT:
            with self._locked(block, block + 1):
                if self.states[block] == ABSENT:
                    return self._fetch(block)
        return self._pread_block(block)

    def _pread_block(self, block: int) -> bytes:
        data = os.pread(self.fd, self.bs, block * self.bs)
        return data if len(data) == self.bs else data + bytes(self.bs - len(data))

    def _fetch(self, block: int) -> bytes:
        """Copy-on-read of an ABSENT block (caller holds its stripe lock)."""
        with self.index.read() as txn:
            value = self.index.resolve(txn, self.chain, block)
            if value == ZERO:
                data = self._zero
            else:
                try:
                    data = self.cache.get(txn, value)
                except CorruptChunk as exc:
                    log.error(
                        "disk %s block %d: %s (chunk %s); the read fails with EIO",
                        self.name, block, exc, value.hex()[:16],
                    )
                    raise
        pos = block * self.bs
        n = min(self.bs, self.size - pos)
        if value == ZERO:
            punch_hole(self.fd, pos, n)  # the local file may hold stale bytes there
        else:
            os.pwrite(self.fd, data[:n], pos)
        self._set(block, block + 1, PRESENT)
        return data

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
            for b in {first, last}:
                covered = offset <= b * self.bs and end >= min((b + 1) * self.bs, self.size)
                if not covered and self.states[b] == ABSENT:
                    self._fetch(b)  # read-modify-write of a partial block
            os.pwrite(self.fd, data, offset)
            self._set(first, last + 1, DIRTY)
        return len(data)

    # -- durability -----------------------------------------------------------------------

    def sync(self) -> None:
        """Make every completed write durable: file data first, then the block map."""
        with self._sync_lock:
            pages = []
            while self._pages:
                try:
                    pages.append(self._pages.pop())
                except KeyError:
                    break
            values = [
                (p, bytes(self.states[p * PAGE_BLOCKS : (p + 1) * PAGE_BLOCKS])) for p in pages
            ]
            os.fdatasync(self.fd)
            if values:
                with self.index.write() as txn:
                    for page, value in values:
                        txn.put(
                            _page_key(self.record.file_id, page), value,
                            db=self.index.db["blockmap"],
                        )

    # -- hydration ------------------------------------------------------------------------

    def hydrate_range(self, first: int, end: int) -> int:
        """Fetch every ABSENT block in [first, end); returns how many were fetched."""
        fetched = 0
        for b in range(first, end):
            if self.states[b] == ABSENT:
                with self._locked(b, b + 1):
                    if self.states[b] == ABSENT:
                        self._fetch(b)
                        fetched += 1
        return fetched


def create_local_file(path: Path, size: int) -> None:
    """A new sparse local file of `size` bytes, durable with its directory entry."""
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
