"""Reading a point as a disk image: blocks resolved through the index, chunks fetched
from the store through one shared cache of decompressed blocks.

Everything here blocks (LMDB, pread, zstd): the FUSE layer calls it from worker threads.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from .errors import CorruptChunk, RpfsError
from .index import ZERO, PointRecord
from .repo import Repository

log = logging.getLogger(__name__)

PREFETCH_BLOCKS = 128  # blocks (8 MiB) a sequential reader's chunks are fetched ahead of it
PREFETCH_BATCH = 32  # blocks one prefetch task resolves, reads and decodes together


class ChunkCache:
    """A bounded LRU of decompressed blocks keyed by hash, fetching each miss once.

    Concurrent readers of the same missing chunk wait on the first fetch instead of
    reading and decompressing it again. Misses are loaded in batches (adjacent records
    with one pread) because a thread hand-off per 64 KiB block cost more than it bought:
    two threads decoding one block per task were slower than one thread (measured).
    `prefetch()` hands a sequential reader's next blocks to a small pool in such batches,
    so the reader finds them decoded (or in flight) when it gets there.
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
        """One decoded block; CorruptChunk if its record is bad."""
        result = self.get_many(txn, [digest])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def get_many(self, txn, digests: list[bytes]) -> list[bytes | BaseException]:
        """The decoded blocks of `digests` in order; a chunk that failed is its exception.

        The misses this call claims are loaded together on this thread; chunks another
        thread is loading are waited for.
        """
        results: list[bytes | BaseException | None] = [None] * len(digests)
        owned: list[tuple[bytes, Future]] = []
        waits: list[tuple[int, Future]] = []
        for i, digest in enumerate(digests):
            block, fut, owner = self._claim(digest)
            if block is not None:
                results[i] = block
                continue
            if owner:
                owned.append((digest, fut))
            waits.append((i, fut))
        if owned:
            self._load(txn, owned)
        for i, fut in waits:
            exc = fut.exception()
            results[i] = fut.result() if exc is None else exc
        return results  # type: ignore[return-value]

    def load(
        self, txn, blocks: Iterable[int], values: list[bytes], where: str
    ) -> list[bytes | None]:
        """The decoded blocks whose resolved values are `values` (None where ZERO). A bad
        chunk is logged as "`where` block N" and raised: the read fails with EIO."""
        loaded = iter(self.get_many(txn, [v for v in values if v != ZERO]))
        out: list[bytes | None] = []
        for block, value in zip(blocks, values, strict=True):
            data = None if value == ZERO else next(loaded)
            if isinstance(data, CorruptChunk):
                log.error("%s block %d: %s (chunk %s); the read fails with EIO",
                          where, block, data, value.hex()[:16])
            if isinstance(data, BaseException):
                raise data
            out.append(data)
        return out

    def prefetch(self, chain: list[tuple[int, int]], blocks: list[int]) -> None:
        """Start loading the chunks of `blocks` of the image read through `chain`, in
        batches of PREFETCH_BATCH; a failure surfaces when a reader asks for the block."""
        for i in range(0, len(blocks), PREFETCH_BATCH):
            self._pool.submit(self._prefetch, chain, blocks[i : i + PREFETCH_BATCH])

    def _prefetch(self, chain: list[tuple[int, int]], blocks: list[int]) -> None:
        index = self.repo.index
        try:
            with index.read() as txn:
                values = {index.resolve(txn, chain, b) for b in blocks}
                values.discard(ZERO)
                owned = []
                for digest in values:
                    _, fut, owner = self._claim(digest)
                    if owner:
                        owned.append((digest, fut))
                if owned:
                    self._load(txn, owned)  # settles its futures even when it fails
        except Exception as exc:  # nobody waits on this task: say it, readers fetch anew
            log.warning(
                "lineage %d blocks %d-%d: prefetch failed (%s); readers fetch them themselves",
                chain[0][0], blocks[0], blocks[-1], exc,
            )

    def _load(self, txn, owned: list[tuple[bytes, Future]]) -> None:
        """Locate, read and decode the chunks this thread claimed; settle their futures."""
        results: list[bytes | BaseException]
        try:
            locs = [self.repo.index.get_chunk(txn, digest) for digest, _ in owned]
            found = [i for i, loc in enumerate(locs) if loc is not None]
            decoded = iter(self.repo.store.get_many([(locs[i], owned[i][0]) for i in found]))
            results = [
                next(decoded) if loc is not None
                else CorruptChunk("-", 0, f"chunk {digest.hex()[:16]} is not in the index")
                for loc, (digest, _) in zip(locs, owned, strict=True)
            ]
        except BaseException as exc:  # e.g. an index error: every waiter must see it
            results = [exc] * len(owned)
        with self._lock:
            for (digest, _), result in zip(owned, results, strict=True):
                del self._inflight[digest]
                if not isinstance(result, BaseException):
                    self._blocks[digest] = result
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        for (_, fut), result in zip(owned, results, strict=True):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Readahead:
    """Detects a sequential reader and names the blocks coming up ahead of it."""

    def __init__(self, nblocks: int, window: int = PREFETCH_BLOCKS) -> None:
        self.nblocks = nblocks
        self.window = window
        self._next_offset = -1
        self._ahead = 0  # blocks below this were already handed to prefetch

    def after_read(self, offset: int, end: int, last: int) -> range | None:
        """Note a read of [offset, end) whose last block is `last`; the blocks that have
        just come within the window ahead of a sequential reader, for the caller to
        prefetch, or None."""
        sequential = offset == self._next_offset
        self._next_offset = end
        if not sequential:
            self._ahead = 0
            return None
        start = max(last + 1, self._ahead)
        stop = min(self.nblocks, last + 1 + self.window)
        if start >= stop:
            return None
        self._ahead = stop
        return range(start, stop)


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
        self.readahead = Readahead(-(-self.size // self.bs))

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the image size; CorruptChunk on bad data."""
        return self._read(offset, length, fetch=True)  # type: ignore[return-value]

    def read_cached(self, offset: int, length: int, fetch: bool = False) -> bytes | None:
        """The same bytes if every block is zero or decoded in the cache, else None; with
        `fetch`, missing chunks are loaded on the calling thread instead.

        Meant for the trio thread: a sequential reader whose next blocks the prefetcher has
        decoded is answered without a thread hand-off, and so is a lone small read (`fetch`),
        for which the hand-off would cost more than the work. A point still being archived
        may wait on its disk's locks, so it always answers None.
        """
        if self.overlay is not None:
            return None
        return self._read(offset, length, fetch)

    def _read(self, offset: int, length: int, fetch: bool) -> bytes | None:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        if self.overlay is not None:
            self._read_ahead(offset, end, last)
            parts = [self._archiving_block(block) for block in range(first, last + 1)]
        else:
            with self.repo.index.read() as txn:
                values = [
                    self.repo.index.resolve(txn, self.chain, b) for b in range(first, last + 1)
                ]
                if fetch:
                    # Before this read waits for its own blocks, so the ones ahead load
                    # meanwhile.
                    self._read_ahead(offset, end, last)
                    parts = self._decoded(txn, first, values)
                else:
                    parts = [self._zero if v == ZERO else self.cache.peek(v) for v in values]
                    if None in parts:
                        return None
                    self._read_ahead(offset, end, last)
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        start = offset - first * bs
        return data[start : start + (end - offset)]

    def _read_ahead(self, offset: int, end: int, last: int) -> None:
        ahead = self.readahead.after_read(offset, end, last)
        if ahead is not None:
            self.cache.prefetch(self.chain, list(ahead))

    def _archiving_block(self, block: int) -> bytes:
        """A block of a point still being archived: from the local file while frozen,
        else through a read transaction begun after that check (so it sees the extent
        the archiver committed before it unfroze the block)."""
        data = self.overlay.frozen_block(block, self.point.gen)
        if data is not None:
            return data
        with self.repo.index.read() as txn:
            return self._decoded(txn, block, [self.repo.index.resolve(txn, self.chain, block)])[0]

    def _decoded(self, txn, first: int, values: list[bytes]) -> list[bytes]:
        """The blocks first, first+1, ... whose resolved values are `values`."""
        where = f"disk {self.point.disk} point {self.point.name}"
        blocks = self.cache.load(txn, range(first, first + len(values)), values, where)
        return [self._zero if data is None else data for data in blocks]


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
