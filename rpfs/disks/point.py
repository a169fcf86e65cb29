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

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes | BaseException]:
        """`read` of each (offset, length), their chunks fetched together: one index
        transaction, each chunk once, the records read ahead at once (so their disk
        reads overlap). Each range gets its bytes or the exception that failed it alone.
        """
        if self.overlay is not None:  # frozen blocks are read under the disk's locks
            return [_attempt(self.read, offset, length) for offset, length in ranges]
        spans = [self._span(offset, length) for offset, length in ranges]
        wanted = [span for span in spans if span is not None]
        with self.repo.index.read() as txn:
            values = [self._values(txn, span) for span in wanted]
            for offset, end, _, last in wanted:
                self._read_ahead(offset, end, last)
            loaded = iter(self.cache.load_many(
                txn, [(range(first, last + 1), vals)
                      for (_, _, first, last), vals in zip(wanted, values, strict=True)],
                self._where))
        out: list[bytes | BaseException] = []
        for span in spans:
            if span is None:
                out.append(b"")
                continue
            blocks = next(loaded)
            out.append(blocks if isinstance(blocks, BaseException)
                       else self._cut(span, [self._zero if b is None else b for b in blocks]))
        return out

    def _read(self, offset: int, length: int, fetch: bool) -> bytes | None:
        span = self._span(offset, length)
        if span is None:
            return b""
        offset, end, first, last = span
        if self.overlay is not None:
            self._read_ahead(offset, end, last)
            parts = [self._archiving_block(block) for block in range(first, last + 1)]
        else:
            with self.repo.index.read() as txn:
                values = self._values(txn, span)
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
        return self._cut(span, parts)

    def _span(self, offset: int, length: int) -> tuple[int, int, int, int] | None:
        """(offset, end, first block, last block) of a read clipped to the image; None
        if nothing of it is within."""
        end = min(offset + length, self.size)
        if offset >= end:
            return None
        return offset, end, offset // self.bs, (end - 1) // self.bs

    def _values(self, txn, span: tuple[int, int, int, int]) -> list[bytes]:
        """The resolved values (hash or ZERO) of a span's blocks."""
        return [self.repo.index.resolve(txn, self.chain, b) for b in range(span[2], span[3] + 1)]

    def _cut(self, span: tuple[int, int, int, int], parts: list[bytes]) -> bytes:
        """A span's bytes out of its whole blocks."""
        offset, end, first, _ = span
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        start = offset - first * self.bs
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
        blocks = self.cache.load(txn, range(first, first + len(values)), values, self._where)
        return [self._zero if data is None else data for data in blocks]

    @property
    def _where(self) -> str:
        """How a failed chunk's log line names this image."""
        return f"disk {self.point.disk} point {self.point.name}"


def _attempt(read, offset: int, length: int) -> bytes | BaseException:
    try:
        return read(offset, length)
    except Exception as exc:  # the range's own failure, handed back as read_many's are
        return exc


def open_point(repo: Repository, cache: ChunkCache, disk: str, name: str) -> PointImage:
    with repo.index.read() as txn:
        point = repo.index.point_named(txn, disk, name)
    if point.state != PointState.COMPLETE:
        raise RpfsError(
            f"point {disk}@{name} is still being archived; run 'rpfs mount' (the daemon "
            "finishes it) and try again when 'rpfs points' shows it complete"
        )
    return PointImage(repo, cache, point)
