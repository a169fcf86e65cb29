"""The chunk store: content-addressed, compressed blocks in append-only pack files.

A chunk record in a pack is a 41-byte header followed by the payload:

    magic "RPC1" (4) ‖ codec (1: 0 raw, 1 zstd) ‖ BLAKE3 of the block (32) ‖ payload length (4)

The header makes packs self-describing (an index could be rebuilt from them) and lets a
read check that the record it landed on is the one it asked for. Every read verifies the
BLAKE3 of the decoded block; any mismatch raises CorruptChunk, never returns bad bytes.

Each writer (one capture, or later one daemon) appends to packs of its own, allocated
from the index's `pack` counter, so writers never interleave in one file. Pack bytes are
fsynced before any index transaction that refers to them commits (see docs/design.md).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import zstandard

from ..errors import CorruptChunk
from ..index import ChunkLoc

HEADER = struct.Struct(">4sB32sI")
MAGIC = b"RPC1"
CODEC_RAW = 0
CODEC_ZSTD = 1
PACK_TARGET = 64 << 20  # start a new pack past this size
ZSTD_LEVEL = 3
READ_SPAN = 1 << 20  # the most one pread of adjacent records asks for

_local = threading.local()


def digest(block: bytes) -> bytes:
    """BLAKE3 of a block: its name in the store."""
    return blake3.blake3(block).digest()


def encode_chunk(block: bytes, block_digest: bytes) -> bytes:
    """The pack record of a block: zstd if that saves space, else the raw bytes."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    payload = compressor.compress(block)
    codec = CODEC_ZSTD
    if len(payload) >= len(block):
        payload, codec = block, CODEC_RAW
    return HEADER.pack(MAGIC, codec, block_digest, len(payload)) + payload


def decode_chunk(
    record: bytes | memoryview, expected: bytes, block_size: int, where: tuple[str, int]
) -> bytes:
    """Check and decode one pack record; raise CorruptChunk naming `where` (pack, offset)."""
    if len(record) < HEADER.size:
        raise CorruptChunk(*where, "record is truncated")
    magic, codec, stored_digest, length = HEADER.unpack_from(record)
    payload = memoryview(record)[HEADER.size :]
    if magic != MAGIC or stored_digest != expected or length != len(payload):
        raise CorruptChunk(*where, "record header does not match the index")
    if codec == CODEC_RAW:
        block = bytes(payload)
    elif codec == CODEC_ZSTD:
        decompressor = getattr(_local, "decompressor", None)
        if decompressor is None:
            decompressor = _local.decompressor = zstandard.ZstdDecompressor()
        try:
            block = decompressor.decompress(payload, max_output_size=block_size)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(*where, f"zstd: {exc}") from None
    else:
        raise CorruptChunk(*where, f"unknown codec {codec}")
    if digest(block) != expected:
        raise CorruptChunk(*where, "BLAKE3 of the decoded block does not match")
    return block


class PackStore:
    """Reads chunk records from the pack directory; hands out writers."""

    def __init__(self, root: Path, block_size: int) -> None:
        self.root = root
        self.block_size = block_size
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def path(self, pack: int) -> Path:
        return self.root / f"{pack:08d}.pack"

    def _fd(self, pack: int) -> int:
        fd = self._fds.get(pack)
        if fd is None:
            with self._lock:
                fd = self._fds.get(pack)
                if fd is None:
                    fd = self._fds[pack] = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def get(self, loc: ChunkLoc, expected: bytes) -> bytes:
        """The verified block stored at `loc` (a blocking call: run it off the trio thread)."""
        result = self.get_many([(loc, expected)])[0]
        if isinstance(result, CorruptChunk):
            raise result
        return result

    def get_many(self, wanted: list[tuple[ChunkLoc, bytes]]) -> list[bytes | CorruptChunk]:
        """The verified blocks at these locations, in order; a bad one is its CorruptChunk.

        Records that lie end to end in a pack (a capture writes a disk's blocks in order)
        are read with one pread of up to READ_SPAN bytes: measured on a 1 GiB point, one
        pread per 64 KiB record cost as much as decoding a third of them.
        """
        results: list[bytes | CorruptChunk | None] = [None] * len(wanted)
        order = sorted(range(len(wanted)), key=lambda i: (wanted[i][0].pack, wanted[i][0].offset))
        run: list[int] = []
        for i in order:
            if run:
                last = wanted[run[-1]][0]
                loc = wanted[i][0]
                span = loc.offset + loc.length - wanted[run[0]][0].offset
                if loc.pack != last.pack or loc.offset != last.offset + last.length or (
                    span > READ_SPAN
                ):
                    self._read_run(wanted, run, results)
                    run = []
            run.append(i)
        if run:
            self._read_run(wanted, run, results)
        return results  # type: ignore[return-value]

    def _read_run(
        self, wanted: list[tuple[ChunkLoc, bytes]], run: list[int],
        results: list[bytes | CorruptChunk | None],
    ) -> None:
        """Read records lying end to end with one pread and decode each into `results`."""
        first = wanted[run[0]][0]
        last = wanted[run[-1]][0]
        try:
            buf = os.pread(self._fd(first.pack), last.offset + last.length - first.offset,
                           first.offset)
        except OSError as exc:
            for i in run:
                loc = wanted[i][0]
                results[i] = CorruptChunk(f"{loc.pack:08d}.pack", loc.offset,
                                          f"read failed: {exc.strerror}")
            return
        view = memoryview(buf)
        for i in run:
            loc, expected = wanted[i]
            start = loc.offset - first.offset
            try:
                results[i] = decode_chunk(view[start : start + loc.length], expected,
                                          self.block_size, (f"{loc.pack:08d}.pack", loc.offset))
            except CorruptChunk as exc:
                results[i] = exc

    def digests(self, pack: int) -> Iterator[tuple[int, bytes]]:
        """(offset, BLAKE3) of each whole record in a pack, read from the record headers
        (a torn last record is not listed)."""
        with open(self.path(pack), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + HEADER.size <= size:
                magic, _, block_digest, length = HEADER.unpack(
                    os.pread(f.fileno(), HEADER.size, offset)
                )
                if magic != MAGIC or offset + HEADER.size + length > size:
                    return
                yield offset, block_digest
                offset += HEADER.size + length

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def writer(self, allocate_pack: Callable[[], int]) -> PackWriter:
        return PackWriter(self, allocate_pack)


class PackWriter:
    """Appends records to packs owned by one writer; `sync()` makes them durable.

    `mark()` notes that the index names everything appended so far; `discard()` cuts the
    packs back to the last mark, so a failed write or commit leaves no bytes behind that
    nothing names (a retry starts on a fresh pack).
    """

    def __init__(self, store: PackStore, allocate_pack: Callable[[], int]) -> None:
        self.store = store
        self._allocate = allocate_pack
        self._pack = 0
        self._fd = -1
        self._offset = 0
        self._unsynced: list[int] = []  # fds written since the last sync
        self._created: list[int] = []  # packs this writer started, oldest first
        self._mark = (0, 0)  # (pack, offset): what the index names ends there

    def append(self, record: bytes) -> ChunkLoc:
        if self._fd < 0 or self._offset >= PACK_TARGET:
            self._roll()
        try:
            written = os.pwrite(self._fd, record, self._offset)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.store.path(self._pack))) from None
        if written != len(record):  # the filesystem filled up within the record
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.store.path(self._pack)))
        loc = ChunkLoc(self._pack, self._offset, len(record))
        self._offset += len(record)
        if self._fd not in self._unsynced:
            self._unsynced.append(self._fd)
        return loc

    def _roll(self) -> None:
        """Start a new pack; the old one is closed after the next sync."""
        old = self._fd
        self._pack = self._allocate()
        path = self.store.path(self._pack)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._created.append(self._pack)
        self._offset = 0
        _fsync_dir(self.store.root)  # the new file's name is durable before anything uses it
        if old >= 0:
            os.fdatasync(old)
            if old in self._unsynced:
                self._unsynced.remove(old)
            os.close(old)

    def sync(self) -> None:
        """Make every appended record durable (before the index may refer to it)."""
        try:
            for fd in self._unsynced:
                os.fdatasync(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.store.root)) from None
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
        pack is cut off, newer packs are unlinked. Nothing in the index names those bytes
        (they may not even be durable, or hold half a record)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._unsynced.clear()
        pack, offset = self._mark
        for newer in self._created:
            if newer == pack and offset:
                os.truncate(self.store.path(newer), offset)
            elif newer >= pack:
                self.store.path(newer).unlink(missing_ok=True)
        self._created = [p for p in self._created if p < pack or (p == pack and offset)]

    def close(self) -> None:
        self.sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
