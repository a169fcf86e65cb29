"""The trash, in process: delete moves a point there (out of every listing), undelete
brings it back exactly, purge drops it (by name, or once its period has passed)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from rpfs.capture import capture
from rpfs.disks.point import open_point
from rpfs.disks.registry import Registry
from rpfs.disks.service import DiskService
from rpfs.errors import RpfsError
from rpfs.lifecycle import trash
from rpfs.lifecycle.purge import refcount_errors
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache

BS = 4096
NBLOCKS = 16


@pytest.fixture
def repo(tmp_path: Path):
    rng = random.Random(5)
    root = tmp_path / "repo"
    Repository.init(root, BS).close()
    source = tmp_path / "source.img"
    with Repository(root) as repo:
        for name in ("p1", "p2", "p3"):
            source.write_bytes(rng.randbytes(NBLOCKS * BS // 2) + bytes(NBLOCKS * BS // 2))
            capture(repo, "d", source, name)
        yield repo


def read(repo: Repository, ref: str) -> str:
    disk, name = ref.split("@")
    cache = ChunkCache(repo)
    try:
        image = open_point(repo, cache, disk, name)
        return hashlib.sha256(image.read(0, image.size)).hexdigest()
    finally:
        cache.close()


def names(repo: Repository) -> list[str]:
    with repo.index.read() as txn:
        return [p.name for p in repo.index.list_points(txn, "d")]


def test_delete_then_undelete_is_exact(repo: Repository):
    before = read(repo, "d@p2")
    with repo.index.read() as txn:
        record = repo.index.get_point(txn, "d", "p2")
    [done] = trash.delete(repo.index, ["d@p2"])
    assert names(repo) == ["p1", "p3"]
    with pytest.raises(RpfsError, match="has no point 'p2'"):
        read(repo, "d@p2")
    [held] = trash.listing(repo.index)
    assert (held["disk"], held["name"]) == ("d", "p2")
    assert held["purge_after"] == done["deleted_at"] + trash.TRASH_DAYS * 86400
    assert refcount_errors(repo.index) == []
    trash.undelete(repo.index, "d@p2")
    assert names(repo) == ["p1", "p2", "p3"]
    assert trash.listing(repo.index) == []
    with repo.index.read() as txn:
        assert repo.index.get_point(txn, "d", "p2") == record
    assert read(repo, "d@p2") == before


def test_the_newest_point_is_deletable_and_undelete_refuses_a_reused_name(
    repo: Repository, tmp_path: Path
):
    trash.delete(repo.index, ["d@p3"])
    (tmp_path / "source.img").write_bytes(bytes(NBLOCKS * BS))
    capture(repo, "d", tmp_path / "source.img", "p3")  # the name again
    with pytest.raises(RpfsError, match="new point named 'p3'"):
        trash.undelete(repo.index, "d@p3")
    assert len(trash.listing(repo.index)) == 1
    trash.delete(repo.index, ["d@p3"])  # deleted twice under one name: both kept
    assert [e["name"] for e in trash.listing(repo.index)] == ["p3", "p3"]
    trash.undelete(repo.index, "d@p3")  # the most recently deleted one
    assert read(repo, "d@p3") == hashlib.sha256(bytes(NBLOCKS * BS)).hexdigest()
    assert refcount_errors(repo.index) == []


def test_bad_names_change_nothing(repo: Repository):
    with pytest.raises(RpfsError, match="has no point 'nope'"):
        trash.delete(repo.index, ["d@p1", "d@nope"])
    assert names(repo) == ["p1", "p2", "p3"]
    with pytest.raises(RpfsError, match="no point d@p1 in the trash"):
        trash.undelete(repo.index, "d@p1")
    with pytest.raises(RpfsError, match="no point d@p1 in the trash"):
        trash.purge_trash(repo.index, ["d@p1"])


def test_purge_expired_after_the_period_only(repo: Repository, monkeypatch):
    monkeypatch.setattr(trash, "now", lambda: 1_000_000.0)
    trash.delete(repo.index, ["d@p1"])
    monkeypatch.setattr(trash, "now", lambda: 1_000_000.0 + 86400)
    trash.delete(repo.index, ["d@p2"])
    day = 86400
    assert trash.purge_trash(repo.index, expired_only=True, at=1_000_000 + 14 * day - 1) == []
    purged = trash.purge_trash(repo.index, expired_only=True, at=1_000_000 + 14 * day)
    assert [p["name"] for p in purged] == ["p1"]
    assert [e["name"] for e in trash.listing(repo.index)] == ["p2"]
    assert refcount_errors(repo.index) == []
    assert trash.purge_trash(repo.index, expired_only=True, trash_days=0, at=1_000_000 + day)
    assert trash.listing(repo.index) == []
    assert refcount_errors(repo.index) == []


def test_a_point_still_archiving_is_refused(tmp_path: Path, monkeypatch):
    root = tmp_path / "repo"
    Repository.init(root, BS).close()
    monkeypatch.setattr(Registry, "start_archiver", lambda self, name: None)
    with Repository(root) as repo:
        service = DiskService(repo, background=True)
        try:
            service.create("vm", NBLOCKS * BS)
            with service.registry.using("vm") as vm:
                vm.write(0, b"x" * BS)
                service.snapshot(["vm"], "s1")
                with pytest.raises(RpfsError, match="still being archived; wait"):
                    trash.delete(repo.index, ["vm@s1"])
                vm.snapshots.finish()
            trash.delete(repo.index, ["vm@s1"])
        finally:
            service.registry.close_all()


def test_disk_delete_counts_and_drops_its_trash(repo: Repository):
    trash.delete(repo.index, ["d@p1", "d@p2", "d@p3"])
    service = DiskService(repo)
    with pytest.raises(RpfsError, match=r"3 point\(s\): p1 \(in the trash\)"):
        service.delete("d")
    service.delete("d", with_points=True)
    assert trash.listing(repo.index) == []
    assert refcount_errors(repo.index) == []
    with repo.index.read() as txn:
        assert repo.index.list_lineages(txn) == []
