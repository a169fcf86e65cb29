"""Reading a point as a disk image: blocks resolved through the index, chunks fetched
from the store through one shared cache of decompressed blocks.

Everything here blocks (LMDB, pread, zstd): the FUSE layer calls it from worker threads.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from .errors import CorruptChunk, RpfsError
from .index import ZERO, PointRecord
from .repo import Repository

log = logging.getLogger(__name__)

PREFETCH_BLOCKS = 32  # blocks a sequential reader's chunks are fetched ahead of it


class ChunkCache:
    """A bounded LRU of decompressed blocks keyed by hash, fetching each miss once.

    Concurrent readers of the same missing chunk wait on the first fetch instead of
    reading and decompressing it again. `prefetch()` starts fetches in a small pool, so
    a sequential reader finds the next blocks decoded (or in flight) when it gets there.
    """

    def __init__(
        self, repo: Repository, capacity_bytes: int = 32 << 20, prefetch_workers: int = 2
    ) -> None:
        self.repo = repo
        self.capacity = max(1, capacity_bytes // repo.block_size)
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="rpfs-prefetch")

    def _claim(self, digest: bytes) -> tuple[bytes | None, Future | None, bool]:
        """(cached block, future to wait on or fill, whether the caller must fill it)."""
        with self._lock:
            block = self._blocks.get(digest)
            if block is not None:
                self._blocks.move_to_end(digest)
                return block, None, False
            fut = self._inflight.get(digest)
            if fut is not None:
                return None, fut, False
            fut = self._inflight[digest] = Future()
            return None, fut, True

    def peek(self, digest: bytes) -> bytes | None:
        """The block if it is decoded already; never blocks on a fetch."""
        with self._lock:
            block = self._blocks.get(digest)
            if block is not None:
                self._blocks.move_to_end(digest)
            return block

    def get(self, txn, digest: bytes) -> bytes:
        block, fut, owner = self._claim(digest)
        if block is not None:
            return block
        if owner:
            self._load(digest, fut, txn)
        return fut.result()

    def prefetch(self, digests: list[bytes]) -> None:
        """Start fetching chunks not cached or in flight; errors surface at get()."""
        for digest in digests:
            _, fut, owner = self._claim(digest)
            if owner:
                self._pool.submit(self._load, digest, fut, None)

    def _load(self, digest: bytes, fut: Future, txn) -> None:
        try:
            if txn is None:
                with self.repo.index.read() as own:
                    loc = self.repo.index.get_chunk(own, digest)
            else:
                loc = self.repo.index.get_chunk(txn, digest)
            if loc is None:
                raise CorruptChunk("-", 0, f"chunk {digest.hex()[:16]} is not in the index")
            block = self.repo.store.get(loc, digest)
        except BaseException as exc:
            with self._lock:
                del self._inflight[digest]
            fut.set_exception(exc)
            return
        with self._lock:
            del self._inflight[digest]
            self._blocks[digest] = block
            if len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        fut.set_result(block)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Readahead:
    """Detects a sequential reader and prefetches the chunks of the blocks ahead of it."""

    def __init__(self, cache: ChunkCache, nblocks: int, window: int = PREFETCH_BLOCKS) -> None:
        self.cache = cache
        self.nblocks = nblocks
        self.window = window
        self._next_offset = -1
        self._ahead = 0  # blocks below this were already handed to prefetch

    def after_read(
        self, offset: int, end: int, last: int, chain: list[tuple[int, int]],
        wanted: Callable[[int], bool] | None = None,
    ) -> None:
        """Called after a read of [offset, end) whose last block is `last`; `wanted`
        filters the blocks ahead (a live disk prefetches only blocks it lacks)."""
        sequential = offset == self._next_offset
        self._next_offset = end
        if not sequential:
            self._ahead = 0
            return
        start = max(last + 1, self._ahead)
        stop = min(self.nblocks, last + 1 + self.window)
        if start >= stop:
            return
        self._ahead = stop
        blocks = [b for b in range(start, stop) if wanted is None or wanted(b)]
        if not blocks:  # e.g. a live disk whose next blocks are local
            return
        index = self.cache.repo.index
        with index.read() as txn:
            values = [index.resolve(txn, chain, b) for b in blocks]
        self.cache.prefetch([v for v in values if v != ZERO])


class FrozenSource(Protocol):
    def frozen_block(self, block: int, gen: int) -> bytes | None: ...


class PointImage:
    """A read-only view of one point: `read(offset, length)` returns its bytes.

    A point still being archived reads its not-yet-archived blocks from the live disk's
    local file (`overlay`), which copy-before-write keeps equal to the point.
    """

    def __init__(
        self, repo: Repository, cache: ChunkCache, point: PointRecord,
        overlay: FrozenSource | None = None,
    ) -> None:
        self.repo = repo
        self.cache = cache
        self.point = point
        self.overlay = overlay
        self.size = point.size
        self.bs = repo.block_size
        self._zero = bytes(self.bs)
        with repo.index.read() as txn:
            self.chain = repo.index.chain(txn, point.lineage, point.gen)
        self.readahead = Readahead(cache, -(-self.size // self.bs))

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the image size; CorruptChunk on bad data."""
        return self._read(offset, length, cached_only=False)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The same bytes if every block is zero or decoded in the cache, else None.

        Cheap enough to run on the trio thread: a sequential reader whose next blocks the
        prefetcher has decoded is answered without a thread hand-off.
        """
        if self.overlay is not None:
            return None
        return self._read(offset, length, cached_only=True)

    def _read(self, offset: int, length: int, cached_only: bool) -> bytes | None:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        if self.overlay is not None:
            parts = [self._archiving_block(block) for block in range(first, last + 1)]
        else:
            with self.repo.index.read() as txn:
                parts = []
                for block in range(first, last + 1):
                    value = self.repo.index.resolve(txn, self.chain, block)
                    if value == ZERO:
                        parts.append(self._zero)
                    elif cached_only:
                        data = self.cache.peek(value)
                        if data is None:
                            return None
                        parts.append(data)
                    else:
                        parts.append(self._fetch(txn, value, block))
        self.readahead.after_read(offset, end, last, self.chain)
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        start = offset - first * bs
        return data[start : start + (end - offset)]

    def _block(self, txn, block: int) -> bytes:
        value = self.repo.index.resolve(txn, self.chain, block)
        return self._zero if value == ZERO else self._fetch(txn, value, block)

    def _archiving_block(self, block: int) -> bytes:
        """A block of a point still being archived: from the local file while frozen,
        else through a read transaction begun after that check (so it sees the extent
        the archiver committed before it unfroze the block)."""
        data = self.overlay.frozen_block(block, self.point.gen)
        if data is not None:
            return data
        with self.repo.index.read() as txn:
            return self._block(txn, block)

    def _fetch(self, txn, digest: bytes, block: int) -> bytes:
        try:
            return self.cache.get(txn, digest)
        except CorruptChunk as exc:
            log.error(
                "disk %s point %s block %d: %s (chunk %s); the read fails with EIO",
                self.point.disk, self.point.name, block, exc, digest.hex()[:16],
            )
            raise


def open_point(repo: Repository, cache: ChunkCache, disk: str, name: str) -> PointImage:
    with repo.index.read() as txn:
        point = repo.index.get_point(txn, disk, name)
        if point is None:
            if repo.index.get_disk(txn, disk) is None:
                raise RpfsError(f"no disk named {disk!r}; 'rpfs points' lists disks and points")
            raise RpfsError(f"disk {disk} has no point {name!r}; 'rpfs points {disk}' lists them")
    if point.state != "complete":
        raise RpfsError(
            f"point {disk}@{name} is still being archived; run 'rpfs mount' (the daemon "
            "finishes it) and try again when 'rpfs points' shows it complete"
        )
    return PointImage(repo, cache, point)
