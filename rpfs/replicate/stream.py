"""The replication stream's records: framing, checksums and the encodings of each kind
(docs/stream-format.md). Pure functions over byte streams; no repository here.

Every record is `kind (1) ‖ length (4, big-endian) ‖ payload ‖ CRC32C (4)` of the first
three fields, so a flipped bit is caught at the record it hit, and a stream cut short is
caught at the record it cut (or at the missing trailer). One point's stream ends with a
trailer that holds the BLAKE3 of every byte before it, and the counts of its records: a
stream that was reordered, spliced or had whole records dropped fails there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3
from crc32c import crc32c

from ..errors import RpfsError
from ..index import ZERO, PointRecord

MAGIC = b"RPFS-STREAM\x00\x00\x01"  # a stream file's first 14 bytes; the version is in H
# Version 2: chunk records may be of codecs 2 and 3 (store/format.py), which a receiver
# of version 1 cannot decode. A version 1 stream (legacy records only) still reads.
VERSION = 2
READ_VERSIONS = (1, 2)
FRAME = struct.Struct(">BI")
CRC = struct.Struct(">I")
MAX_PAYLOAD = 64 << 20  # the largest record payload read; a longer length is corruption
EXTENT = struct.Struct(">Q32s")  # block ‖ chunk digest (32 zero bytes: the block is zeros)
EXTENTS_PER_RECORD = 65536
ZERO_DIGEST = bytes(32)

# Record kinds. A point's stream: HEADER, META, EXTENTS..., MAP_END, CHUNK..., TRAILER.
HEADER = ord("H")  # JSON: format, version, repository, block size, disk, size, point, base
META = ord("M")  # JSON: the point's name, created, description, hold, expiry
EXTENTS = ord("E")  # EXTENT entries: the point's blocks that differ from the base
MAP_END = ord("F")  # empty: the extent map is whole
CHUNK = ord("C")  # one chunk record as stored in a pack (header ‖ compressed payload)
TRAILER = ord("T")  # JSON: record counts and the BLAKE3 of every byte before this record
# Only in a session (pull, push): the two sides' requests and answers.
REQUEST = ord("Q")  # JSON {"op": ...} from the side that drives (the receiver)
ANSWER = ord("A")  # JSON: the answer to a request
WANT = ord("W")  # digests (32 bytes each) of the chunks the receiver lacks; empty: done
FAILED = ord("X")  # JSON {"message"}: the side that sends it gives up
NAMES = {HEADER: "header", META: "metadata", EXTENTS: "extents", MAP_END: "map end",
         CHUNK: "chunk", TRAILER: "trailer", REQUEST: "request", ANSWER: "answer",
         WANT: "want list", FAILED: "error"}


class StreamError(RpfsError):
    """The stream is corrupt, cut short or not what was expected: nothing was published."""


def identity(repository: str, point: PointRecord) -> str:
    """The name of a point across repositories: REPOSITORY/LINEAGE/GEN/CREATED (created
    in microseconds: a generation can be taken anew after its point was lost, never at
    the same instant). A replica carries its source's identity (`replica_of`)."""
    if point.replica_of is not None:
        return point.replica_of
    return f"{repository}/{point.lineage}/{point.gen}/{round(point.created * 1e6)}"


def encode_extents(entries: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(EXTENT.pack(block, value or ZERO_DIGEST) for block, value in entries)


def decode_extents(payload: bytes) -> Iterator[tuple[int, bytes]]:
    if len(payload) % EXTENT.size:
        raise StreamError(f"an extents record of {len(payload)} bytes is not whole entries")
    for block, value in EXTENT.iter_unpack(payload):
        yield block, ZERO if value == ZERO_DIGEST else value


def encode_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(kind: int, payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        raise StreamError(f"the {NAMES[kind]} record is not valid JSON") from None
    if not isinstance(value, dict):
        raise StreamError(f"the {NAMES[kind]} record is not a JSON object")
    return value


@dataclass
class Counts:
    """Records and bytes of one point's stream, as the trailer states them."""

    extents: int = 0
    chunks: int = 0
    chunk_bytes: int = 0

    def add(self, kind: int, length: int) -> None:
        """Count one record of `kind` with a payload of `length` bytes."""
        if kind == EXTENTS:
            self.extents += length // EXTENT.size
        elif kind == CHUNK:
            self.chunks += 1
            self.chunk_bytes += length


class Writer:
    """Writes records to a binary file, keeping the BLAKE3 of one point's stream."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.bytes = 0
        self._hash = blake3.blake3()
        self.counts = Counts()

    def raw(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes += len(data)
        self._hash.update(data)

    def record(self, kind: int, payload: bytes = b"") -> None:
        head = FRAME.pack(kind, len(payload))
        self.raw(head + payload + CRC.pack(crc32c(payload, crc32c(head))))
        self.counts.add(kind, len(payload))

    def json(self, kind: int, value: object) -> None:
        self.record(kind, encode_json(value))

    def trailer(self) -> None:
        """End one point's stream; the next record starts a new digest."""
        digest = self._hash.hexdigest()
        self.json(TRAILER, {**vars(self.counts), "blake3": digest})
        self.out.flush()
        self._hash = blake3.blake3()
        self.counts = Counts()

    def flush(self) -> None:
        self.out.flush()


class Reader:
    """Reads and checks records from a binary file; keeps the BLAKE3 of one point's
    stream to compare with its trailer. `where` names the stream in errors."""

    def __init__(self, src: BinaryIO, where: str) -> None:
        self.src = src
        self.where = where
        self.bytes = 0
        self._hash = blake3.blake3()
        self.counts = Counts()

    def _read(self, n: int, what: str, hashed: bool = True) -> bytes:
        data = self.src.read(n)
        if data is None or len(data) < n:
            got = 0 if data is None else len(data)
            if not got and what == "a record":
                raise StreamError(f"{self.where} ends before its trailer: the stream was "
                                  "cut short (the sender stopped, or the file is truncated)")
            raise StreamError(f"{self.where} is cut short in {what} (at byte "
                              f"{self.bytes + got}): the sender stopped, or the file is "
                              "truncated")
        self.bytes += n
        if hashed:
            self._hash.update(data)
        return data

    def magic(self) -> None:
        if self._read(len(MAGIC), "its magic") != MAGIC:
            raise StreamError(f"{self.where} is not an rpfs stream (made by 'rpfs send')")

    def record(self) -> tuple[int, bytes]:
        """The next record (kind, payload), its CRC checked."""
        at = self.bytes
        head = self._read(FRAME.size, "a record", hashed=False)
        kind, length = FRAME.unpack(head)
        if kind not in NAMES or length > MAX_PAYLOAD:
            raise StreamError(f"{self.where} is corrupt at byte {at}: no record starts there")
        digest = self._hash.copy() if kind == TRAILER else None  # of all before it
        self._hash.update(head)
        payload = self._read(length, f"a {NAMES[kind]} record")
        (crc,) = CRC.unpack(self._read(CRC.size, f"a {NAMES[kind]} record"))
        if crc != crc32c(payload, crc32c(head)):
            raise StreamError(f"{self.where} is corrupt: the {NAMES[kind]} record at byte "
                              f"{at} fails its CRC32C")
        self.counts.add(kind, length)
        if kind == FAILED:
            message = decode_json(kind, payload).get("message", "no reason given")
            raise StreamError(f"the sender failed: {message}")
        if kind == TRAILER:
            self._check_trailer(decode_json(kind, payload), digest)
        return kind, payload

    def _check_trailer(self, trailer: dict, digest) -> None:
        """The point's stream is whole: same digest, same counts as the sender's."""
        stated = {k: trailer.get(k) for k in ("extents", "chunks", "chunk_bytes")}
        if trailer.get("blake3") != digest.hexdigest() or stated != vars(self.counts):
            raise StreamError(f"{self.where} is corrupt: its trailer does not match what came "
                              "before it (records were lost, reordered or changed)")
        self._hash = blake3.blake3()
        self.counts = Counts()

    def expect(self, kind: int) -> bytes:
        got, payload = self.record()
        if got != kind:
            raise StreamError(f"{self.where}: expected a {NAMES[kind]} record, got a "
                              f"{NAMES[got]} record")
        return payload

    def expect_json(self, kind: int) -> dict:
        return decode_json(kind, self.expect(kind))
