"""Storage cost (`lifecycle/cost.py`): owned and shared bytes of points, a disk's total.

On test_purge's seeded random history (captures with churn, some writing one chunk to
two blocks and then rewriting both or one of them, live snapshots of a created
disk and of clones, a rollback that leaves a branch, points in the trash), points are
purged one by one in random order; before each purge every listed point is priced, and
checked against oracles that read the index another way:

- the point's `owned_bytes` is exactly what the purge takes off the live stored bytes;
- `owned_bytes + shared_bytes` is the stored bytes of the chunks it reads (every block
  resolved through its chain, each chunk counted once);
- each disk's total is the stored bytes of the chunks all its points read.

Replay one sequence with RPFS_PURGE_SEED=N.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_purge import BS, NBLOCKS, SEEDS, History

from rpfs.index import Index, PointRecord
from rpfs.lifecycle.cost import costs, owned_chunks
from rpfs.lifecycle.purge import refcount_errors
from rpfs.names import fmt_bytes


def read_chunks(index: Index, txn, point: PointRecord) -> set[bytes]:
    """Every chunk the point reads, one resolution per block."""
    chain = index.chain(txn, point.lineage, point.gen)
    return {v for b in range(NBLOCKS) if (v := index.resolve(txn, chain, b))}


def length_of(index: Index, txn, chunks: set[bytes]) -> int:
    return sum(index.get_chunk(txn, d).length for d in chunks)


def live(index: Index) -> int:
    with index.read() as txn:
        return index.live_stored_bytes(txn)


def capture_repeated(h: History, rewrite: list[int]) -> None:
    """Rewrite blocks with one new content per pair of blocks (one chunk, two extents per
    pair), the last `rewrite` list's blocks first, and capture."""
    blocks = h.rng.sample(range(NBLOCKS), 6)
    for pair in range(3):
        data = h.rng.randbytes(BS)
        for b in blocks[2 * pair : 2 * pair + 2]:
            h.source[b * BS : (b + 1) * BS] = data
    h.capture()
    for b in rewrite:  # the next capture rewrites these too
        h.source[b * BS : (b + 1) * BS] = h.rng.randbytes(BS)
    rewrite[:] = blocks[:3]  # both extents of one chunk, one of another


def history(root: Path, seed: int) -> History:
    rng = random.Random(seed)
    h = History(root, rng)
    rewrite: list[int] = []
    for _ in range(3):  # a point whose purge drops two extents of one chunk (two refs)
        capture_repeated(h, rewrite)
    h.capture()
    caps = h.points_of("cap")
    h.clone(caps[1], "cl")
    h.create("vm")
    for _ in range(3):
        h.write_and_snapshot("vm")
        h.write_and_snapshot("cl")
    h.rollback(h.points_of("vm")[1])  # vm's newer points are on an abandoned branch
    h.write_and_snapshot("vm")
    h.to_trash(rng.choice(sorted(h.points)))  # a reader that holds chunks: shared
    return h


@pytest.mark.parametrize("seed", SEEDS)
def test_owned_bytes_is_what_a_purge_frees(tmp_path: Path, seed: int):
    h = history(tmp_path / "repo", seed)
    index = h.repo.index
    try:
        while h.points:
            with index.read() as txn:
                points = index.list_points(txn)
                priced = costs(index, txn, points)
                for p in points:
                    cost = priced.points[(p.disk, p.name)]
                    reads = length_of(index, txn, read_chunks(index, txn, p))
                    assert cost.owned_bytes + cost.shared_bytes == reads, p.ref
                for disk in {p.disk for p in points}:
                    union = set().union(*(read_chunks(index, txn, p) for p in points
                                          if p.disk == disk))
                    assert priced.disks[disk] == length_of(index, txn, union), disk
                for entry in index.list_trash(txn):  # priced alone, as `rpfs trash` could
                    assert owned_chunks(index, txn, entry.point) <= read_chunks(
                        index, txn, entry.point)
            ref = h.rng.choice(sorted(h.points))
            disk, name = ref.split("@")
            before = live(index)
            h.purge(ref)
            assert before - live(index) == priced.points[(disk, name)].owned_bytes, ref
            assert refcount_errors(index) == []
    finally:
        h.close()


def test_a_single_disks_total_is_the_live_stored_bytes(tmp_path: Path):
    h = History(tmp_path / "repo", random.Random(7))
    index = h.repo.index
    try:
        for _ in range(6):
            h.capture()
        h.purge(h.points_of("cap")[2])  # the newest stays: the head reads what it reads
        with index.read() as txn:
            priced = costs(index, txn, index.list_points(txn))
            assert priced.disks == {"cap": index.live_stored_bytes(txn)}
            assert sum(c.owned_bytes for c in priced.points.values()) < priced.disks["cap"]
    finally:
        h.close()


def test_points_shows_owned_and_each_disks_total(rpfs, repo: Path, tmp_path: Path):
    block = 65536
    a, b, c = (bytes([n]) * block for n in (1, 2, 3))
    src = tmp_path / "a.raw"
    src.write_bytes(c + a * 3)
    rpfs("capture", "web", str(src), "--name", "one", check=True)
    src.write_bytes(b + a * 3)  # rewrites block 0: only `one` reads c
    rpfs("capture", "web", str(src), "--name", "two", check=True)
    shown = {p["name"]: p for p in json.loads(rpfs("points", "--json", check=True).stdout)}
    one, two = shown["one"], shown["two"]
    assert one["owned_bytes"] > 0 and one["shared_bytes"] > 0  # c alone, a with two
    assert two["owned_bytes"] == 0  # the newest: the next capture's base keeps it all
    total = one["owned_bytes"] + two["shared_bytes"]  # c, then a and b
    table = rpfs("points", check=True).stdout.splitlines()
    assert table[0].split()[7] == "OWNED"
    two_row = next(line for line in table if line.split()[:2] == ["web", "two"])
    assert " 0 B " in two_row
    assert table[-1] == f"web: {fmt_bytes(total)} stored by its points (after dedup)"
