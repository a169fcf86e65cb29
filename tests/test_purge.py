"""Purging points, in process (no FUSE), against a model of what must survive.

A seeded random history (captures with churn, live snapshots of a created disk and of a
clone, a rollback that leaves a branch behind, a clone of a middle point), then deletions
of random points in random order (purged at once, or to the trash, then undeleted or
purged from it), with new captures, snapshots, rollbacks and hydrations in between (a
purged newest point must still be the base of the next one). After every step:

- every surviving point and every disk reads back bit-exact (sha256 recorded when it
  was made; disks read without copy-on-read, so their ABSENT blocks keep resolving
  through their origins);
- a recount of references from the extents equals the stored refcounts;
- nothing is kept that no survivor reads (an independent full-scan oracle of the rule),
  so a purge frees what it should, not merely nothing.

Replay one sequence with RPFS_PURGE_SEED=N.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from helpers import unread_extents

from rpfs.capture import capture
from rpfs.disks.point import open_point
from rpfs.disks.service import DiskService
from rpfs.index import MAX_GEN, Index
from rpfs.lifecycle import trash
from rpfs.lifecycle.purge import refcount_errors
from rpfs.lineage import allocated
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache

BS = 4096
NBLOCKS = 24
SIZE = NBLOCKS * BS
SEEDS = [int(os.environ["RPFS_PURGE_SEED"])] if "RPFS_PURGE_SEED" in os.environ else range(8)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class History:
    """A repository, its disks and points, and what each must read."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.rng = rng
        self.root = root
        Repository.init(root, BS).close()
        self.repo = Repository(root)
        self.cache = ChunkCache(self.repo)
        self.service = DiskService(self.repo, self.cache)
        self.points: dict[str, str] = {}  # DISK@POINT -> sha256
        self.trashed: dict[str, str] = {}  # the same, of points in the trash
        self.disks: dict[str, bytearray] = {}  # writable disk -> content
        self.source = bytearray(self._blocks(NBLOCKS))
        self.serial = 0

    def close(self) -> None:
        self.service.registry.close_all()
        self.cache.close()
        self.repo.close()

    def _blocks(self, n: int) -> bytes:
        """Random blocks, some repeated (shared chunks) and some zero (no chunk)."""
        pool = [self.rng.randbytes(BS) for _ in range(4)] + [bytes(BS)]
        return b"".join(
            self.rng.choice(pool) if self.rng.random() < 0.4 else self.rng.randbytes(BS)
            for _ in range(n)
        )

    def _name(self) -> str:
        self.serial += 1
        return f"p{self.serial}"

    # -- history --------------------------------------------------------------------------

    def capture(self) -> None:
        for b in self.rng.sample(range(NBLOCKS), self.rng.randint(1, 8)):
            self.source[b * BS : (b + 1) * BS] = self._blocks(1)
        path = self.root.parent / "source.img"
        path.write_bytes(self.source)
        name = self._name()
        capture(self.repo, "cap", path, name)
        self.points[f"cap@{name}"] = sha(self.source)

    def create(self, disk: str) -> None:
        self.service.create(disk, SIZE)
        self.disks[disk] = bytearray(SIZE)

    def clone(self, ref: str, disk: str) -> None:
        self.service.clone(ref, disk)
        self.disks[disk] = bytearray(self._read_point(ref))

    def write_and_snapshot(self, disk: str) -> None:
        with self.service.registry.using(disk) as live:
            for b in self.rng.sample(range(NBLOCKS), self.rng.randint(1, 6)):
                data = self._blocks(1)
                live.write(b * BS, data)
                self.disks[disk][b * BS : (b + 1) * BS] = data
        name = self._name()
        self.service.snapshot([disk], name)
        self.points[f"{disk}@{name}"] = sha(self.disks[disk])

    def rollback(self, ref: str) -> None:
        self.service.rollback(ref)
        self.disks[ref.split("@")[0]] = bytearray(self._read_point(ref))

    def purge(self, ref: str) -> None:
        """Delete a point and purge it at once."""
        trash.delete(self.repo.index, [ref], purge=True)
        del self.points[ref]

    def to_trash(self, ref: str) -> None:
        trash.delete(self.repo.index, [ref])
        self.trashed[ref] = self.points.pop(ref)

    def undelete(self, ref: str) -> None:
        trash.undelete(self.repo.index, ref)
        self.points[ref] = self.trashed.pop(ref)

    def purge_trashed(self, ref: str) -> None:
        trash.purge_trash(self.repo.index, [ref])
        del self.trashed[ref]

    def points_of(self, disk: str) -> list[str]:
        with self.repo.index.read() as txn:
            return [p.ref for p in self.repo.index.list_points(txn, disk)]

    # -- checks ---------------------------------------------------------------------------

    def _read_point(self, ref: str) -> bytes:
        disk, name = ref.split("@")
        image = open_point(self.repo, self.cache, disk, name)
        return image.read(0, image.size)

    def _read_disk(self, disk: str, monkeypatch) -> bytes:
        with self.service.registry.using(disk) as live, monkeypatch.context() as m:
            m.setattr(live.space, "low", lambda: True)  # fetched blocks are not kept
            return live.read(0, live.size)

    def check(self, step: str, monkeypatch) -> None:
        for ref, digest in self.points.items():
            assert sha(self._read_point(ref)) == digest, f"after {step}: point {ref} differs"
        for disk, content in self.disks.items():
            assert self._read_disk(disk, monkeypatch) == content, f"after {step}: disk {disk}"
        assert refcount_errors(self.repo.index) == [], f"after {step}"
        assert unread_extents(self.repo.index) == [], f"after {step}"
        index = self.repo.index
        with index.read() as txn:
            listed = index.list_points(txn)
            for p in listed:  # the figure a new point takes from its base's
                blocks = allocated(index, txn, index.chain(txn, p.lineage, p.gen))
                assert p.allocated_blocks == len(blocks), f"after {step}: {p.ref}"
        assert {p.ref for p in listed} == set(self.points), f"after {step}"
        held = {f"{e['disk']}@{e['name']}" for e in trash.listing(self.repo.index)}
        assert held == set(self.trashed), f"after {step}"


@pytest.mark.parametrize("seed", SEEDS)
def test_purges_in_random_order_keep_every_survivor_exact(tmp_path: Path, monkeypatch, seed):
    rng = random.Random(seed)
    h = History(tmp_path / "repo", rng)
    try:
        for _ in range(4):
            h.capture()
        caps = h.points_of("cap")
        h.clone(caps[1], "cl")  # a clone of a middle point
        h.create("vm")
        for _ in range(4):
            h.write_and_snapshot("vm")
            h.write_and_snapshot("cl")
        vm = h.points_of("vm")
        h.rollback(vm[1])  # vm[2:] are on an abandoned branch now
        h.write_and_snapshot("vm")
        h.clone(vm[2], "br")  # a clone of a point on that branch
        h.write_and_snapshot("br")
        h.check("the history", monkeypatch)

        while h.points or h.trashed:
            if h.trashed and (not h.points or rng.random() < 0.4):
                ref = rng.choice(sorted(h.trashed))
                if rng.random() < 0.3:
                    h.undelete(ref)
                    h.check(f"undeleting {ref}", monkeypatch)
                else:
                    h.purge_trashed(ref)
                    h.check(f"purging {ref} from the trash", monkeypatch)
                continue
            ref = rng.choice(sorted(h.points))
            if rng.random() < 0.5:
                h.purge(ref)
                h.check(f"deleting {ref} with purge", monkeypatch)
            else:
                h.to_trash(ref)
                h.check(f"moving {ref} to the trash", monkeypatch)
            roll = rng.random()
            if roll < 0.15:
                h.capture()  # its base may be a purged point's extents
                h.check("a capture after purges", monkeypatch)
            elif roll < 0.3:
                disk = rng.choice(sorted(h.disks))
                h.write_and_snapshot(disk)
                h.check(f"a snapshot of {disk} after purges", monkeypatch)
            elif roll < 0.4:  # the head leaves its lineage, perhaps for a purged point's
                disk = rng.choice(sorted(h.disks))
                if targets := h.points_of(disk):
                    h.rollback(rng.choice(targets))
                    h.check(f"a rollback of {disk} after purges", monkeypatch)
            elif roll < 0.45:  # a clone no longer reads its origin
                disk = rng.choice(sorted(h.disks))
                h.service.hydrate(disk)
                h.check(f"hydrating {disk} after purges", monkeypatch)
        with h.repo.index.read() as txn:
            heads = {d.lineage for d in h.repo.index.list_disks(txn)}
            assert {lin.id for lin in h.repo.index.list_lineages(txn)} <= heads | {
                lin.parent for lin in h.repo.index.list_lineages(txn)}
    finally:
        h.close()


def test_purging_the_full_point_merges_it_into_the_next(tmp_path: Path, monkeypatch):
    """The seeds' "the initial recovery point is merged into the next incremental one":
    the first point's blocks that the second did not rewrite stay, the rewritten ones go."""
    h = History(tmp_path / "repo", random.Random(1))
    try:
        h.capture()
        h.capture()
        first = h.points_of("cap")[0]
        index = h.repo.index
        with index.read() as txn:
            lineage = index.get_point(txn, "cap", "p2").lineage
            before = list(index.iter_gens(txn, lineage, 0, MAX_GEN))
        h.purge(first)
        h.check("purging the full point", monkeypatch)
        with index.read() as txn:
            after = list(index.iter_gens(txn, lineage, 0, MAX_GEN))
        rewritten = {b for b, g in before if g == 2}
        assert after == [(b, g) for b, g in before if g == 2 or b not in rewritten]
        assert len(after) < len(before)
    finally:
        h.close()


def test_an_index_without_gens_gets_them_at_open(tmp_path: Path):
    """A format 1 repository, made before `gens` existed: every extent is indexed at its
    first open, and rpfs.json says format 3 (so an older rpfs refuses it)."""
    h = History(tmp_path / "repo", random.Random(2))
    try:
        h.capture()
        h.capture()
    finally:
        h.close()
    index = Index(tmp_path / "repo" / "index")
    with index.write() as txn:
        txn.drop(index.db["gens"], delete=True)
        txn.drop(index.db["trash"], delete=True)
    index.close()
    config = tmp_path / "repo" / "rpfs.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "format": 1}))
    with Repository(tmp_path / "repo") as repo:
        assert json.loads(config.read_text())["format"] == 3, "upgraded at its first open"
        assert refcount_errors(repo.index) == []
        with repo.index.read() as txn:
            assert len(list(repo.index.iter_gens(txn, 1, 0, MAX_GEN))) > NBLOCKS // 2
