"""The block map in process: its persist order, and that no state change is lost to a
crash once a persist after it returned.

A crash is simulated by dropping the BlockMap and loading a new one from the index: what
the index holds is what a restart would find. `flush` stands for the local file's
fdatasync, so a test can land a write inside it.
"""

from __future__ import annotations

import errno

import pytest

from rpfs.disks.blockmap import ABSENT, DIRTY, FROZEN, PAGE_BLOCKS, PRESENT, BlockMap
from rpfs.index import Index

FILE = 7
NBLOCKS = 2 * PAGE_BLOCKS + 10  # three pages, the last one short


def _map(index: Index, flush=lambda: None, tracked: bool = True) -> BlockMap:
    return BlockMap(index, FILE, NBLOCKS, flush, tracked)


def _after_crash(index: Index) -> bytearray:
    """The states a reopened disk starts from."""
    return _map(index, tracked=False).states


def test_a_state_set_while_the_file_is_flushed_waits_for_the_next_persist(index: Index):
    """A write that lands during the fdatasync may not be covered by it: its state must
    not be stored by that persist (the page's value is taken before the flush)."""
    bmap = None

    def flush() -> None:
        if bmap.states[3] == ABSENT:  # the first persist: a write lands meanwhile
            bmap.set(3, 4, DIRTY)

    bmap = _map(index, flush)
    bmap.set(1, 2, DIRTY)
    bmap.persist()
    stored = _after_crash(index)
    assert (stored[1], stored[3]) == (DIRTY, ABSENT)
    assert bmap.needs_sync
    bmap.persist()
    assert _after_crash(index)[3] == DIRTY
    assert not bmap.needs_sync


def test_a_failed_flush_stores_nothing_and_keeps_the_changes(index: Index):
    flushes = []

    def flush() -> None:
        flushes.append(True)
        if len(flushes) == 1:
            raise OSError(errno.EIO, "the first fdatasync fails")

    bmap = _map(index, flush)
    bmap.set(PAGE_BLOCKS + 2, PAGE_BLOCKS + 4, PRESENT)
    with pytest.raises(OSError):
        bmap.persist()
    assert _after_crash(index)[PAGE_BLOCKS + 2] == ABSENT  # not durable: not stored
    bmap.persist()
    assert _after_crash(index)[PAGE_BLOCKS + 2 : PAGE_BLOCKS + 4] == bytes([PRESENT] * 2)


def test_a_page_written_after_a_freeze_is_never_lost(index: Index):
    bmap = _map(index)
    bmap.set(0, 1, DIRTY)
    bmap.set(PAGE_BLOCKS, PAGE_BLOCKS + 1, DIRTY)
    bmap.persist()
    # A freeze in its own transaction (under the disk's barrier), as Snapshots does it.
    with bmap.quiesced(), index.write() as txn:
        bmap.freeze()
        bmap.store_pages(txn)
    stored = _after_crash(index)  # the freeze's commit stored what it froze
    assert (stored[0], stored[PAGE_BLOCKS]) == (FROZEN, FROZEN)
    # Writes after the freeze, into the pages the freeze stored and into another one.
    bmap.set(1, 2, DIRTY)
    bmap.set(PAGE_BLOCKS + 1, PAGE_BLOCKS + 2, DIRTY)
    bmap.set(2 * PAGE_BLOCKS + 9, 2 * PAGE_BLOCKS + 10, DIRTY)
    bmap.persist()
    stored = _after_crash(index)
    assert stored == bmap.states
    assert (stored[0], stored[PAGE_BLOCKS]) == (FROZEN, FROZEN)
    assert (stored[1], stored[PAGE_BLOCKS + 1], stored[-1]) == (DIRTY, DIRTY, DIRTY)


def test_a_write_before_a_freeze_that_did_not_commit_is_never_lost(index: Index):
    """The freeze's transaction took the pending pages (with a write made before the
    barrier that no persist had stored yet); when it does not commit, restore() must put
    them back to persist."""
    bmap = _map(index)
    bmap.set(5, 6, DIRTY)  # written, not persisted yet
    with pytest.raises(RuntimeError), bmap.quiesced(), index.write() as txn:
        before = bmap.freeze()
        bmap.store_pages(txn)
        raise RuntimeError("the point's name is taken")  # the transaction aborts
    bmap.restore(before)
    assert bmap.states[5] == DIRTY
    bmap.persist()
    assert _after_crash(index)[5] == DIRTY


def test_freeze_takes_every_local_block_when_the_map_is_not_trusted(index: Index):
    bmap = _map(index, tracked=False)
    bmap.set(0, 1, PRESENT)
    bmap.set(1, 2, DIRTY)
    with bmap.quiesced():
        bmap.freeze()
    assert bmap.states[:3] == bytes([FROZEN, FROZEN, ABSENT])
    bmap.tracked = True
    bmap.restore(bytes(NBLOCKS))
    bmap.set(0, 1, PRESENT)
    bmap.set(1, 2, DIRTY)
    with bmap.quiesced():
        bmap.freeze()
    assert bmap.states[:3] == bytes([PRESENT, FROZEN, ABSENT])
