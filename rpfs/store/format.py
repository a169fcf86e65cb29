"""The pack record format and pack names: pure functions, no I/O.

A chunk record in a pack is a 41-byte header followed by the payload:

    magic "RPC1" (4) ‖ codec (1: 0 raw, 1 zstd) ‖ BLAKE3 of the block (32) ‖ payload length (4)

The header makes packs self-describing (an index could be rebuilt from them) and lets a
read check that the record it landed on is the one it asked for. Every decode verifies
the BLAKE3 of the decoded block; any mismatch raises CorruptChunk, never returns bad bytes.
Whatever stores packs (a directory, later an object store) names them with `pack_name`.
"""

from __future__ import annotations

import struct
import threading

import blake3
import zstandard

from ..errors import CorruptChunk

HEADER = struct.Struct(">4sB32sI")
MAGIC = b"RPC1"
CODEC_RAW = 0
CODEC_ZSTD = 1
ZSTD_LEVEL = 3
PACK_SUFFIX = ".pack"

_local = threading.local()  # a zstd context per thread: they are not thread-safe


def pack_name(pack: int) -> str:
    """The file (or object) name of pack number `pack`: NNNNNNNN.pack."""
    return f"{pack:08d}{PACK_SUFFIX}"


def pack_number(name: str) -> int | None:
    """The number of the pack called `name`, None if `name` is not a pack's name."""
    stem = name[: -len(PACK_SUFFIX)]
    return int(stem) if name.endswith(PACK_SUFFIX) and stem.isdigit() else None


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


def check_header(record: bytes | memoryview, expected: bytes, where: tuple[str, int]) -> int:
    """That `record` is one whole record of chunk `expected` (by its header alone); its
    codec. What a sender checks before it ships a record as stored (rpfs.replicate): the
    receiver decodes and hashes it."""
    if len(record) < HEADER.size:
        raise CorruptChunk(*where, "record is truncated")
    magic, codec, stored_digest, length = HEADER.unpack_from(record)
    if magic != MAGIC or stored_digest != expected or length != len(record) - HEADER.size:
        raise CorruptChunk(*where, "record header does not match the index")
    return codec


def decode_chunk(
    record: bytes | memoryview, expected: bytes, block_size: int, where: tuple[str, int]
) -> bytes:
    """Check and decode one pack record; raise CorruptChunk naming `where` (pack, offset)."""
    codec = check_header(record, expected, where)
    payload = memoryview(record)[HEADER.size :]
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
