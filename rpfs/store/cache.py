"""The shared cache of decompressed blocks, and the prefetch pool that fills it ahead of
a sequential reader.

Everything here blocks (LMDB, pread, zstd): the FUSE layer calls it from worker threads.
A chunk found corrupt is marked for verify in the index by a thread of its own, never
by the reader: a read may run on the trio thread, and a damaged or full index must not
turn a failed read into a different failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import ChunkUnavailable, CorruptChunk
from ..index import ZERO
from ..repo import Repository

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
    so the reader finds them decoded (or in flight) when it gets there; the pool has as
    many threads as the pack backend takes concurrent requests.
    """

    def __init__(self, repo: Repository, capacity_bytes: int = 32 << 20) -> None:
        self.repo = repo
        self.capacity = max(1, capacity_bytes // repo.block_size)
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, Future] = {}
        self._marked: set[bytes] = set()  # chunks handed to the marker already
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            repo.store.backend.connections, thread_name_prefix="rpfs-prefetch"
        )
        self._marker = ThreadPoolExecutor(1, thread_name_prefix="rpfs-mark")  # idle: no thread

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
        """One decoded block; CorruptChunk if its record is bad, ChunkUnavailable if it
        could not be read now."""
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
        """The decoded blocks whose resolved values are `values` (None where ZERO). A
        chunk that failed is logged as "`where` block N" and raised: the read fails with
        EIO. A corrupt one is also marked for verify; one that could not be read now is
        not (a retry may read it)."""
        result = self.load_many(txn, [(blocks, values)], where)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def load_many(
        self, txn, reads: list[tuple[Iterable[int], list[bytes]]], where: str
    ) -> list[list[bytes | None] | BaseException]:
        """`load` for several reads at once, their chunks fetched together (each once): per
        read its blocks, or the exception of its first chunk that failed (logged and
        marked as `load` says), which fails that read alone."""
        wanted = list({v for _, values in reads for v in values if v != ZERO})
        loaded = dict(zip(wanted, self.get_many(txn, wanted), strict=True))
        out: list[list[bytes | None] | BaseException] = []
        for blocks, values in reads:
            datas = [None if value == ZERO else loaded[value] for value in values]
            failed = next(((block, value, data) for block, value, data
                           in zip(blocks, values, datas, strict=True)
                           if isinstance(data, BaseException)), None)
            if failed is not None:
                self._failed(where, *failed)
            out.append(datas if failed is None else failed[2])
        return out

    def _failed(self, where: str, block: int, value: bytes, exc: BaseException) -> None:
        """Log a read's failed chunk with the block that read it; mark a corrupt one."""
        if isinstance(exc, CorruptChunk):
            log.error("%s block %d: %s (chunk %s); the read fails with EIO, the chunk "
                      "is marked for verify", where, block, exc, value.hex()[:16])
            self._mark(value)
        elif isinstance(exc, ChunkUnavailable):
            log.error("%s block %d: %s (chunk %s); the read fails with EIO",
                      where, block, exc, value.hex()[:16])

    def _mark(self, digest: bytes) -> None:
        """Have the marker thread record `digest` as suspect in the index, once."""
        with self._lock:
            if digest in self._marked:
                return
            self._marked.add(digest)
        self._marker.submit(self._record_mark, digest)

    def _record_mark(self, digest: bytes) -> None:
        index = self.repo.index
        try:
            with index.write() as txn:
                index.mark_suspect(txn, digest, time.time())
        except Exception as exc:  # a damaged or full index: the read failed already
            log.warning("chunk %s: cannot mark it for verify in the index: %s",
                        digest.hex()[:16], exc)

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
            decoded = iter(self.repo.store.get_many([(locs[i], owned[i][0]) for i in found],
                                                    relocate=self.repo.locate))
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
        """Stop prefetching; wait for the marks handed out (the index must still be open)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._marker.shutdown(wait=True)

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
