"""The block states of a writable disk's local file, and the order that keeps them true.

States, one byte per block:
    ABSENT   the local file holds nothing trustworthy; the block resolves through the
             disk's lineage and origins in the index (copy-on-read fetches it)
    PRESENT  the local file is authoritative and equals the newest point / origin
    DIRTY    the local file is authoritative and was written since the newest point
    FROZEN   belongs to the point being archived and is not archived yet; a write to it
             first archives it (copy-before-write)

The states live in memory (a bytearray, scanned at C speed) and in the index's
`blockmap` table, PAGE_BLOCKS states to a value. The persist order: a page is stored only
after the local file's data it describes is on disk — its value is taken, then the file
is fdatasynced, then the LMDB transaction that stores it commits. So the persistent map
never calls a block local whose bytes might not be there; a crash forgets at most the
states changed since the last persist, and such blocks fall back to ABSENT (fetched
again from the origin) or keep their older state. A page whose store fails stays to be
persisted.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from ..index import Index
from ..names import ceil_div

ABSENT, PRESENT, DIRTY, FROZEN = 0, 1, 2, 3
PAGE_BLOCKS = 4096  # block states per LMDB value of the `blockmap` table
# The most blocks a writable disk may have. Its block states live in memory, one byte
# per block (and `rpfs disks` loads those of each closed disk), so this keeps them at
# most 4 GiB: 256 TiB at 64 KiB blocks, 16 TiB at 4 KiB; even with 4 MiB blocks far
# below the 2^63-1 bytes a file offset holds.
MAX_BLOCKS = 1 << 32

_FREEZE_DIRTY = bytes([ABSENT, PRESENT, FROZEN, FROZEN]) + bytes(range(4, 256))
_FREEZE_ALL = bytes([ABSENT, FROZEN, FROZEN, FROZEN]) + bytes(range(4, 256))
_THAW = bytes([ABSENT, PRESENT, DIRTY, DIRTY]) + bytes(range(4, 256))
_LOCAL_BLOCK = re.compile(rb"[^\x00]")  # any state but ABSENT: scans the map at C speed

T = TypeVar("T")


class BlockMap:
    """The block states of one local file (blocking: call from threads).

    `states` is read without a lock (one byte, written whole); a block's state is changed
    under that block's stripe lock (the disk's), except under a barrier, which holds them
    all. `lock`, the sync lock, guards the persist order: it is held from taking the
    changed pages through the fdatasync to the commit that stores them, so two persists
    never store an older value of a page over a newer one. It is taken after the
    disk's stripe locks and its archive lock and before an LMDB write transaction.
    """

    def __init__(
        self, index: Index, file_id: int, nblocks: int, flush: Callable[[], None],
        tracked: bool,
    ) -> None:
        """`flush` makes the local file's data durable (fdatasync); `tracked`: whether
        the stored map is trusted to name every write (not after a crash)."""
        self.index = index
        self.file_id = file_id
        self.nblocks = nblocks
        self._flush = flush
        with index.read() as txn:
            self.states = self.stored(index, txn, file_id, nblocks)
        self._pages: set[int] = set()  # pages changed since they were last taken
        self.lock = threading.Lock()
        # DIRTY names every block written since the newest point. A map left by a crash
        # may miss writes: then the next point compares every block.
        self.tracked = tracked

    @staticmethod
    def stored(index: Index, txn, file_id: int, nblocks: int) -> bytearray:
        """The persisted block states of a local file (ABSENT where none stored)."""
        states = bytearray(nblocks)
        for page, value in index.map_pages(txn, file_id):
            start = page * PAGE_BLOCKS
            n = min(len(value), nblocks - start)
            if n > 0:
                states[start : start + n] = value[:n]
        return states

    @staticmethod
    def store_changed(index: Index, txn, file_id: int, before: bytes, states: bytes) -> None:
        """Store the pages of `states` that differ from `before` (a map repaired in the
        index, with no local file open on it)."""
        for page in _changed_pages(before, states):
            window = slice(page * PAGE_BLOCKS, (page + 1) * PAGE_BLOCKS)
            index.put_map_page(txn, file_id, page, bytes(states[window]))

    # -- changes --------------------------------------------------------------------------

    def set(self, first: int, end: int, state: int) -> None:
        """Set blocks [first, end) to `state`; the change is persisted by the next persist."""
        self.states[first:end] = bytes([state]) * (end - first)
        for page in range(first // PAGE_BLOCKS, (end - 1) // PAGE_BLOCKS + 1):
            self._pages.add(page)  # after the state: a concurrent persist sees both or redoes

    def local_blocks(self) -> Iterator[int]:
        """The blocks whose local file is authoritative (every state but ABSENT)."""
        return (m.start() for m in _LOCAL_BLOCK.finditer(self.states))

    def freeze(self) -> bytes:
        """DIRTY blocks (every local block if the map is not `tracked`) become FROZEN;
        returns the states before, for restore(). Caller holds the disk's barrier."""
        before = bytes(self.states)
        self.states[:] = self.states.translate(_FREEZE_DIRTY if self.tracked else _FREEZE_ALL)
        self._pages.update(_changed_pages(before, self.states))
        return before

    def thaw(self) -> None:
        """FROZEN blocks that no point is archiving any more are DIRTY again (at open; in
        memory: the stored pages keep FROZEN until their next change, and so thaw again)."""
        if FROZEN in self.states:
            self.states[:] = self.states.translate(_THAW)

    def restore(self, before: bytes) -> None:
        """Take back changes whose commit failed (caller holds the disk's barrier). Every
        page is to persist again: the failed commit took them, with changes that came
        before its own."""
        self.states[:] = before
        self._pages.update(range(ceil_div(self.nblocks, PAGE_BLOCKS)))

    @property
    def needs_sync(self) -> bool:
        """Block states changed since the last persist."""
        return bool(self._pages)

    # -- the persist order ----------------------------------------------------------------

    def persist(self, commit: Callable[[object], T] | None = None) -> T | None:
        """Make the local file durable, then store the changed pages, with what `commit`
        writes in the same transaction (records that must become durable together with
        them); returns what `commit` returns."""
        with self.lock:
            values = self._take()
            try:
                self._flush()
                if not values and commit is None:
                    return None
                with self.index.write() as txn:
                    result = commit(txn) if commit is not None else None
                    self._store(txn, values)
                return result
            except BaseException:
                self._pages.update(page for page, _ in values)  # still to persist
                raise

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold the sync lock with the local file durable: the caller may store pages in a
        transaction of its own (store_pages) and commit it before this ends."""
        with self.lock:
            self._flush()
            yield

    def store_pages(self, txn) -> None:
        """Store every changed page in `txn` (caller is inside quiesced() and changed no
        state since it began but under the disk's barrier); if `txn` does not commit,
        the caller must restore()."""
        self._store(txn, self._take())

    def _take(self) -> list[tuple[int, bytes]]:
        """The changed pages and their values now (caller holds the lock, then flushes:
        a state set meanwhile is either in a value taken here or marked for the next)."""
        pages = []
        while self._pages:
            try:
                pages.append(self._pages.pop())
            except KeyError:
                break
        return [(p, bytes(self.states[p * PAGE_BLOCKS : (p + 1) * PAGE_BLOCKS])) for p in pages]

    def _store(self, txn, values: list[tuple[int, bytes]]) -> None:
        for page, value in values:
            self.index.put_map_page(txn, self.file_id, page, value)


def _changed_pages(before: bytes, after: bytes) -> Iterator[int]:
    """The pages in which two state arrays of one map differ."""
    for page in range(ceil_div(len(after), PAGE_BLOCKS)):
        window = slice(page * PAGE_BLOCKS, (page + 1) * PAGE_BLOCKS)
        if before[window] != after[window]:
            yield page
