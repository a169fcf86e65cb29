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
    meta      counter name  ->  int(8);  "config"  ->  JSON {block_size, hash, codec}
              "repository"  ->  8 random bytes: the repository's id (replication)
              "suspect/" ‖ chunk hash(32)  ->  time first found corrupt (8): for verify
              "note/" ‖ name  ->  JSON (gc's compaction in progress, retired packs, when
              gc and verify last ran)
    gens      lineage(8) ‖ gen(8) ‖ block(8)  ->  b""   (the extents of each generation)
    trash     disk ‖ 0x00 ‖ name ‖ 0x00 ‖ lineage(8) ‖ gen(8)  ->  JSON TrashRecord
    policies  disk name  ->  JSON retention.Policy (lifecycle/retention.py encodes it)
    packstats pack(4)  ->  named chunks(8) ‖ named bytes(8) ‖ live chunks(8) ‖ live bytes(8)
              (the chunk records each pack holds that `chunks` names, and those of them
              with a refcount above 0: kept by put_chunk, incref and delete_chunk)
    verified  pack(4)  ->  JSON {at, chunks, bad}: when verify last read the pack whole
    bad       chunk hash(32)  ->  JSON {at, pack, offset, error}: found bad by verify;
              never deduplicated against, so the next writer of that content heals it
    zero      chunk hash(32)  ->  time(8, a double) it last dropped to refcount 0: the
              chunks GC may free, and since when (kept by put_chunk and incref)
    stored    pack(4)  ->  JSON {state: "uploading" | "stored", size, at, pid}: a pack's copy
              in the object store (absent: local only; repositories with a store)

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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import lmdb

from . import mdbfile
from .errors import RpfsError

ZERO = b""  # extent value of a block that reads as zeros
MAX_GEN = (1 << 64) - 1
MAP_SIZE = 1 << 40
CONFIG_KEY = b"config"  # in `meta`: what rpfs.json must say (written by init)
# In `meta`: 8 random bytes naming this repository, written at its first writable open
# by an rpfs that has replication: a received point records which repository it came
# from (rpfs/replicate/), so a point is never taken for another one of the same name.
# Eight bytes, like a counter's value, so an rpfs that predates it still opens the index.
REPO_ID_KEY = b"repository"
# In `meta`: chunks a read found corrupt, for `rpfs verify`. Its values are u64 like the
# counters', so an rpfs that predates it still opens and checks the index.
SUSPECT_PREFIX = b"suspect/"
# In `meta`: small JSON records of the upkeep (get_note): gc's compaction in progress, the
# packs it retired, when gc and verify last ran. Not u64 values: an rpfs that predates
# them never opens this format.
NOTE_PREFIX = b"note/"

_EXTENT_KEY = struct.Struct(">QQQ")
_BLOCK_PREFIX = struct.Struct(">QQ")
_CHUNK_VAL = struct.Struct(">IQIQ")
_U64 = struct.Struct(">Q")
_PACK_KEY = struct.Struct(">I")
_PACK_STATS = struct.Struct(">QQQQ")
_TIME = struct.Struct(">d")

_DBS = (
    "extents", "chunks", "staging", "captures", "blockmap", "disks", "points", "lineages", "meta",
    "gens", "trash", "policies", "packstats", "verified", "bad", "zero", "stored",
)
# Databases added after the first release: an index without them gets them at its first
# writable open (`gens` filled from `extents`); a read-only copy (a checkpoint) opens
# without them.
_ADDED = ("gens", "trash", "policies", "packstats", "verified", "bad", "zero", "stored")
# LMDB errors that mean the file's pages are not what LMDB wrote (not a full map, a
# lock or a bug of ours): reported as a damaged index.
_DAMAGE = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError,
    lmdb.PanicError, lmdb.IncompatibleError,
)


class IndexDamaged(RpfsError):
    """The index cannot be read as it is: its file is missing, cut short or corrupt."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"the index {path} is damaged: {detail}. Run 'rpfs index restore' to put back "
            "its newest good checkpoint ('rpfs index restore --list' shows them)"
        )
        self.detail = detail


def extent_key(lineage: int, block: int, gen: int) -> bytes:
    return _EXTENT_KEY.pack(lineage, block, MAX_GEN - gen)


def decode_extent_key(key: bytes) -> tuple[int, int, int]:
    lineage, block, inv = _EXTENT_KEY.unpack(key)
    return lineage, block, MAX_GEN - inv


def gen_key(lineage: int, gen: int, block: int) -> bytes:
    return _EXTENT_KEY.pack(lineage, gen, block)


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


@dataclass(frozen=True)
class PackStats:
    """What one pack holds that the index names: chunk records (`named`) and those of
    them some extent references (`live`), in count and stored bytes. The rest of the
    pack's file is dead: records of chunks with refcount 0, or named by nothing."""

    named_chunks: int = 0
    named_bytes: int = 0
    live_chunks: int = 0
    live_bytes: int = 0

    def encode(self) -> bytes:
        return _PACK_STATS.pack(self.named_chunks, self.named_bytes, self.live_chunks,
                                self.live_bytes)

    def plus(self, named: int, live: int, length: int) -> PackStats:
        """These stats with `named` and `live` records of `length` bytes more (or less)."""
        return PackStats(self.named_chunks + named, self.named_bytes + named * length,
                         self.live_chunks + live, self.live_bytes + live * length)


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
    origin: str | None = None  # "disk@point" the content started from: the clone's source,
    # or the point it was last rolled back to
    file_id: int = 0
    clean: bool = True  # False while open: after a crash its dirty map is not trusted
    # Added later (a record without them reads as None: see disks/history.py): which point
    # `origin` was, as (lineage, gen), since a deleted point's name can be taken again;
    # the point a clone was made from and which it was, kept through rollbacks.
    origin_at: tuple[int, int] | None = None
    cloned_from: str | None = None
    cloned_at: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("origin_at", "cloned_at"):  # JSON gives them back as lists
            if (value := getattr(self, name)) is not None:
                setattr(self, name, tuple(value))

    def started_from(self, point: PointRecord, *, clone: bool = False) -> None:
        """Record `point` as where the content now starts from (and, for a new clone,
        as the point it was cloned from)."""
        self.origin, self.origin_at = point.ref, (point.lineage, point.gen)
        if clone:
            self.cloned_from, self.cloned_at = self.origin, self.origin_at

    @property
    def writable(self) -> bool:
        return self.file_id > 0

    @property
    def file(self) -> str:
        """The local file, relative to the repository root."""
        return f"disks/{self.file_id:08d}.raw"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class PointState(StrEnum):
    """Where a point is in its life; stored as the plain string in its record."""

    COMPLETE = "complete"  # every block is in the index
    ARCHIVING = "archiving"  # a live point whose frozen blocks are still being copied


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
    # full, incremental, changed-list, dirty-bitmap; tracked, full-compare (live)
    method: str = "full"
    state: PointState = PointState.COMPLETE
    frozen_blocks: int = 0
    archived_blocks: int = 0
    description: str = ""  # the user's free text (`--description`, `rpfs point describe`)
    expires: float | None = None  # an on-demand point's own expiry: then it goes to the trash
    hold: str | None = None  # the tag of the hold that keeps it from delete, prune and purge
    # A received point (rpfs/replicate/): the identity of the point it is a copy of,
    # "REPOSITORY/LINEAGE/GEN/CREATED" of its first source along a chain of replicas
    # (replicate.stream.identity). None: a point taken here.
    replica_of: str | None = None

    def __post_init__(self) -> None:
        self.state = PointState(self.state)  # records decode it as a plain string

    @property
    def rides(self) -> bool:
        """Taken with nothing written since a point still archiving: it has no frozen
        blocks of its own and completes with that point."""
        return self.state == PointState.ARCHIVING and not self.frozen_blocks

    @property
    def ref(self) -> str:
        return f"{self.disk}@{self.name}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@dataclass
class TrashRecord:
    """A deleted point in the trash: its record as it was, and when it was deleted. It
    keeps its references (a reader, for purge) until it is purged."""

    point: PointRecord
    deleted_at: float
    # Purged already but for an image of it still open in the mount: it stays a reader
    # (so what that image reads stays) until the last one closes, then goes. Written only
    # when true, so other records read and encode as before the field existed.
    purge_on_close: bool = False

    def encode(self) -> bytes:
        fields = {**asdict(self.point), "deleted_at": self.deleted_at}
        if self.purge_on_close:
            fields["purge_on_close"] = True
        return json.dumps(fields).encode()

    @classmethod
    def from_fields(
        cls, deleted_at: float, purge_on_close: bool = False, **point
    ) -> TrashRecord:
        if type(purge_on_close) is not bool:
            raise TypeError("purge_on_close is not a bool")
        return cls(PointRecord(**point), deleted_at, purge_on_close)


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


def _point_key(disk: str, name: str) -> bytes:
    return disk.encode() + b"\0" + name.encode()


def _trash_key(point: PointRecord) -> bytes:
    """Unique per deleted point: a name may be reused and deleted again."""
    return _point_key(point.disk, point.name) + b"\0" + u64(point.lineage) + u64(point.gen)


class Index:
    """The LMDB environment and typed access to its databases.

    Callers open transactions with `read()` / `write()` and pass them to the accessors, so
    that one operation's reads and writes commit together. LMDB allows one writer at a
    time (across processes) and read transactions from any thread.
    """

    def __init__(
        self, path: Path, map_size: int = MAP_SIZE, *, create: dict | None = None,
        copy: bool = False, check: bool = True, readonly: bool = False,
    ) -> None:
        """Open the index at `path`, a directory, after checking that its file is whole;
        IndexDamaged if it is missing, cut short or corrupt (an empty or missing file is
        damage, never a new index). `create`: make a new index instead, whose databases
        and config record (`create`) are written in one transaction. `copy`: `path` is a
        single data file (a checkpoint), opened read-only. `check=False` skips the file
        check: only for salvaging what a damaged copy still holds, in a process that may
        die of it (rpfs.checkpoint). `readonly`: open the index in place without any
        write transaction (the far side of a pull, which must change nothing): the
        databases an older index lacks stay missing.
        """
        self.path = path
        if create is None and check:
            try:
                mdbfile.check(path if copy else path / "data.mdb")
            except mdbfile.DataFileError as exc:
                raise self.damaged(str(exc)) from None
        try:
            self.env = lmdb.open(
                str(path), map_size=map_size, max_dbs=len(_DBS), subdir=not copy,
                max_readers=512, readonly=copy or readonly, lock=not copy,
                create=create is not None,
                mode=0o600,  # data.mdb and lock.mdb are private (rpfs.perms)
            )
        except _DAMAGE as exc:
            raise self.damaged(str(exc)) from None
        try:
            self.db = self._open_dbs(create, copy or readonly)
            with self.read() as txn:
                raw = txn.get(CONFIG_KEY, db=self.db["meta"])
                repo_id = txn.get(REPO_ID_KEY, db=self.db["meta"])
            # None only in an index opened read-only before any writable open gave it one
            self.repository_id: str | None = None if repo_id is None else repo_id.hex()
            self.recorded: dict | None = None if raw is None else self._json(raw, "meta/config")
            if not isinstance(self.recorded, dict | None):
                raise self.damaged("record meta/config is not a JSON object")
        except BaseException:
            self.env.close()
            raise

    def _open_dbs(self, create: dict | None, readonly: bool) -> dict[str, lmdb._Database]:
        dbs = {}
        name = ""
        try:
            if readonly:
                with self.env.begin() as txn:
                    present = {name for name in _ADDED if txn.get(name.encode()) is not None}
                for name in _DBS:
                    if name not in _ADDED or name in present:
                        dbs[name] = self.env.open_db(name.encode(), create=False)
                return dbs
            with self.env.begin(write=True) as txn:
                # Named databases are keys of the main one.
                missing = [name for name in _ADDED if txn.get(name.encode()) is None]
                for name in _DBS:
                    dbs[name] = self.env.open_db(
                        name.encode(), txn=txn, create=create is not None or name in missing)
                if txn.get(REPO_ID_KEY, db=dbs["meta"]) is None:
                    txn.put(REPO_ID_KEY, os.urandom(8), db=dbs["meta"])
                if create is not None:
                    txn.put(CONFIG_KEY, json.dumps(create).encode(), db=dbs["meta"])
                else:
                    if "gens" in missing:
                        self._fill_gens(txn, dbs)
                    if "packstats" in missing:
                        self._fill_packstats(txn, dbs)
                    if "zero" in missing:
                        self._fill_zero(txn, dbs)
        except lmdb.NotFoundError:
            raise self.damaged(f"its database {name!r} is missing") from None
        except _DAMAGE as exc:
            raise self.damaged(str(exc)) from None
        return dbs

    @staticmethod
    def _fill_gens(txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        """Index every extent by generation: an index made before `gens` existed."""
        with txn.cursor(db=dbs["extents"]) as cur:
            for key in cur.iternext(values=False):
                lineage, block, gen = decode_extent_key(key)
                txn.put(gen_key(lineage, gen, block), b"", db=dbs["gens"])

    @classmethod
    def _fill_packstats(cls, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        """Count each pack's named and live records: an index made before `packstats`."""
        for pack, stats in cls.count_packs(txn, dbs["chunks"]).items():
            txn.put(_PACK_KEY.pack(pack), stats.encode(), db=dbs["packstats"])

    @staticmethod
    def _fill_zero(txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        """List the chunks with refcount 0, since now: an index made before `zero`."""
        since = _TIME.pack(time.time())
        with txn.cursor(db=dbs["chunks"]) as cur:
            for digest, raw in cur:
                if not ChunkLoc.decode(raw).refcount:
                    txn.put(digest, since, db=dbs["zero"])

    def damaged(self, detail: str) -> IndexDamaged:
        return IndexDamaged(self.path, detail)

    def close(self) -> None:
        self.env.close()

    def read(self) -> _Txn:
        return _Txn(self, write=False)

    def write(self) -> _Txn:
        return _Txn(self, write=True)

    def last_txnid(self) -> int:
        """The id of the newest committed transaction: it changes with every commit."""
        return self.env.info()["last_txnid"]

    def copy_to(self, fd: int) -> None:
        """Write a compact, consistent copy of the index to `fd`, from one read
        transaction: writers go on meanwhile (LMDB copies without the writer lock).
        OSError if writing fails, IndexDamaged if a page cannot be followed."""
        with self.read() as txn:
            try:
                self.env.copyfd(fd, compact=True, txn=txn)
            except _DAMAGE:
                raise
            except lmdb.DiskError:  # LMDB's name for ENOSPC
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            except lmdb.Error as exc:
                raise OSError(errno.EIO, str(exc)) from None

    def walk(self) -> None:
        """Follow every page of every database (a compact copy to /dev/null, at C speed):
        IndexDamaged on a page LMDB cannot follow."""
        with open(os.devnull, "wb") as null:
            self.copy_to(null.fileno())

    def record_config(self, config: dict) -> None:
        """Write the config record of an index made before it existed (see repo.py)."""
        with self.write() as txn:
            txn.put(CONFIG_KEY, json.dumps(config).encode(), db=self.db["meta"])
        self.recorded = config

    # -- decoding -------------------------------------------------------------------------

    def _json(self, raw: bytes, where: str):
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # also UnicodeDecodeError
            raise self.damaged(f"record {where} is not valid JSON") from None

    def _record(self, cls, raw: bytes | None, where: str):
        """A JSON record as a `cls`, or None if `raw` is None; IndexDamaged if unreadable."""
        if raw is None:
            return None
        fields = self._json(raw, where)
        try:
            return cls(**fields)
        except TypeError:  # not an object, or fields of another record
            raise self.damaged(f"record {where} does not hold a {cls.__name__}") from None

    def _records(self, txn: lmdb.Transaction, cls, db: str, prefix: bytes = b"") -> list:
        return [
            self._record(cls, value, f"{db}/{_show(key)}")
            for key, value in self._scan(txn, db, prefix)
        ]

    def _u64(self, raw: bytes, where: str) -> int:
        if len(raw) != 8:
            raise self.damaged(f"record {where} is {len(raw)} bytes, not 8")
        return _U64.unpack(raw)[0]

    def verify_records(self) -> None:
        """Decode every disk, point, lineage, capture, counter and note record (IndexDamaged on
        the first bad one): one record per object, so cheap enough for a daemon's start,
        which would otherwise fail later, in the middle of serving."""
        with self.read() as txn:
            self.list_disks(txn)
            self.list_points(txn)
            self.list_lineages(txn)
            self.list_captures(txn)
            self.list_trash(txn)
            for key, value in self._scan(txn, "meta", b""):
                if key.startswith(NOTE_PREFIX):
                    self._json(value, f"meta/{_show(key)}")
                elif key != CONFIG_KEY:
                    self._u64(value, f"meta/{_show(key)}")

    # -- counters -------------------------------------------------------------------------

    def next_id(self, txn: lmdb.Transaction, counter: str) -> int:
        """Allocate the next value (from 1) of a monotonic counter; never reused."""
        key = counter.encode()
        raw = txn.get(key, db=self.db["meta"])
        n = (self._u64(raw, f"meta/{counter}") if raw else 0) + 1
        txn.put(key, u64(n), db=self.db["meta"])
        return n

    def last_id(self, txn: lmdb.Transaction, counter: str) -> int:
        """The counter's last allocated value (0: none yet)."""
        raw = txn.get(counter.encode(), db=self.db["meta"])
        return self._u64(raw, f"meta/{counter}") if raw else 0

    def raise_counter(self, txn: lmdb.Transaction, counter: str, at_least: int) -> None:
        """Make the counter's next value exceed `at_least` (ids already used on disk)."""
        raw = txn.get(counter.encode(), db=self.db["meta"])
        if (self._u64(raw, f"meta/{counter}") if raw else 0) < at_least:
            txn.put(counter.encode(), u64(at_least), db=self.db["meta"])

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

    # -- suspect chunks -------------------------------------------------------------------

    def mark_suspect(self, txn: lmdb.Transaction, digest: bytes, when: float) -> None:
        """Record that chunk `digest` was found corrupt (first time kept)."""
        txn.put(SUSPECT_PREFIX + digest, u64(int(when)), db=self.db["meta"], overwrite=False)

    def suspects(self, txn: lmdb.Transaction) -> list[bytes]:
        """The chunks marked by `mark_suspect`, in hash order."""
        return [key[len(SUSPECT_PREFIX) :] for key, _ in self._scan(txn, "meta", SUSPECT_PREFIX)]

    # -- small JSON records of the upkeep (gc's progress, when gc and verify last ran) ----

    def get_note(self, txn: lmdb.Transaction, key: str) -> object | None:
        """The JSON value kept under `meta` "note/KEY" (None: there is none)."""
        raw = txn.get(NOTE_PREFIX + key.encode(), db=self.db["meta"])
        return None if raw is None else self._json(raw, f"meta/note/{key}")

    def put_note(self, txn: lmdb.Transaction, key: str, value: object) -> None:
        txn.put(NOTE_PREFIX + key.encode(), json.dumps(value).encode(), db=self.db["meta"])

    def delete_note(self, txn: lmdb.Transaction, key: str) -> None:
        txn.delete(NOTE_PREFIX + key.encode(), db=self.db["meta"])

    # -- verify's records -------------------------------------------------------------------

    def mark_bad(self, txn: lmdb.Transaction, digest: bytes, info: dict) -> None:
        txn.put(digest, json.dumps(info).encode(), db=self.db["bad"])

    def is_bad(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        return "bad" in self.db and txn.get(digest, db=self.db["bad"]) is not None

    def any_bad(self, txn: lmdb.Transaction) -> bool:
        """Whether any chunk is marked bad."""
        return "bad" in self.db and txn.stat(self.db["bad"])["entries"] > 0

    def bad_chunks(self, txn: lmdb.Transaction) -> dict[bytes, dict]:
        if "bad" not in self.db:
            return {}
        return {key: self._json(value, f"bad/{key.hex()}")
                for key, value in self._scan(txn, "bad", b"")}

    def clear_bad(self, txn: lmdb.Transaction, digest: bytes) -> None:
        txn.delete(digest, db=self.db["bad"])
        txn.delete(SUSPECT_PREFIX + digest, db=self.db["meta"])

    def clear_suspect(self, txn: lmdb.Transaction, digest: bytes) -> None:
        txn.delete(SUSPECT_PREFIX + digest, db=self.db["meta"])

    def put_verified(self, txn: lmdb.Transaction, pack: int, info: dict) -> None:
        txn.put(_PACK_KEY.pack(pack), json.dumps(info).encode(), db=self.db["verified"])

    def verified(self, txn: lmdb.Transaction) -> dict[int, dict]:
        """When each pack was last verified whole, and what was found (packs never
        verified are absent)."""
        if "verified" not in self.db:
            return {}
        return {_PACK_KEY.unpack(key)[0]: self._json(value, "verified record")
                for key, value in self._scan(txn, "verified", b"")}

    # -- packs in the object store ----------------------------------------------------------

    def put_pack_state(self, txn: lmdb.Transaction, pack: int, state: str, size: int,
                       at: float, pid: int | None = None) -> None:
        """Record `pack`'s copy in the store: "uploading" by process `pid` (a PUT may be
        under way; once that process is gone, another uploads it again) or "stored" (the
        whole pack is there)."""
        record = {"state": state, "size": size, "at": at}
        if pid is not None:
            record["pid"] = pid
        txn.put(_PACK_KEY.pack(pack), json.dumps(record).encode(), db=self.db["stored"])

    def drop_pack_state(self, txn: lmdb.Transaction, pack: int) -> None:
        """`pack` has no copy in the store (an upload failed): only the local one."""
        txn.delete(_PACK_KEY.pack(pack), db=self.db["stored"])

    def pack_states(self, txn: lmdb.Transaction) -> dict[int, dict]:
        """Every pack's store record (packs only local are absent)."""
        if "stored" not in self.db:
            return {}
        return {_PACK_KEY.unpack(key)[0]: self._json(value, "stored record")
                for key, value in self._scan(txn, "stored", b"")}

    def pack_state(self, txn: lmdb.Transaction, pack: int) -> dict | None:
        if "stored" not in self.db:
            return None
        raw = txn.get(_PACK_KEY.pack(pack), db=self.db["stored"])
        return None if raw is None else self._json(raw, f"stored/{pack}")

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
        """The extent's key and value alone, no chunk reference taken (see add_extent),
        and its entry in `gens` (what purge scans)."""
        txn.put(extent_key(lineage, block, gen), value, db=self.db["extents"])
        txn.put(gen_key(lineage, gen, block), b"", db=self.db["gens"])

    def drop_extent(self, txn: lmdb.Transaction, lineage: int, block: int, gen: int) -> None:
        """Delete one extent (with its `gens` entry), releasing its chunk reference."""
        value = txn.pop(extent_key(lineage, block, gen), db=self.db["extents"])
        txn.delete(gen_key(lineage, gen, block), db=self.db["gens"])
        if value:  # None: no such extent; ZERO: no reference
            self.incref(txn, value, -1)

    def add_extent(
        self, txn: lmdb.Transaction, lineage: int, block: int, gen: int, value: bytes
    ) -> None:
        """Record that `block` of `lineage` reads `value` from generation `gen` on, with
        the reference that extent holds on its chunk (a ZERO extent holds none).

        Every writer of extents comes here (a capture's publish, an archive batch, the
        detach of a clone from its origin), so an extent and its chunk reference never
        part. They all write a key that is not there yet (a new generation, or
        generation 0 where a lineage has none), so nothing is replaced or released.
        """
        self.put_extent(txn, lineage, block, gen, value)
        if value != ZERO:
            self.incref(txn, value)

    def drop_extents_since(self, txn: lmdb.Transaction, lineage: int, gen: int) -> set[int]:
        """Delete a lineage's extents of generations >= `gen` (releasing their chunks);
        returns the blocks they were of."""
        dropped = list(self.iter_gens(txn, lineage, gen, MAX_GEN))
        for block, g in dropped:
            self.drop_extent(txn, lineage, block, g)
        return {block for block, _ in dropped}

    def iter_extents(
        self, txn: lmdb.Transaction, lineage: int
    ) -> Iterator[tuple[int, int, bytes]]:
        """(block, gen, value) of every extent of a lineage, by block then newest gen."""
        for key, value in self._scan(txn, "extents", u64(lineage)):
            _, block, gen = decode_extent_key(key)
            yield block, gen, value

    def iter_gens(
        self, txn: lmdb.Transaction, lineage: int, low: int, high: int
    ) -> Iterator[tuple[int, int]]:
        """(block, gen) of a lineage's extents of generations low..high (both included),
        by gen then block: the cost is those extents, not the lineage's."""
        end = gen_key(lineage, high, MAX_GEN)
        with txn.cursor(db=self.db["gens"]) as cur:
            if not cur.set_range(gen_key(lineage, low, 0)):
                return
            for key in cur.iternext(values=False):
                if key > end:
                    return
                _, gen, block = _EXTENT_KEY.unpack(key)
                yield block, gen

    def next_rewrite(self, txn: lmdb.Transaction, lineage: int, block: int, gen: int) -> int | None:
        """The first generation after `gen` at which `lineage` wrote `block` again, if any
        (extents sort newest first, so it is the key just before this one)."""
        with txn.cursor(db=self.db["extents"]) as cur:
            if not cur.set_range(extent_key(lineage, block, gen)) or not cur.prev():
                return None
            found, found_block, newer = decode_extent_key(cur.key())
            return newer if (found, found_block) == (lineage, block) else None

    # -- chunks ---------------------------------------------------------------------------

    def get_chunk(self, txn: lmdb.Transaction, digest: bytes) -> ChunkLoc | None:
        raw = txn.get(digest, db=self.db["chunks"])
        return None if raw is None else self._chunk_loc(digest, raw)

    def _chunk_loc(self, digest: bytes, raw: bytes) -> ChunkLoc:
        if len(raw) != _CHUNK_VAL.size:
            raise self.damaged(f"record chunks/{digest.hex()} is {len(raw)} bytes")
        return ChunkLoc.decode(raw)

    def iter_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ChunkLoc]]:
        """(digest, location) of every stored chunk, by digest."""
        for digest, raw in self._scan(txn, "chunks", b""):
            yield digest, self._chunk_loc(digest, raw)

    def live_stored_bytes(self, txn: lmdb.Transaction) -> int:
        """Stored bytes that some extent still references: the record lengths of the
        chunks with a refcount above 0 (a scan of `chunks`)."""
        return sum(loc.length for _, loc in self.iter_chunks(txn) if loc.refcount > 0)

    def has_chunk(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        return txn.get(digest, db=self.db["chunks"]) is not None


    def put_chunk(self, txn: lmdb.Transaction, digest: bytes, loc: ChunkLoc) -> None:
        """Name a new chunk record (the digest must not be named yet)."""
        txn.put(digest, loc.encode(), db=self.db["chunks"])
        self._account(txn, loc.pack, 1, loc.refcount > 0, loc.length)
        if not loc.refcount:
            self._zero_since(txn, digest)

    def _zero_since(self, txn: lmdb.Transaction, digest: bytes) -> None:
        """Note that `digest` has refcount 0 from now (the clock GC compares with writers'
        start times: the system's, never RPFS_NOW)."""
        txn.put(digest, _TIME.pack(time.time()), db=self.db["zero"])

    def keep_zero(self, txn: lmdb.Transaction, digest: bytes) -> None:
        """A writer will name `digest`: if it has refcount 0, count it free from now."""
        if txn.get(digest, db=self.db["zero"]) is not None:
            self._zero_since(txn, digest)

    def zero_since(self, txn: lmdb.Transaction, digest: bytes) -> float | None:
        """Since when `digest` has refcount 0 (None: it is referenced, or not stored)."""
        raw = txn.get(digest, db=self.db["zero"]) if "zero" in self.db else None
        return None if raw is None else _TIME.unpack(raw)[0]

    def zero_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, float]]:
        """(digest, since when) of every chunk with refcount 0, by digest."""
        if "zero" not in self.db:
            return
        for key, value in self._scan(txn, "zero", b""):
            yield key, _TIME.unpack(value)[0]

    def move_chunk(self, txn: lmdb.Transaction, digest: bytes, loc: ChunkLoc) -> None:
        """Point chunk `digest` at another record of the same content (`loc`, whose
        refcount is ignored: the chunk keeps its own), with the accounting of both packs."""
        old = self.get_chunk(txn, digest)
        if old is None:
            raise KeyError(f"chunk {digest.hex()} is not stored")
        new = ChunkLoc(loc.pack, loc.offset, loc.length, old.refcount)
        txn.put(digest, new.encode(), db=self.db["chunks"])
        self._account(txn, old.pack, -1, -(old.refcount > 0), old.length)
        self._account(txn, new.pack, 1, new.refcount > 0, new.length)
        if not new.refcount:  # a writer's fresh copy: GC waits for that writer again
            self._zero_since(txn, digest)

    def delete_chunk(self, txn: lmdb.Transaction, digest: bytes) -> None:
        loc = self.get_chunk(txn, digest)
        if loc is None:
            return
        txn.delete(digest, db=self.db["chunks"])
        txn.delete(digest, db=self.db["zero"])
        self._account(txn, loc.pack, -1, -(loc.refcount > 0), loc.length)

    def incref(self, txn: lmdb.Transaction, digest: bytes, n: int = 1) -> None:
        loc = self.get_chunk(txn, digest)
        if loc is None:
            raise KeyError(f"chunk {digest.hex()} is referenced but not stored")
        count = loc.refcount + n
        txn.put(digest, ChunkLoc(loc.pack, loc.offset, loc.length, count).encode(),
                db=self.db["chunks"])
        live = (count > 0) - (loc.refcount > 0)  # only a change to or from 0 counts
        if live:
            self._account(txn, loc.pack, 0, live, loc.length)
        if live < 0:
            self._zero_since(txn, digest)
        elif live > 0:
            txn.delete(digest, db=self.db["zero"])

    def _account(self, txn: lmdb.Transaction, pack: int, named: int, live: int,
                 length: int) -> None:
        key = _PACK_KEY.pack(pack)
        stats = self._pack_stats(key, txn.get(key, db=self.db["packstats"]))
        stats = stats.plus(named, live, length)
        if stats == PackStats():
            txn.delete(key, db=self.db["packstats"])
        else:
            txn.put(key, stats.encode(), db=self.db["packstats"])

    def _pack_stats(self, key: bytes, raw: bytes | None) -> PackStats:
        if raw is None:
            return PackStats()
        if len(raw) != _PACK_STATS.size:
            raise self.damaged(
                f"record packstats/{_PACK_KEY.unpack_from(key)[0]} is {len(raw)} bytes")
        return PackStats(*_PACK_STATS.unpack(raw))

    def forget_pack(self, txn: lmdb.Transaction, pack: int) -> None:
        """Drop what the index keeps of a deleted pack (it names no chunk in it)."""
        txn.delete(_PACK_KEY.pack(pack), db=self.db["verified"])
        txn.delete(_PACK_KEY.pack(pack), db=self.db["packstats"])
        txn.delete(_PACK_KEY.pack(pack), db=self.db["stored"])

    def pack_stats(self, txn: lmdb.Transaction) -> dict[int, PackStats]:
        """What each pack holds that the index names (packs holding none are absent)."""
        if "packstats" not in self.db:  # a read-only copy made before it existed
            return {}
        return {_PACK_KEY.unpack(key)[0]: self._pack_stats(key, raw)
                for key, raw in self._scan(txn, "packstats", b"")}

    @staticmethod
    def count_packs(txn: lmdb.Transaction, chunks: lmdb._Database) -> dict[int, PackStats]:
        """The pack stats recounted from `chunks`: a scan, for `rpfs check` and for an
        index made before `packstats` existed."""
        out: dict[int, PackStats] = {}
        with txn.cursor(db=chunks) as cur:
            for raw in cur.iternext(keys=False):
                loc = ChunkLoc.decode(raw)
                out[loc.pack] = out.get(loc.pack, PackStats()).plus(
                    1, loc.refcount > 0, loc.length)
        return out

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
            (self._u64(k, "captures key"), self._json(v, f"captures/{_show(k)}"))
            for k, v in txn.cursor(db=self.db["captures"])
        ]

    # -- disks, points, lineages ----------------------------------------------------------

    def get_disk(self, txn: lmdb.Transaction, name: str) -> DiskRecord | None:
        return self._record(DiskRecord, txn.get(name.encode(), db=self.db["disks"]),
                            f"disks/{name}")

    def disk_named(self, txn: lmdb.Transaction, name: str) -> DiskRecord:
        """The disk `name`; the one error every command gives for a disk that is not there."""
        disk = self.get_disk(txn, name)
        if disk is None:
            raise RpfsError(f"no disk named {name!r}; 'rpfs disks' lists them")
        return disk

    def put_disk(self, txn: lmdb.Transaction, disk: DiskRecord) -> None:
        txn.put(disk.name.encode(), disk.encode(), db=self.db["disks"])

    def delete_disk(self, txn: lmdb.Transaction, name: str) -> None:
        """Drop the disk's record, and its policy with it (a new disk of that name starts
        without one)."""
        txn.delete(name.encode(), db=self.db["disks"])
        txn.delete(name.encode(), db=self.db["policies"])

    def get_policy(self, txn: lmdb.Transaction, disk: str) -> bytes | None:
        """The disk's stored policy, as `Policy.encode` wrote it (None: it has none)."""
        if "policies" not in self.db:  # a read-only copy made before policies existed
            return None
        return txn.get(disk.encode(), db=self.db["policies"])

    def put_policy(self, txn: lmdb.Transaction, disk: str, policy: bytes) -> None:
        txn.put(disk.encode(), policy, db=self.db["policies"])

    def delete_policy(self, txn: lmdb.Transaction, disk: str) -> bool:
        """Drop the disk's policy; whether it had one."""
        return txn.delete(disk.encode(), db=self.db["policies"])

    def list_policies(self, txn: lmdb.Transaction) -> list[tuple[str, bytes]]:
        """(disk, stored policy) of every disk that has one, by disk name."""
        if "policies" not in self.db:
            return []
        return [(key.decode(), value) for key, value in self._scan(txn, "policies", b"")]

    def delete_point(self, txn: lmdb.Transaction, disk: str, name: str) -> None:
        txn.delete(_point_key(disk, name), db=self.db["points"])

    def list_lineages(self, txn: lmdb.Transaction) -> list[LineageRecord]:
        return self._records(txn, LineageRecord, "lineages")

    def delete_lineage(self, txn: lmdb.Transaction, lineage: int) -> int:
        """Drop a lineage's record and extents, releasing their chunk references; returns
        how many extents it had."""
        values = self._delete_prefix(txn, "extents", u64(lineage))
        for value in values:
            if value != ZERO:
                self.incref(txn, value, -1)
        self._delete_prefix(txn, "gens", u64(lineage))
        txn.delete(u64(lineage), db=self.db["lineages"])
        return len(values)

    def recount(self, txn: lmdb.Transaction) -> tuple[dict[bytes, int], list[str]]:
        """References recounted from scratch: how many extents name each chunk, and what
        does not add up between `extents` and `gens` (each extent has exactly one entry
        there). A full scan of both: for checks (`rpfs check`, the tests), never on a
        command's path."""
        counts: dict[bytes, int] = {}
        problems = []
        indexed = set()
        for key, value in self._scan(txn, "extents", b""):
            lineage, block, gen = decode_extent_key(key)
            indexed.add(gen_key(lineage, gen, block))
            if value != ZERO:
                counts[value] = counts.get(value, 0) + 1
        for key, _ in self._scan(txn, "gens", b""):
            if key not in indexed:
                problems.append(f"gens entry {_show_gen(key)} has no extent")
            indexed.discard(key)
        problems += [f"extent {_show_gen(key)} is missing from gens" for key in sorted(indexed)]
        return counts, problems

    def list_disks(self, txn: lmdb.Transaction) -> list[DiskRecord]:
        return self._records(txn, DiskRecord, "disks")

    def get_point(self, txn: lmdb.Transaction, disk: str, name: str) -> PointRecord | None:
        return self._record(PointRecord, txn.get(_point_key(disk, name), db=self.db["points"]),
                            f"points/{disk}@{name}")

    def point_named(self, txn: lmdb.Transaction, disk: str, name: str) -> PointRecord:
        """The point DISK@NAME; the one error every command gives for a point (or its disk)
        that is not there."""
        point = self.get_point(txn, disk, name)
        if point is None:
            self.disk_named(txn, disk)
            raise RpfsError(f"disk {disk} has no point {name!r}; 'rpfs points {disk}' lists them")
        return point

    def put_point(self, txn: lmdb.Transaction, point: PointRecord) -> None:
        txn.put(_point_key(point.disk, point.name), point.encode(), db=self.db["points"])

    def list_points(self, txn: lmdb.Transaction, disk: str | None = None) -> list[PointRecord]:
        """Points of one disk (or all), oldest first within each disk."""
        prefix = b"" if disk is None else disk.encode() + b"\0"
        out = self._records(txn, PointRecord, "points", prefix)
        out.sort(key=lambda p: (p.disk, p.lineage, p.gen))
        return out

    # -- the trash (deleted points, not purged yet) -----------------------------------------

    def put_trash(self, txn: lmdb.Transaction, entry: TrashRecord) -> None:
        txn.put(_trash_key(entry.point), entry.encode(), db=self.db["trash"])

    def delete_trash(self, txn: lmdb.Transaction, point: PointRecord) -> None:
        txn.delete(_trash_key(point), db=self.db["trash"])

    def list_trash(
        self, txn: lmdb.Transaction, disk: str | None = None, name: str | None = None
    ) -> list[TrashRecord]:
        """Deleted points of one disk (or all; of one name if given), oldest deletion
        first."""
        if "trash" not in self.db:  # a read-only copy made before the trash existed
            return []
        prefix = b"" if disk is None else disk.encode() + b"\0"
        if disk is not None and name is not None:
            prefix = _point_key(disk, name) + b"\0"
        out = []
        for key, value in self._scan(txn, "trash", prefix):
            fields = self._json(value, f"trash/{_show(key[:-17])}")
            try:
                out.append(TrashRecord.from_fields(**fields))
            except TypeError:
                raise self.damaged(f"record trash/{_show(key[:-17])} does not hold a "
                                   "TrashRecord") from None
        out.sort(key=lambda t: (t.deleted_at, t.point.disk, t.point.name))
        return out

    def salvage_points(self, txn: lmdb.Transaction) -> list[str]:
        """DISK@POINT of every point in a damaged index, read from the keys (a damaged
        record still names its point); the scan stops at a page LMDB cannot follow."""
        found = []
        with contextlib.suppress(lmdb.Error):
            found.extend(_show(key) for key, _ in self._scan(txn, "points", b""))
        return found

    def point_at(self, txn: lmdb.Transaction, lineage: int, gen: int) -> PointRecord | None:
        """The point that froze `gen` of `lineage`, if it still exists."""
        rec = self.get_lineage(txn, lineage)
        for disk in rec.disks if rec else ():
            for point in self.list_points(txn, disk):
                if point.lineage == lineage and point.gen == gen:
                    return point
        return None

    # -- block maps of writable disks ------------------------------------------------------

    def map_files(self, txn: lmdb.Transaction) -> set[int]:
        """The local files that have block-map pages (a scan of `blockmap`'s keys)."""
        with txn.cursor(db=self.db["blockmap"]) as cur:
            return {_U64.unpack_from(key)[0] for key in cur.iternext(values=False)}

    def map_pages(self, txn: lmdb.Transaction, file_id: int) -> Iterator[tuple[int, bytes]]:
        """(page number, state bytes) of a local file's persisted block map."""
        for key, value in self._scan(txn, "blockmap", u64(file_id)):
            yield _U64.unpack(key[8:])[0], value

    def put_map_page(self, txn: lmdb.Transaction, file_id: int, page: int, value: bytes) -> None:
        txn.put(u64(file_id) + u64(page), value, db=self.db["blockmap"])

    def drop_map(self, txn: lmdb.Transaction, file_id: int) -> None:
        self._delete_prefix(txn, "blockmap", u64(file_id))

    def get_lineage(self, txn: lmdb.Transaction, lineage: int) -> LineageRecord | None:
        return self._record(LineageRecord, txn.get(u64(lineage), db=self.db["lineages"]),
                            f"lineages/{lineage}")

    def put_lineage(self, txn: lmdb.Transaction, rec: LineageRecord) -> None:
        txn.put(u64(rec.id), rec.encode(), db=self.db["lineages"])

    def new_lineage(
        self, txn: lmdb.Transaction, disk: str, origin: tuple[int, int] | None = None
    ) -> LineageRecord:
        """A new, stored lineage of `disk` with no generation yet; reads past its own
        extents fall through to `origin` (lineage, gen), if given."""
        rec = LineageRecord(self.next_id(txn, "lineage"), disks=[disk])
        if origin is not None:
            rec.parent, rec.parent_gen = origin
        self.put_lineage(txn, rec)
        return rec


def _show(key: bytes) -> str:
    """A key as the operator can read it: text keys as text, u64 keys as numbers."""
    if len(key) == 8 and key[0] == 0:
        return str(_U64.unpack(key)[0])
    return key.replace(b"\0", b"@").decode(errors="backslashreplace")


def _show_gen(key: bytes) -> str:
    return "(lineage {}, gen {}, block {})".format(*_EXTENT_KEY.unpack(key))


class _Txn:
    """`with index.read() / index.write() as txn`: LMDB's transaction, committed at the
    end (a read one simply ends), with LMDB's damage errors raised as IndexDamaged."""

    __slots__ = ("_index", "_txn", "_write")

    def __init__(self, index: Index, write: bool) -> None:
        self._index = index
        self._write = write

    def __enter__(self) -> lmdb.Transaction:
        try:
            self._txn = self._index.env.begin(write=self._write, buffers=False)
        except _DAMAGE as exc:
            raise self._index.damaged(str(exc)) from exc
        return self._txn

    def __exit__(self, typ, exc, tb) -> None:
        try:
            self._txn.__exit__(typ, exc, tb)  # commits, or aborts after an exception
        except lmdb.Error as commit_exc:
            self._translate(commit_exc)
            raise
        if isinstance(exc, lmdb.Error):
            self._translate(exc)

    def _translate(self, exc: lmdb.Error) -> None:
        if isinstance(exc, _DAMAGE):
            raise self._index.damaged(str(exc)) from exc
        if isinstance(exc, lmdb.DiskError):
            # No room for the commit's pages: a full disk, not a damaged index, raised as
            # ENOSPC naming the index like any other write would be.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._index.path)) from None
