"""Reading a point as a disk image: blocks resolved through the index, chunks fetched
from the store through one shared cache of decompressed blocks.

Everything here blocks (LMDB, pread, zstd): the FUSE layer calls it from worker threads.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Protocol

from .errors import CorruptChunk, RpfsError
from .index import ZERO, PointRecord
from .repo import Repository

log = logging.getLogger(__name__)


class ChunkCache:
    """A bounded LRU of decompressed blocks keyed by hash, fetching each miss once.

    Concurrent readers of the same missing chunk wait on the first reader's fetch
    instead of reading and decompressing it again.
    """

    def __init__(self, repo: Repository, capacity_bytes: int = 64 << 20) -> None:
        self.repo = repo
        self.capacity = max(1, capacity_bytes // repo.block_size)
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, Future] = {}
        self._lock = threading.Lock()

    def get(self, txn, digest: bytes) -> bytes:
        with self._lock:
            block = self._blocks.get(digest)
            if block is not None:
                self._blocks.move_to_end(digest)
                return block
            fut = self._inflight.get(digest)
            owner = fut is None
            if owner:
                fut = self._inflight[digest] = Future()
        if not owner:
            return fut.result()
        try:
            loc = self.repo.index.get_chunk(txn, digest)
            if loc is None:
                raise CorruptChunk("-", 0, f"chunk {digest.hex()[:16]} is not in the index")
            block = self.repo.store.get(loc, digest)
        except BaseException as exc:
            with self._lock:
                del self._inflight[digest]
            fut.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[digest]
            self._blocks[digest] = block
            if len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        fut.set_result(block)
        return block


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

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the image size; CorruptChunk on bad data."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        parts = []
        with self.repo.index.read() as txn:
            for block in range(first, last + 1):
                data = self.overlay.frozen_block(block, self.point.gen) if self.overlay else None
                if data is None:
                    value = self.repo.index.resolve(txn, self.chain, block)
                    data = self._zero if value == ZERO else self._fetch(txn, value, block)
                parts.append(data)
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        start = offset - first * bs
        return data[start : start + (end - offset)]

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
