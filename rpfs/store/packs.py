"""The chunk store: content-addressed, compressed blocks in append-only packs, over a
PackBackend (backend.py) that holds the packs' bytes.

Each writer (one capture, or one disk's archiver) appends to packs of its own, allocated
from the index's `pack` counter, so writers never interleave in one pack. Pack bytes are
made durable before any index transaction that refers to them commits (see
docs/design.md). A read that fails says which way: CorruptChunk (the bytes are bad, or
their pack is gone) or ChunkUnavailable (they could not be read now).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

from ..errors import ChunkError, ChunkUnavailable, CorruptChunk
from ..index import ChunkLoc
from .backend import PackAppender, PackBackend, PackMissing, PackUnavailable
from .format import HEADER, MAGIC, check_header, decode_chunk, pack_name


class PackGone(CorruptChunk):
    """The chunk's pack is missing: corrupt, unless the chunk moved (see get_many)."""


class _OpenPacks:
    """The packs writers of this process may still append to (GC leaves them alone)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packs: set[int] = set()

    def add(self, pack: int) -> None:
        with self._lock:
            self._packs.add(pack)

    def discard(self, packs: Iterable[int]) -> None:
        with self._lock:
            self._packs.difference_update(packs)

    def now(self) -> set[int]:
        with self._lock:
            return set(self._packs)


OPEN_PACKS = _OpenPacks()

PACK_TARGET = 64 << 20  # start a new pack past this size
READ_SPAN = 1 << 20  # the most one read of adjacent records asks for


class PackStore:
    """Reads chunk records from the packs of a backend; hands out writers."""

    def __init__(self, backend: PackBackend, block_size: int) -> None:
        self.backend = backend
        self.block_size = block_size

    def get(self, loc: ChunkLoc, expected: bytes, full: bool = False) -> bytes:
        """The verified block stored at `loc` (a blocking call: run it off the trio thread);
        `full` as in get_many."""
        result = self.get_many([(loc, expected)], full=full)[0]
        if isinstance(result, ChunkError):
            raise result
        return result

    def get_many(
        self, wanted: list[tuple[ChunkLoc, bytes]],
        relocate: Callable[[bytes], ChunkLoc | None] | None = None, *, raw: bool = False,
        full: bool = False,
    ) -> list[bytes | ChunkError]:
        """The verified blocks at these locations, in order; one that failed is its
        ChunkError (CorruptChunk or ChunkUnavailable). `raw`: the records as stored,
        compressed, checked by their header only (what a replication stream carries).
        `full`: every block hashed and compared with its BLAKE3 (verify), not only
        checked by its record's checksum (format.decode_chunk).

        A chunk whose pack is gone may have moved (GC compacted the pack and deleted it
        after the caller looked the location up): `relocate` looks the chunk up afresh,
        and a new location is read instead, looked up again each time that one is gone
        too (until the index names no other place: each round takes a whole GC run). So
        no reader needs to hold GC back: a pack is deleted only after the index names the
        new copies, and the index is where a reader, in any process, finds them.

        Records that lie end to end in a pack (a capture writes a disk's blocks in order)
        are read with one read of up to READ_SPAN bytes: measured on a 1 GiB point, one
        pread per 64 KiB record cost as much as decoding a third of them.
        """
        results: list[bytes | ChunkError | None] = [None] * len(wanted)
        runs = _runs(wanted)
        if len(runs) > 1:
            self.backend.advise([_span(wanted, run) for run in runs])
        for run in runs:
            self._read_run(wanted, run, results, raw, full)
        if relocate is not None:
            self._reread_moved(wanted, results, relocate, raw, full)
        return results  # type: ignore[return-value]

    def _reread_moved(self, wanted: list[tuple[ChunkLoc, bytes]],
                      results: list[bytes | ChunkError | None],
                      relocate: Callable[[bytes], ChunkLoc | None], raw: bool,
                      full: bool) -> None:
        gone = [i for i, r in enumerate(results) if isinstance(r, PackGone)]
        moved = []
        for i in gone:
            loc = relocate(wanted[i][1])
            if loc is not None and (loc.pack, loc.offset) != (wanted[i][0].pack,
                                                               wanted[i][0].offset):
                moved.append((i, loc))
        if moved:
            again = self.get_many([(loc, wanted[i][1]) for i, loc in moved], relocate,
                                  raw=raw, full=full)
            for (i, _), result in zip(moved, again, strict=True):
                results[i] = result

    def _read_run(
        self, wanted: list[tuple[ChunkLoc, bytes]], run: list[int],
        results: list[bytes | ChunkError | None], raw: bool, full: bool,
    ) -> None:
        """Read records lying end to end with one read and decode (or, `raw`, check)
        each into `results`."""
        first = wanted[run[0]][0]
        name = pack_name(first.pack)
        try:
            buf = self.backend.read(*_span(wanted, run))
        except (PackMissing, PackUnavailable) as exc:
            for i in run:
                offset = wanted[i][0].offset
                results[i] = (
                    PackGone(name, offset, "the pack file is missing")
                    if isinstance(exc, PackMissing)
                    else ChunkUnavailable(name, offset, exc.strerror or str(exc))
                )
            return
        view = memoryview(buf)
        for i in run:
            loc, expected = wanted[i]
            start = loc.offset - first.offset
            record = view[start : start + loc.length]
            try:
                if raw:
                    check_header(record, expected, (name, loc.offset))
                    results[i] = bytes(record)
                else:
                    results[i] = decode_chunk(record, expected, self.block_size,
                                              (name, loc.offset), full)
            except CorruptChunk as exc:
                results[i] = exc

    def digests(self, pack: int) -> Iterator[tuple[int, bytes]]:
        """(offset, BLAKE3) of each whole record in a pack, read from the record headers
        (a torn last record is not listed)."""
        for offset, block_digest, _ in self.records(pack):
            yield offset, block_digest

    def records(self, pack: int) -> Iterator[tuple[int, bytes, int]]:
        """(offset, BLAKE3, record length) of each whole record in a pack."""
        size = self.backend.size(pack)
        offset = 0
        while offset + HEADER.size <= size:
            magic, _, block_digest, length = HEADER.unpack(
                self.backend.read(pack, offset, HEADER.size)
            )
            if magic != MAGIC or offset + HEADER.size + length > size:
                return
            yield offset, block_digest, HEADER.size + length
            offset += HEADER.size + length

    def sizes(self) -> dict[int, int]:
        """The size of every pack there, by number (one deleted meanwhile, by gc or a
        failed capture, is left out)."""
        out = {}
        for pack in self.backend.list():
            try:
                out[pack] = self.backend.size(pack)
            except PackMissing:
                continue
        return out

    def delete(self, pack: int) -> None:
        """Remove a pack that nothing in the index names any more."""
        self.backend.delete(pack)

    def close(self) -> None:
        self.backend.close()

    def writer(self, allocate_pack: Callable[[], int]) -> PackWriter:
        return PackWriter(self.backend, allocate_pack)


def _runs(wanted: list[tuple[ChunkLoc, bytes]]) -> list[list[int]]:
    """The indexes of `wanted` in runs of records lying end to end in one pack, at most
    READ_SPAN bytes each, in pack and offset order."""
    runs: list[list[int]] = []
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][0].pack, wanted[i][0].offset))
    for i in order:
        loc = wanted[i][0]
        if runs:
            start, last = wanted[runs[-1][0]][0], wanted[runs[-1][-1]][0]
            if (loc.pack == last.pack and loc.offset == last.offset + last.length
                    and loc.offset + loc.length - start.offset <= READ_SPAN):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def _span(wanted: list[tuple[ChunkLoc, bytes]], run: list[int]) -> tuple[int, int, int]:
    """(pack, offset, length) of the bytes a run's records occupy."""
    first, last = wanted[run[0]][0], wanted[run[-1]][0]
    return first.pack, first.offset, last.offset + last.length - first.offset


class PackWriter:
    """Appends records to packs owned by one writer; `sync()` makes them durable.

    `mark()` notes that the index names everything appended so far; `discard()` cuts the
    packs back to the last mark, so a failed write or commit leaves no bytes behind that
    nothing names (a retry starts on a fresh pack). It appends in place: a backend that
    can only put whole packs needs a writer that holds a pack until it is sealed.
    """

    def __init__(self, backend: PackBackend, allocate_pack: Callable[[], int]) -> None:
        if not backend.can_append:
            raise TypeError(f"{backend.location}: PackWriter appends; this backend cannot")
        self.backend = backend
        self._allocate = allocate_pack
        self._pack = 0
        self._out: PackAppender | None = None
        self._offset = 0
        self._unsynced: list[PackAppender] = []  # written since the last sync
        self._created: list[int] = []  # packs this writer started, oldest first
        self._mark = (0, 0)  # (pack, offset): what the index names ends there

    def append(self, record: bytes) -> ChunkLoc:
        if self._out is None or self._offset >= PACK_TARGET:
            self._roll()
        out = self._out
        out.write(record, self._offset)
        loc = ChunkLoc(self._pack, self._offset, len(record))
        self._offset += len(record)
        if out not in self._unsynced:
            self._unsynced.append(out)
        return loc

    def _roll(self) -> None:
        """Start a new pack; the old one is sealed once the new one exists."""
        old = self._out
        self._pack = self._allocate()
        OPEN_PACKS.add(self._pack)
        self._out = self.backend.create(self._pack)
        self._created.append(self._pack)
        self._offset = 0
        if old is not None:
            if old in self._unsynced:
                self._unsynced.remove(old)
            old.seal()
            OPEN_PACKS.discard(self._created[:-1])

    def sync(self) -> None:
        """Make every appended record durable (before the index may refer to it)."""
        try:
            for out in self._unsynced:
                out.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.backend.location) from None
        self._unsynced.clear()

    def mark(self) -> None:
        """The index now names every record appended so far (call after its commit)."""
        self._mark = (self._pack, self._offset)

    @property
    def created(self) -> list[int]:
        """The packs this writer started."""
        return list(self._created)

    def discard(self) -> None:
        """Close, and remove what was appended since the last mark: the tail of the marked
        pack is cut off, newer packs are deleted. Nothing in the index names those bytes
        (they may not even be durable, or hold half a record)."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self._unsynced.clear()
        OPEN_PACKS.discard(self._created)
        pack, offset = self._mark
        for newer in self._created:
            if newer == pack and offset:
                self.backend.truncate(newer, offset)
            elif newer >= pack:
                self.backend.delete(newer)
        self._created = [p for p in self._created if p < pack or (p == pack and offset)]

    def close(self) -> None:
        self.sync()
        if self._out is not None:
            self._out.close()
            self._out = None
        OPEN_PACKS.discard(self._created)
