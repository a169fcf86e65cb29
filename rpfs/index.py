"""The LMDB index: its schema, key encoding and record access, all in one place.

Named databases (see docs/design.md for the reasoning):

    extents   lineage(8) ‖ block(8) ‖ (2^64-1-gen)(8)  ->  chunk hash (32) | b"" (ZERO)
    chunks    hash(32)  ->  pack(4) ‖ offset(8) ‖ length(4) ‖ refcount(8)
    staging   capture(8) ‖ block(8)  ->  chunk hash | b""      (a capture not yet published)
    captures  capture(8)  ->  JSON {disk, pid, started}
    blockmap  file(8) ‖ page(8)  ->  one state byte per block (4096 blocks a page)
    disks     name  ->  JSON DiskRecord
    points    disk ‖ 0x00 ‖ name  ->  JSON PointRecord
    lineages  lineage(8)  ->  JSON LineageRecord
    meta      counter name  ->  int(8)

All integers are big-endian so that LMDB's byte order is numeric order. Inverting the
generation makes the newest write at or before a generation the first key at or after
`lineage ‖ block ‖ ~gen`: reading any block of any point is one `set_range`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb

ZERO = b""  # extent value of a block that reads as zeros
MAX_GEN = (1 << 64) - 1

_EXTENT_KEY = struct.Struct(">QQQ")
_BLOCK_PREFIX = struct.Struct(">QQ")
_CHUNK_VAL = struct.Struct(">IQIQ")
_U64 = struct.Struct(">Q")

_DBS = (
    "extents", "chunks", "staging", "captures", "blockmap", "disks", "points", "lineages", "meta",
)


def extent_key(lineage: int, block: int, gen: int) -> bytes:
    return _EXTENT_KEY.pack(lineage, block, MAX_GEN - gen)


def decode_extent_key(key: bytes) -> tuple[int, int, int]:
    lineage, block, inv = _EXTENT_KEY.unpack(key)
    return lineage, block, MAX_GEN - inv


def u64(n: int) -> bytes:
    return _U64.pack(n)


@dataclass(frozen=True)
class ChunkLoc:
    """Where a chunk's record lies in the pack files, and how many extents use it."""

    pack: int
    offset: int
    length: int
    refcount: int = 0

    def encode(self) -> bytes:
        return _CHUNK_VAL.pack(self.pack, self.offset, self.length, self.refcount)

    @classmethod
    def decode(cls, raw: bytes) -> ChunkLoc:
        return cls(*_CHUNK_VAL.unpack(raw))


@dataclass
class DiskRecord:
    """A disk: a fixed size and the lineage its current content belongs to.

    A captured disk has only points. A writable disk (created or cloned) also has a local
    file, `file_id` > 0, served read-write at MOUNT/disks/NAME.img.
    """

    name: str
    size: int
    lineage: int
    created: float
    origin: str | None = None  # "disk@point" a clone was made from (or rolled back to)
    file_id: int = 0
    clean: bool = True  # False while open: after a crash its dirty map is not trusted

    @property
    def writable(self) -> bool:
        return self.file_id > 0

    @property
    def file(self) -> str:
        """The local file, relative to the repository root."""
        return f"disks/{self.file_id:08d}.raw"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@dataclass
class PointRecord:
    """A recovery point: one frozen generation of a lineage, with its storage figures."""

    disk: str
    name: str
    lineage: int
    gen: int
    created: float
    size: int
    blocks_written: int = 0
    allocated_blocks: int = 0
    bytes_stored: int = 0
    method: str = "full"  # full, incremental, changed-list; tracked, full-compare (live)
    state: str = "complete"  # "archiving" while a live point's frozen blocks are copied
    frozen_blocks: int = 0
    archived_blocks: int = 0

    @property
    def rides(self) -> bool:
        """Taken with nothing written since a point still archiving: it has no frozen
        blocks of its own and completes with that point."""
        return self.state == "archiving" and not self.frozen_blocks

    @property
    def ref(self) -> str:
        return f"{self.disk}@{self.name}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@dataclass
class LineageRecord:
    """One history of writes. Reads past its own extents fall through to the origin."""

    id: int
    head_gen: int = 0  # the newest published generation
    parent: int | None = None
    parent_gen: int = 0
    disks: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def _record(cls, raw: bytes | None):
    return None if raw is None else cls(**json.loads(raw))


def _point_key(disk: str, name: str) -> bytes:
    return disk.encode() + b"\0" + name.encode()


class Index:
    """The LMDB environment and typed access to its databases.

    Callers open transactions with `read()` / `write()` and pass them to the accessors, so
    that one operation's reads and writes commit together. LMDB allows one writer at a
    time (across processes) and read transactions from any thread.
    """

    def __init__(self, path: Path, map_size: int = 1 << 40) -> None:
        self.path = path
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(_DBS), subdir=True, max_readers=512,
            mode=0o600,  # data.mdb and lock.mdb are private (rpfs.perms)
        )
        self.db = {name: self.env.open_db(name.encode()) for name in _DBS}

    def close(self) -> None:
        self.env.close()

    def read(self) -> lmdb.Transaction:
        return self.env.begin(buffers=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed when the block ends without an exception.

        A commit that finds no room for its pages (LMDB's DiskError) is a full disk, not
        a damaged index: it raises ENOSPC naming the index, like any other write would.
        """
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.DiskError:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path)) from None

    # -- counters -------------------------------------------------------------------------

    def next_id(self, txn: lmdb.Transaction, counter: str) -> int:
        """Allocate the next value (from 1) of a monotonic counter; never reused."""
        key = counter.encode()
        raw = txn.get(key, db=self.db["meta"])
        n = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(key, u64(n), db=self.db["meta"])
        return n

    def _scan(self, txn: lmdb.Transaction, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry of `db` whose key starts with `prefix`, in order."""
        with txn.cursor(db=self.db[db]) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    return
                yield key, value

    def _delete_prefix(self, txn: lmdb.Transaction, db: str, prefix: bytes) -> list[bytes]:
        """Delete every entry of `db` whose key starts with `prefix`; return their values."""
        entries = list(self._scan(txn, db, prefix))
        for key, _ in entries:
            txn.delete(key, db=self.db[db])
        return [value for _, value in entries]

    # -- extents --------------------------------------------------------------------------

    def lookup(self, txn: lmdb.Transaction, lineage: int, block: int, gen: int) -> bytes | None:
        """The newest value of `block` written in `lineage` at or before `gen`, or None."""
        with txn.cursor(db=self.db["extents"]) as cur:
            if not cur.set_range(extent_key(lineage, block, gen)):
                return None
            key = cur.key()
            if key[:16] != _BLOCK_PREFIX.pack(lineage, block):
                return None
            return cur.value()

    def resolve(self, txn: lmdb.Transaction, chain: list[tuple[int, int]], block: int) -> bytes:
        """Content hash (or ZERO) of `block` seen through a chain of (lineage, gen).

        The chain lists a point's lineage first, then its origins; past the last one, a
        block reads as zeros.
        """
        for lineage, gen in chain:
            value = self.lookup(txn, lineage, block, gen)
            if value is not None:
                return value
        return ZERO

    def chain(self, txn: lmdb.Transaction, lineage: int, gen: int) -> list[tuple[int, int]]:
        """(lineage, gen) pairs to consult, newest first, to read `lineage` at `gen`."""
        out: list[tuple[int, int]] = []
        current: int | None = lineage
        while current is not None:
            out.append((current, gen))
            rec = self.get_lineage(txn, current)
            if rec is None:
                break
            current, gen = rec.parent, rec.parent_gen
        return out

    def put_extent(self, txn: lmdb.Transaction, lineage: int, block: int, gen: int, value: bytes):
        txn.put(extent_key(lineage, block, gen), value, db=self.db["extents"])

    def iter_extents(
        self, txn: lmdb.Transaction, lineage: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """(block, gen, value) of every extent of a lineage, by block then newest gen."""
        for key, value in self._scan(txn, "extents", u64(lineage)):
            _, block, gen = decode_extent_key(key)
            yield block, gen, value

    # -- chunks ---------------------------------------------------------------------------

    def get_chunk(self, txn: lmdb.Transaction, digest: bytes) -> ChunkLoc | None:
        raw = txn.get(digest, db=self.db["chunks"])
        return None if raw is None else ChunkLoc.decode(raw)

    def has_chunk(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        return txn.get(digest, db=self.db["chunks"]) is not None

    def put_chunk(self, txn: lmdb.Transaction, digest: bytes, loc: ChunkLoc) -> None:
        txn.put(digest, loc.encode(), db=self.db["chunks"])

    def delete_chunk(self, txn: lmdb.Transaction, digest: bytes) -> None:
        txn.delete(digest, db=self.db["chunks"])

    def incref(self, txn: lmdb.Transaction, digest: bytes, n: int = 1) -> None:
        loc = self.get_chunk(txn, digest)
        if loc is None:
            raise KeyError(f"chunk {digest.hex()} is referenced but not stored")
        self.put_chunk(
            txn, digest, ChunkLoc(loc.pack, loc.offset, loc.length, loc.refcount + n)
        )

    # -- staging (captures in progress) ---------------------------------------------------

    def stage(self, txn: lmdb.Transaction, capture: int, block: int, value: bytes) -> None:
        txn.put(u64(capture) + u64(block), value, db=self.db["staging"])

    def iter_staged(self, txn: lmdb.Transaction, capture: int) -> Iterator[tuple[int, bytes]]:
        for key, value in self._scan(txn, "staging", u64(capture)):
            yield _U64.unpack(key[8:])[0], value

    def drop_staged(self, txn: lmdb.Transaction, capture: int) -> None:
        """Delete a capture's staging entries and its record."""
        self._delete_prefix(txn, "staging", u64(capture))
        txn.delete(u64(capture), db=self.db["captures"])

    def put_capture(self, txn: lmdb.Transaction, capture: int, info: dict) -> None:
        txn.put(u64(capture), json.dumps(info).encode(), db=self.db["captures"])

    def list_captures(self, txn: lmdb.Transaction) -> list[tuple[int, dict]]:
        return [
            (_U64.unpack(k)[0], json.loads(v))
            for k, v in txn.cursor(db=self.db["captures"])
        ]

    # -- disks, points, lineages ----------------------------------------------------------

    def get_disk(self, txn: lmdb.Transaction, name: str) -> DiskRecord | None:
        return _record(DiskRecord, txn.get(name.encode(), db=self.db["disks"]))

    def put_disk(self, txn: lmdb.Transaction, disk: DiskRecord) -> None:
        txn.put(disk.name.encode(), disk.encode(), db=self.db["disks"])

    def delete_disk(self, txn: lmdb.Transaction, name: str) -> None:
        txn.delete(name.encode(), db=self.db["disks"])

    def delete_point(self, txn: lmdb.Transaction, disk: str, name: str) -> None:
        txn.delete(_point_key(disk, name), db=self.db["points"])

    def list_lineages(self, txn: lmdb.Transaction) -> list[LineageRecord]:
        return [LineageRecord(**json.loads(v)) for _, v in txn.cursor(db=self.db["lineages"])]

    def delete_lineage(self, txn: lmdb.Transaction, lineage: int) -> None:
        """Drop a lineage's record and extents, releasing their chunk references."""
        for value in self._delete_prefix(txn, "extents", u64(lineage)):
            if value != ZERO:
                self.incref(txn, value, -1)
        txn.delete(u64(lineage), db=self.db["lineages"])

    def list_disks(self, txn: lmdb.Transaction) -> list[DiskRecord]:
        return [DiskRecord(**json.loads(v)) for _, v in txn.cursor(db=self.db["disks"])]

    def get_point(self, txn: lmdb.Transaction, disk: str, name: str) -> PointRecord | None:
        return _record(PointRecord, txn.get(_point_key(disk, name), db=self.db["points"]))

    def put_point(self, txn: lmdb.Transaction, point: PointRecord) -> None:
        txn.put(_point_key(point.disk, point.name), point.encode(), db=self.db["points"])

    def list_points(self, txn: lmdb.Transaction, disk: str | None = None) -> list[PointRecord]:
        """Points of one disk (or all), oldest first within each disk."""
        prefix = b"" if disk is None else disk.encode() + b"\0"
        out = [PointRecord(**json.loads(v)) for _, v in self._scan(txn, "points", prefix)]
        out.sort(key=lambda p: (p.disk, p.lineage, p.gen))
        return out

    def point_at(self, txn: lmdb.Transaction, lineage: int, gen: int) -> PointRecord | None:
        """The point that froze `gen` of `lineage`, if it still exists."""
        rec = self.get_lineage(txn, lineage)
        for disk in rec.disks if rec else ():
            for point in self.list_points(txn, disk):
                if point.lineage == lineage and point.gen == gen:
                    return point
        return None

    # -- block maps of writable disks ------------------------------------------------------

    def map_pages(self, txn: lmdb.Transaction, file_id: int) -> Iterator[tuple[int, bytes]]:
        """(page number, state bytes) of a local file's persisted block map."""
        for key, value in self._scan(txn, "blockmap", u64(file_id)):
            yield _U64.unpack(key[8:])[0], value

    def put_map_page(self, txn: lmdb.Transaction, file_id: int, page: int, value: bytes) -> None:
        txn.put(u64(file_id) + u64(page), value, db=self.db["blockmap"])

    def drop_map(self, txn: lmdb.Transaction, file_id: int) -> None:
        self._delete_prefix(txn, "blockmap", u64(file_id))

    def get_lineage(self, txn: lmdb.Transaction, lineage: int) -> LineageRecord | None:
        return _record(LineageRecord, txn.get(u64(lineage), db=self.db["lineages"]))

    def put_lineage(self, txn: lmdb.Transaction, rec: LineageRecord) -> None:
        txn.put(u64(rec.id), rec.encode(), db=self.db["lineages"])
