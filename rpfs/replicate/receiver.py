"""The receiving side of replication: one point's stream becomes one new point, in one
transaction, only once the stream is whole and verified.

A received point is a new generation of the target disk's lineage (a captured disk: it
has only points), whatever the source's generations were: its extents are the blocks
where what it reads (the base's content, changed by the stream's map) differs from the
disk's newest generation. So a point older than the newest can come later (backfill),
and the target's lineages stay its own.

The chunks arrive like a capture's: appended to this receive's own packs, every record
decoded and hashed before it is taken, registered (refcount 0) as they are made durable,
with a `captures` record that keeps GC away from them and from the chunks the map
deduplicates against. A stream that fails leaves the chunks it delivered registered, so
asking again transfers only the rest; it never leaves a point or an extent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..capture import FLUSH_BYTES, reap_dead_captures
from ..errors import SPACE_ERRNOS, RpfsError
from ..index import ZERO, DiskRecord, PointRecord
from ..ingest import SESSIONS, Change, Ingest
from ..lifecycle import marks
from ..lifecycle.purge import release
from ..lineage import allocated_at, can_differ
from ..names import ceil_div, check_name
from ..progress import ProgressFn
from ..repo import CODEC, HASH, Repository
from ..store.format import HEADER as RECORD_HEADER
from ..store.format import decode_chunk
from .stream import (
    CHUNK,
    EXTENTS,
    HEADER,
    MAP_END,
    META,
    READ_VERSIONS,
    TRAILER,
    Reader,
    StreamError,
    decode_extents,
    identity,
)

log = logging.getLogger(__name__)

# A note per disk (`note/replicated/DISK`): the identities of every point received into
# it, so a pull does not fetch again a point the target's own retention removed.
NOTE = "replicated/"

# Asks the sender for the chunks the receiver lacks; how many bytes of records follow.
Ask = Callable[[list[bytes]], int]


def held(repo: Repository, disk: str) -> dict[str, PointRecord]:
    """The points of `disk` on this repository by identity (none if there is no disk)."""
    index = repo.index
    me = repo.index.repository_id or ""
    with index.read() as txn:
        return {identity(me, p): p for p in index.list_points(txn, disk)}


def received(repo: Repository, disk: str) -> set[str]:
    """The identities ever received into `disk` (while the disk exists)."""
    with repo.index.read() as txn:
        if repo.index.get_disk(txn, disk) is None:
            return set()
        return set(repo.index.get_note(txn, NOTE + disk) or [])


@dataclass
class _Stream:
    """What a stream's header and map say."""

    header: dict
    meta: dict
    disk: str
    delta: dict[int, bytes] = field(default_factory=dict)


def receive_point(
    repo: Repository, reader: Reader, disk: str | None = None, ask: Ask | None = None,
    progress: ProgressFn | None = None, total: int | None = None,
) -> PointRecord:
    """Read one point's stream from `reader` and publish it as a point of `disk` (default:
    the source's disk name). `ask`: a session, where the receiver names the chunks it
    lacks; without it the stream carries its chunks unasked. `total`: the stream's size
    in bytes if known (a file), for `progress`."""
    header = reader.expect_json(HEADER)
    target = check_name(disk or _field(header, "disk", str), "disk name")
    _check_header(repo, header)
    meta = reader.expect_json(META)
    with repo.disk_lock(target):
        reap_dead_captures(repo, target)
        with SESSIONS.writing():
            return _Receive(repo, reader, _Stream(header, meta, target), ask, progress,
                            total).run()


def _field(record: dict, key: str, kind: type | tuple[type, ...]):
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StreamError(f"the stream's {key!r} is missing or not valid")
    return value


def _check_header(repo: Repository, header: dict) -> None:
    if header.get("format") != "rpfs-stream" or header.get("version") not in READ_VERSIONS:
        raise StreamError(f"the stream is of format {header.get('format')!r} version "
                          f"{header.get('version')!r}; this rpfs reads rpfs-stream "
                          f"versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}")
    block_size = _field(header, "block_size", int)
    if block_size != repo.block_size:
        raise RpfsError(f"the stream is of {block_size}-byte blocks and {repo.root} has "
                        f"{repo.block_size}-byte blocks: a point moves only between "
                        "repositories of one block size")
    if header.get("hash") != HASH or header.get("codec") != CODEC:
        raise RpfsError(f"the stream's hash {header.get('hash')!r} and codec "
                        f"{header.get('codec')!r} are not this repository's")
    _field(header, "size", int)
    _field(header, "point", str)
    if header.get("base") is not None:
        _field(header, "base", str)


class _Receive:
    def __init__(self, repo: Repository, reader: Reader, stream: _Stream, ask: Ask | None,
                 progress: ProgressFn | None, total: int | None) -> None:
        self.repo = repo
        self.index = repo.index
        self.reader = reader
        self.s = stream
        self.ask = ask
        self.progress = progress or (lambda done, total: None)
        self.total = total
        self.ingest = Ingest(repo)
        self.size = stream.header["size"]
        self.name = check_name(_field(stream.meta, "name", str), "point name")
        self.ident = stream.header["point"]

    def run(self) -> PointRecord:
        self.repo.space.check(f"a receive into {self.s.disk}")
        base = self._check_target()
        capture_id = self._begin()
        try:
            self._read_chunks(self._read_map())
            point = self._publish(base, capture_id)
        except BaseException as exc:
            self._abandon(capture_id, exc)
            raise
        log.info("disk %s: point %s received (%s), %d blocks written, %d bytes stored",
                 point.disk, point.name, "full" if base is None else f"from {base.name}",
                 point.blocks_written, point.bytes_stored)
        return point

    # -- before any chunk --------------------------------------------------------------

    def _check_target(self) -> PointRecord | None:
        """The target disk can take this point; the base point it is relative to."""
        disk, name = self.s.disk, self.name
        with self.index.read() as txn:
            record = self.index.get_disk(txn, disk)
            taken = self.index.get_point(txn, disk, name) is not None
        have = held(self.repo, disk)
        if self.ident in have:
            raise RpfsError(f"{self.s.header.get('disk')}@{name} is here already, as "
                            f"{have[self.ident].ref}; nothing was received")
        if record is not None:
            if record.writable:
                raise RpfsError(f"disk {disk} here is a writable disk; receive into a new "
                                "disk name (--disk NAME)")
            if record.size != self.size:
                raise RpfsError(f"the stream's disk is {self.size} bytes and disk {disk} here "
                                f"is {record.size}; receive into a new disk name (--disk NAME)")
        if taken:
            raise RpfsError(f"disk {disk} here has another point named {name}; receive "
                            "into a new disk name (--disk NAME)")
        base_ident = self.s.header.get("base")
        if base_ident is None:
            return None
        base = have.get(base_ident)
        if base is None:
            raise RpfsError(
                f"the stream is relative to {self.s.header.get('disk')}@"
                f"{self.s.header.get('base_name')}, which disk {disk} here does not have: "
                "receive that point first, or send a full stream (no --from)")
        return base

    def _begin(self) -> int:
        """A capture record: GC leaves this receive's packs, and the chunks it names,
        alone while it lives (gc.py's fence)."""
        with self.index.write() as txn:
            capture_id = self.index.next_id(txn, "capture")
            self.index.put_capture(txn, capture_id, {
                "disk": self.s.disk, "pid": os.getpid(), "started": time.time(),
                "packs_after": self.index.last_id(txn, "pack"), "receive": True})
        return capture_id

    def _read_map(self) -> list[bytes]:
        """Read the extent map; the chunks it names that this repository lacks (or holds
        only a bad copy of). The rest it keeps from
        GC for this receive (`keep_zero`)."""
        nblocks = ceil_div(self.size, self.repo.block_size)
        delta = self.s.delta
        while True:
            kind, payload = self.reader.record()
            if kind == MAP_END:
                break
            if kind != EXTENTS:
                raise StreamError(f"{self.reader.where}: a record of kind {chr(kind)!r} "
                                  "inside the extent map")
            for block, value in decode_extents(payload):
                if block >= nblocks or block in delta:
                    raise StreamError(f"{self.reader.where}: its map names block {block} "
                                      "twice or past the disk's end")
                delta[block] = value
        self.named = {v for v in delta.values() if v != ZERO}
        missing = []
        with self.index.write() as txn:
            for value in self.named:
                if self.index.get_chunk(txn, value) is None or self.index.is_bad(txn, value):
                    missing.append(value)
                else:
                    self.index.keep_zero(txn, value)
        return missing

    # -- chunks ----------------------------------------------------------------------------

    def _read_chunks(self, missing: list[bytes]) -> None:
        """Take the chunk records up to the trailer: each must be one the map names,
        decoded and hashed here; the ones this repository has already are skipped."""
        wanted = set(missing)
        total = self.total
        if self.ask is not None:
            total = self.ask(missing)
        done = 0
        self.progress(0, total)
        bs = self.repo.block_size
        while True:
            at = self.reader.bytes
            kind, payload = self.reader.record()
            if kind == TRAILER:
                break
            if kind != CHUNK or len(payload) < RECORD_HEADER.size:
                raise StreamError(f"{self.reader.where}: a record of kind {chr(kind)!r} "
                                  "among the chunks")
            value = RECORD_HEADER.unpack_from(payload)[2]
            if value not in self.named:
                raise StreamError(f"{self.reader.where}: a chunk at byte {at} that its map "
                                  "does not name")
            if value in wanted:
                try:
                    decode_chunk(payload, value, bs, (self.reader.where, at), full=True)
                except RpfsError as exc:
                    raise StreamError(f"{exc}; the source's copy is bad: run 'rpfs verify' "
                                      "there") from None
                wanted.discard(value)
                self.ingest.take(Change(0, value, bytes(payload), 0))
                if self.ingest.pending_bytes >= FLUSH_BYTES:
                    self._flush()
            done += len(payload)
            self.progress(done, total if total is not None else None)
        self._flush()
        self.ingest.close()
        if wanted:
            raise StreamError(f"{self.reader.where} lacks {len(wanted)} chunks its map names "
                              "(it was made relative to another base?); nothing was published")

    def _flush(self) -> None:
        """Make the records taken durable, then name them in the index (refcount 0)."""
        self.ingest.sync()
        with self.index.write() as txn:
            self.ingest.register(txn)
        self.ingest.committed()

    # -- the commit point ------------------------------------------------------------------

    def _publish(self, base: PointRecord | None, capture_id: int) -> PointRecord:
        """One transaction: the new generation's extents and the point (and the receive's
        capture record goes)."""
        index, s, meta = self.index, self.s, self.s.meta
        description = marks.check_description(meta.get("description") or "")
        hold = meta.get("hold")
        if hold is not None:
            check_name(hold, "hold tag")
        expires = meta.get("expires")
        if expires is not None and not isinstance(expires, int | float):
            raise StreamError("the stream's expiry is not a time")
        created = _field(meta, "created", int | float)
        with index.write() as txn:
            disk = index.get_disk(txn, s.disk)
            if disk is None:
                lineage = index.new_lineage(txn, s.disk)
                disk = DiskRecord(s.disk, self.size, lineage.id, time.time())
                index.put_disk(txn, disk)
                head_chain: list[tuple[int, int]] = []
            else:
                lineage = index.get_lineage(txn, disk.lineage)
                head_chain = index.chain(txn, lineage.id, lineage.head_gen)
            base_chain = [] if base is None else index.chain(txn, base.lineage, base.gen)
            allocated = 0 if base is None else allocated_at(index, txn, base.lineage, base.gen)
            gen = lineage.head_gen + 1
            written = 0
            for block in sorted(s.delta.keys() | can_differ(index, txn, base_chain, head_chain)):
                was = index.resolve(txn, base_chain, block) if base_chain else ZERO
                value = s.delta.get(block, was)
                allocated += (value != ZERO) - (was != ZERO)
                now = index.resolve(txn, head_chain, block) if head_chain else ZERO
                if value == now:
                    continue
                if value != ZERO and index.get_chunk(txn, value) is None:
                    raise StreamError(f"chunk {value.hex()[:16]} of block {block} is gone "
                                      "from this repository (a gc ran?); run it again")
                index.add_extent(txn, lineage.id, block, gen, value)
                written += 1
            lineage.head_gen = gen
            index.put_lineage(txn, lineage)
            if gen > 1:  # the head read gen - 1 until now
                release(index, txn, lineage.id, gen - 1)
            point = PointRecord(
                disk=s.disk, name=self.name, lineage=lineage.id, gen=gen, created=created,
                size=self.size, blocks_written=written, allocated_blocks=allocated,
                bytes_stored=self.ingest.bytes_stored, method="received",
                description=description, expires=expires, hold=hold,
                replica_of=self.ident,
            )
            index.put_point(txn, point)
            seen = index.get_note(txn, NOTE + s.disk) or []
            index.put_note(txn, NOTE + s.disk, [*seen, self.ident])
            index.drop_staged(txn, capture_id)
        return point

    def _abandon(self, capture_id: int, exc: BaseException) -> None:
        """After a failure: keep the chunks that arrived whole (registered, for the
        retry), unless the disk is full (then they go, as a failed capture's do); the
        capture record goes either way."""
        full = isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS
        try:
            if not full:
                self._flush()
                self.ingest.close()
        except Exception:
            full = True
            log.info("disk %s: keeping the chunks of the failed receive failed too",
                     self.s.disk, exc_info=True)
        if full:
            self.ingest.discard()
        try:
            with self.index.write() as txn:
                self.index.drop_staged(txn, capture_id)
        except Exception:  # the next capture or receive of the disk drops it
            log.info("disk %s: dropping the failed receive's record failed too", self.s.disk,
                     exc_info=True)
