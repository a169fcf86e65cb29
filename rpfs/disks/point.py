"""Reading a point as a disk image: blocks resolved through the index, chunks fetched
from the store through the shared cache of decompressed blocks.

Everything here blocks (LMDB, pread, zstd): the FUSE layer calls it from worker threads.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import RpfsError
from ..index import ZERO, PointRecord, PointState
from ..names import ceil_div
from ..repo import Repository
from ..store.cache import ChunkCache, Readahead


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
        self.readahead = Readahead(ceil_div(self.size, self.bs))

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the image size; CorruptChunk on bad
        data, ChunkUnavailable on data that could not be read now."""
        return self._read(offset, length, fetch=True)  # type: ignore[return-value]

    def read_at_hand(self, offset: int, length: int) -> bytes | None:
        """The same bytes as `read` if every block is zero or decoded in the cache, else
        None: it never fetches, so it never waits.

        Meant for the trio thread: a sequential reader whose next blocks the prefetcher has
        decoded is answered without a thread hand-off. A point still being archived may
        wait on its disk's locks, so it always answers None.
        """
        if self.overlay is not None:
            return None
        return self._read(offset, length, fetch=False)

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
        point = repo.index.point_named(txn, disk, name)
    if point.state != PointState.COMPLETE:
        raise RpfsError(
            f"point {disk}@{name} is still being archived; run 'rpfs mount' (the daemon "
            "finishes it) and try again when 'rpfs points' shows it complete"
        )
    return PointImage(repo, cache, point)
