"""Turning blocks into stored chunks: the half of capture and live archiving they share.

Workers call `examine()` (hash, compare with the previous value, compress only chunks the
store lacks); one thread calls `take()` to append records to this writer's packs, and
`sync()` + `register()` to make them durable and then known to the index. The order
matters: pack bytes are fsynced before the index transaction that names them commits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .index import ZERO, ChunkLoc, Index
from .repo import Repository
from .store.format import digest, encode_chunk

log = logging.getLogger(__name__)


@dataclass
class Change:
    block: int
    value: bytes  # chunk digest or ZERO
    record: bytes | None  # pack record to append, if the store lacks the chunk
    allocated_delta: int  # +1 zero -> data, -1 data -> zero
    # The block's bytes, while it deduplicates against a chunk with refcount 0 that GC
    # may free until the writer protects it (Ingest.protect).
    revive: bytes | None = None


def examine(index: Index, txn, block: int, raw, zero: bytes, prev: bytes,
            any_bad: bool = True) -> Change | None:
    """Compare one block's bytes with its previous value; None if unchanged. `any_bad`:
    whether verify marked any chunk bad (`Index.any_bad`, asked once per batch: nearly
    always none, and then no block needs the lookup)."""
    value = ZERO if raw is None or raw == zero else digest(raw)
    bad = any_bad and value != ZERO and index.is_bad(txn, value)  # its record is bad
    if value == prev and not bad:
        return None
    change = Change(block, value, None, (value != ZERO) - (prev != ZERO))
    if value == ZERO:
        return change
    known = None if bad else index.get_chunk(txn, value)
    if known is None:
        # A bad chunk is never deduplicated against: this good copy heals it (register),
        # even where the block did not change (the new point then writes it again).
        change.record = encode_chunk(bytes(raw), value)
    elif not known.refcount:
        change.revive = bytes(raw)
    return change


class _Sessions:
    """The writers of this process that may name chunks they examined earlier, and since
    when: GC frees a chunk with refcount 0 only if it dropped to 0 before every writer
    started (a writer that saw it referenced may name it still). A session spans one
    writer's examine-to-commit: a capture from start to publish, an archive batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._next = 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._started[token] = time.time()
        try:
            yield
        finally:
            with self._lock:
                del self._started[token]

    def oldest(self) -> float | None:
        """When the oldest writer of this process started (None: none is running)."""
        with self._lock:
            return min(self._started.values(), default=None)


SESSIONS = _Sessions()


class Ingest:
    """Appends new chunks for one writer and registers them once they are durable.

    The caller commits `register`'s transaction and then calls `committed()`. After a
    failure anywhere in between, `discard()` removes the records the index does not name
    and the Ingest is done: a retry uses a new one, so it never counts on a record whose
    write or registration failed.
    """

    def __init__(self, repo: Repository) -> None:
        self.index = repo.index
        self.space = repo.space
        self.store = repo.store
        self.writer = repo.store.writer(repo.allocate_pack)
        self._pending: dict[bytes, ChunkLoc] = {}
        self._seen: set[bytes] = set()
        self.pending_bytes = 0
        self.bytes_stored = 0

    def protect(self, changes: list[Change]) -> None:
        """Keep GC from freeing the unreferenced chunks `changes` deduplicate against,
        until this writer is done: each one's refcount-0 time becomes now, after this
        writer started (gc.py frees only chunks free since before every writer began).
        A chunk GC freed already is stored from the block's bytes instead. Call from the
        thread that calls `take`, before it, outside any transaction."""
        revived = [c for c in changes if c.revive is not None]
        if not revived:
            return
        with self.index.write() as txn:
            for change in revived:
                if self.index.get_chunk(txn, change.value) is not None:
                    self.index.keep_zero(txn, change.value)
                    change.revive = None
        for change in revived:
            if change.revive is not None:  # freed meanwhile: store this copy
                change.record = encode_chunk(change.revive, change.value)
                change.revive = None

    def take(self, change: Change) -> None:
        """Append the change's record unless this writer already stored that chunk."""
        if change.record is None or change.value in self._seen:
            return
        self._pending[change.value] = self.writer.append(change.record)
        self.space.spend(len(change.record))
        self._seen.add(change.value)
        self.pending_bytes += len(change.record)
        self.bytes_stored += len(change.record)

    def sync(self) -> None:
        """Make appended records durable (call before `register`'s transaction)."""
        self.writer.sync()

    def register(self, txn) -> None:
        """Record the synced chunks in the index (refcount 0 until extents refer to them)."""
        for value, loc in self._pending.items():
            known = self.index.get_chunk(txn, value)
            if known is None:  # (or GC freed it since examine)
                self.index.put_chunk(txn, value, loc)
            elif self.index.is_bad(txn, value):  # a good copy of a bad one: heal it
                self.index.move_chunk(txn, value, loc)
                self.index.clear_bad(txn, value)
                log.info("chunk %s healed: its good copy is at pack %d offset %d",
                         value.hex()[:16], loc.pack, loc.offset)
            elif not known.refcount:  # this copy is the one GC must leave to this writer
                self.index.move_chunk(txn, value, loc)
            # else another writer stored it meanwhile, and it is referenced: ours is dead

    def committed(self) -> None:
        """`register`'s transaction committed: the index names what was appended."""
        self._pending.clear()
        self.pending_bytes = 0
        self.writer.mark()

    def discard(self) -> None:
        """After a failed write or commit: remove the records the index does not name."""
        self._pending.clear()
        self.pending_bytes = 0
        self.writer.discard()

    def forget(self, txn) -> list[int]:
        """Drop the chunk records of this writer's packs that no extent names yet, a whole
        pack at a time (a pack with a referenced chunk stays as it is); returns the packs
        to delete once `txn` has committed. For a writer that gives up (a failed
        capture): its packs would otherwise stay as garbage that nothing frees. Call
        after `discard`; the records are found through the packs' own headers."""
        doomed = []
        for pack in self.writer.created:
            ours = []
            for offset, value in self.store.digests(pack):
                loc = self.index.get_chunk(txn, value)
                if loc is not None and (loc.pack, loc.offset) == (pack, offset):
                    ours.append((value, loc))
            if any(loc.refcount for _, loc in ours):
                continue  # another writer deduplicated against it meanwhile: keep it
            for value, _ in ours:
                self.index.delete_chunk(txn, value)
            doomed.append(pack)
        return doomed

    def close(self) -> None:
        self.writer.close()
