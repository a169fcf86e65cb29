"""The chain algebra (rpfs/lineage.py) against brute force: random trees of lineages in a
real Index, each pair of chains compared by resolving every block both ways."""

from __future__ import annotations

import random

import pytest

from rpfs import lineage
from rpfs.errors import RpfsError
from rpfs.index import MAX_GEN, ZERO, DiskRecord, Index, LineageRecord, PointRecord
from rpfs.store.format import digest

NBLOCKS = 40
VALUES = [ZERO] + [digest(bytes([i])) for i in range(5)]  # few values: lineages often agree


def _write_gen(index: Index, txn, rng: random.Random, lin: LineageRecord) -> None:
    """A new generation of `lin` (a capture or a live point) writing a few blocks."""
    lin.head_gen += 1
    for block in rng.sample(range(NBLOCKS), rng.randint(1, 8)):
        index.put_extent(txn, lin.id, block, lin.head_gen, rng.choice(VALUES))


def _detach(index: Index, txn, lin: LineageRecord) -> None:
    """What `disk delete --force` and a finished hydration do: copy what the lineage reads
    through its origin into gen-0 extents of its own, and drop the origin."""
    chain = index.chain(txn, lin.parent, lin.parent_gen)
    for block in range(NBLOCKS):
        value = index.resolve(txn, chain, block)
        if value != ZERO and index.lookup(txn, lin.id, block, 0) is None:
            index.put_extent(txn, lin.id, block, 0, value)
    lin.parent, lin.parent_gen = None, 0


def _random_history(index: Index, rng: random.Random) -> list[LineageRecord]:
    """Captures, clones of clones and rollbacks (a new lineage whose origin is a point),
    origins that go on being written after a clone, and detached lineages; several roots,
    so some pairs of chains share no history."""
    lineages: list[LineageRecord] = []
    with index.write() as txn:
        for _ in range(rng.randint(8, 30)):
            choice = rng.random()
            written = [lin for lin in lineages if lin.head_gen]
            if not written or choice < 0.08:
                lin = LineageRecord(len(lineages) + 1)
                lineages.append(lin)
                _write_gen(index, txn, rng, lin)
            elif choice < 0.45:  # clone or rollback to a point of any lineage
                origin = rng.choice(written)
                lin = LineageRecord(
                    len(lineages) + 1, parent=origin.id, parent_gen=rng.randint(1, origin.head_gen),
                )
                lineages.append(lin)
                if rng.random() < 0.5:  # a point of the clone at once: a deeper tree
                    _write_gen(index, txn, rng, lin)
            elif choice < 0.5 and any(lin.parent for lin in lineages):
                _detach(index, txn, rng.choice([lin for lin in lineages if lin.parent]))
            else:
                _write_gen(index, txn, rng, rng.choice(lineages))
            for lin in lineages:  # the next step's chains read them
                index.put_lineage(txn, lin)
    return lineages


def _chains(index: Index, txn, lineages: list[LineageRecord]) -> list[list[tuple[int, int]]]:
    """Every point of every lineage, gen 0, the generation being archived and the head."""
    return [
        index.chain(txn, lin.id, gen)
        for lin in lineages
        for gen in [*range(lin.head_gen + 2), MAX_GEN]
    ]


@pytest.mark.parametrize("seed", range(40))
def test_changed_and_allocated_match_brute_force(index: Index, seed: int):
    rng = random.Random(seed)
    lineages = _random_history(index, rng)
    with index.read() as txn:
        chains = _chains(index, txn, lineages)
        reads = {
            tuple(chain): [index.resolve(txn, chain, b) for b in range(NBLOCKS)]
            for chain in chains
        }
        for chain in chains:
            expected = [b for b, value in enumerate(reads[tuple(chain)]) if value != ZERO]
            assert lineage.allocated(index, txn, chain) == expected, chain
        for _ in range(150):
            chain_a, chain_b = rng.choice(chains), rng.choice(chains)
            a, b = reads[tuple(chain_a)], reads[tuple(chain_b)]
            expected = [blk for blk in range(NBLOCKS) if a[blk] != b[blk]]
            assert lineage.changed(index, txn, chain_a, chain_b) == expected, (chain_a, chain_b)
            assert set(expected) <= lineage.can_differ(index, txn, chain_a, chain_b)


def test_candidates_come_only_from_where_the_chains_part(index: Index):
    """Two points of one lineage: only extents between their gens are candidates, not the
    shared origin's nor the lineage's older ones (the scan is what makes it cheap)."""
    with index.write() as txn:
        index.put_lineage(txn, LineageRecord(1, head_gen=1))
        index.put_lineage(txn, LineageRecord(2, head_gen=4, parent=1, parent_gen=1))
        index.put_extent(txn, 1, 0, 1, VALUES[1])
        for gen, block in ((1, 1), (2, 2), (3, 3), (3, 5), (4, 4)):
            index.put_extent(txn, 2, block, gen, VALUES[2])
    with index.read() as txn:
        assert lineage.can_differ(index, txn, index.chain(txn, 2, 1), index.chain(txn, 2, 3)) \
            == {2, 3, 5}
        assert lineage.allocated(index, txn, index.chain(txn, 2, 2)) == [0, 1, 2]


def test_byte_extents_merge_adjacent_blocks_and_clip_the_last():
    assert lineage.byte_extents([0, 1, 3, 4], 4096, 4 * 4096 + 100) == [
        {"start": 0, "length": 8192},
        {"start": 3 * 4096, "length": 4096 + 100},
    ]
    assert lineage.byte_extents([], 4096, 8192) == []


def test_point_lookup_names_missing_and_archiving_points(index: Index):
    with index.write() as txn:
        index.put_disk(txn, DiskRecord("d", 4096, 1, 0.0))
        index.put_point(txn, PointRecord("d", "a", 1, 1, 0.0, 4096, state="archiving"))
    with index.read() as txn:
        with pytest.raises(RpfsError, match=r"^no disk named 'e'; 'rpfs disks' lists them$"):
            lineage.complete_point(index, txn, "e@b")
        missing = r"^disk d has no point 'b'; 'rpfs points d' lists them$"
        with pytest.raises(RpfsError, match=missing):
            lineage.complete_point(index, txn, "d@b")
        with pytest.raises(RpfsError, match="point d@a is still being archived"):
            lineage.complete_point(index, txn, "d@a")
