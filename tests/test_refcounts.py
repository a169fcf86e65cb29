"""Chunk references: an extent holds exactly one on its chunk (a ZERO extent none), through
every writer of extents (capture, archiving, the detach of a clone) and every remover."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from rpfs.capture import capture
from rpfs.disks.point import open_point
from rpfs.disks.registry import Registry
from rpfs.disks.service import DiskService
from rpfs.index import ZERO, ChunkLoc, Index
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache
from rpfs.store.format import digest

BS = 4096
NBLOCKS = 24


def _references(index: Index) -> tuple[dict[bytes, int], Counter]:
    """(refcount of every chunk, how many extents name each chunk)."""
    with index.read() as txn:
        refcounts = {d: loc.refcount for d, loc in index.iter_chunks(txn)}
        named = Counter(
            value
            for lineage in index.list_lineages(txn)
            for _, _, value in index.iter_extents(txn, lineage.id)
            if value != ZERO
        )
    return refcounts, named


def _read(repo: Repository, disk: str, point: str) -> bytes:
    with ChunkCache(repo) as cache:
        image = open_point(repo, cache, disk, point)
        return image.read(0, image.size)


def _check(index: Index, step: str) -> None:
    refcounts, named = _references(index)
    assert set(named) <= set(refcounts), f"after {step}: an extent names a missing chunk"
    wrong = {d.hex()[:8]: (n, named[d]) for d, n in refcounts.items() if n != named[d]}
    assert not wrong, f"after {step}: chunk (refcount, extents) {wrong}"


def test_add_extent_takes_one_reference_for_a_chunk_and_none_for_zero(index: Index):
    chunk = digest(b"x")
    with index.write() as txn:
        index.put_chunk(txn, chunk, ChunkLoc(1, 0, 10))
        index.add_extent(txn, 1, 0, 1, chunk)
        index.add_extent(txn, 1, 1, 1, chunk)
        index.add_extent(txn, 1, 2, 1, ZERO)  # no chunk: must not be looked up
    with index.read() as txn:
        assert index.get_chunk(txn, chunk).refcount == 2
        assert [v for _, _, v in index.iter_extents(txn, 1)] == [chunk, chunk, ZERO]


def test_every_extent_writer_keeps_refcounts_exact(tmp_path: Path, monkeypatch):
    """Capture, archive (copy-before-write too), hydration's detach and delete's detach
    each leave every chunk's refcount equal to the extents that name it."""
    rng = random.Random(3)
    blocks = [rng.randbytes(BS) for _ in range(6)]
    # Repeated blocks (several extents on one chunk) and zero blocks (none).
    source = tmp_path / "source.img"
    source.write_bytes(b"".join(rng.choice([*blocks, bytes(BS)]) for _ in range(NBLOCKS)))
    root = tmp_path / "repo"
    Repository.init(root, BS).close()
    with Repository(root) as repo:
        capture(repo, "base", source, "p0")
        _check(repo.index, "the first capture")
        source.write_bytes(b"".join(rng.choice([*blocks, bytes(BS)]) for _ in range(NBLOCKS)))
        capture(repo, "base", source, "p1")
        _check(repo.index, "an incremental capture")

        service = DiskService(repo)
        try:
            service.clone("base@p1", "vm")
            service.clone("base@p0", "c2")
            with service.registry.using("vm") as vm:
                for b in rng.sample(range(NBLOCKS), 10):
                    vm.write(b * BS, rng.choice([*blocks, bytes(BS), rng.randbytes(BS)]))
            service.snapshot(["vm"], "s1")  # archived before it returns (no daemon)
            _check(repo.index, "archiving a point")

            # Copy-before-write: a write to a frozen block archives it first.
            # (The point left to archive, as if the daemon's archiver were slow.)
            service.registry.background = True
            monkeypatch.setattr(Registry, "start_archiver", lambda self, name: None)
            with service.registry.using("vm") as vm:
                vm.write(0, rng.randbytes(BS))
                point = service.snapshot(["vm"], "s2")[0]
                assert point["frozen_blocks"] >= 1
                vm.write(0, blocks[0])  # archives block 0 into s2 before the write
                vm.snapshots.finish()
            _check(repo.index, "copy-before-write and the rest of the archive")

            service.hydrate("c2")  # fully hydrated: detached from base
            _check(repo.index, "the detach of a hydrated clone")
            # A rollback branch of vm reads base through vm's first lineage.
            service.registry.background = False
            service.rollback("vm@s1")
            _check(repo.index, "a rollback")
            with service.registry.using("vm") as vm:
                vm.write(BS, rng.randbytes(BS))
            service.snapshot(["vm"], "s3")
            kept = {name: _read(repo, "vm", name) for name in ("s1", "s2", "s3")}
            service.delete("base", force=True, with_points=True)  # vm detached from base
            _check(repo.index, "deleting the origin of a clone with a rollback branch")
            assert {name: _read(repo, "vm", name) for name in kept} == kept
            service.delete("vm", with_points=True)
            _check(repo.index, "deleting a disk with its points")
        finally:
            service.registry.close_all()

