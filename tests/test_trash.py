"""The trash, in process: delete moves a point there (out of every listing), undelete
brings it back exactly, purge drops it (by name, or once its period has passed)."""

from __future__ import annotations

import hashlib
import json
import os
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
def captured(tmp_path: Path):
    """A repository with three captured points d@p1..p3."""
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


def test_delete_then_undelete_is_exact(captured: Repository):
    before = read(captured, "d@p2")
    with captured.index.read() as txn:
        record = captured.index.get_point(txn, "d", "p2")
    [done] = trash.delete(captured.index, ["d@p2"])
    assert names(captured) == ["p1", "p3"]
    with pytest.raises(RpfsError, match="has no point 'p2'"):
        read(captured, "d@p2")
    [held] = trash.listing(captured.index)
    assert (held["disk"], held["name"]) == ("d", "p2")
    assert held["purge_after"] == done["deleted_at"] + trash.TRASH_DAYS * 86400
    assert refcount_errors(captured.index) == []
    trash.undelete(captured.index, "d@p2")
    assert names(captured) == ["p1", "p2", "p3"]
    assert trash.listing(captured.index) == []
    with captured.index.read() as txn:
        assert captured.index.get_point(txn, "d", "p2") == record
    assert read(captured, "d@p2") == before


def test_the_newest_point_is_deletable_and_undelete_refuses_a_reused_name(
    captured: Repository, tmp_path: Path
):
    trash.delete(captured.index, ["d@p3"])
    (tmp_path / "source.img").write_bytes(bytes(NBLOCKS * BS))
    capture(captured, "d", tmp_path / "source.img", "p3")  # the name again
    with pytest.raises(RpfsError, match="new point named 'p3'"):
        trash.undelete(captured.index, "d@p3")
    assert len(trash.listing(captured.index)) == 1
    trash.delete(captured.index, ["d@p3"])  # deleted twice under one name: both kept
    assert [e["name"] for e in trash.listing(captured.index)] == ["p3", "p3"]
    trash.undelete(captured.index, "d@p3")  # the most recently deleted one
    assert read(captured, "d@p3") == hashlib.sha256(bytes(NBLOCKS * BS)).hexdigest()
    assert refcount_errors(captured.index) == []


def test_bad_names_change_nothing(captured: Repository):
    with pytest.raises(RpfsError, match="has no point 'nope'"):
        trash.delete(captured.index, ["d@p1", "d@nope"])
    assert names(captured) == ["p1", "p2", "p3"]
    with pytest.raises(RpfsError, match="no point d@p1 in the trash"):
        trash.undelete(captured.index, "d@p1")
    with pytest.raises(RpfsError, match="no point d@p1 in the trash"):
        trash.purge_trash(captured.index, ["d@p1"])


def test_purge_expired_after_the_period_only(captured: Repository, monkeypatch):
    monkeypatch.setattr(trash, "now", lambda: 1_000_000.0)
    trash.delete(captured.index, ["d@p1"])
    monkeypatch.setattr(trash, "now", lambda: 1_000_000.0 + 86400)
    trash.delete(captured.index, ["d@p2"])
    day = 86400
    assert trash.purge_trash(captured.index, expired_only=True, at=1_000_000 + 14 * day - 1) == []
    purged = trash.purge_trash(captured.index, expired_only=True, at=1_000_000 + 14 * day)
    assert [p["name"] for p in purged] == ["p1"]
    assert [e["name"] for e in trash.listing(captured.index)] == ["p2"]
    assert refcount_errors(captured.index) == []
    assert trash.purge_trash(captured.index, expired_only=True, trash_days=0, at=1_000_000 + day)
    assert trash.listing(captured.index) == []
    assert refcount_errors(captured.index) == []


def test_an_archiving_point_is_refused_an_open_disk_image_does_not_hold_purges(
    tmp_path: Path, monkeypatch
):
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
            service.registry.acquire("vm", handle=True)  # the disk's image is open
            try:  # which does not hold off a purge of its points
                service.delete_points(["vm@s1"], purge=True)
            finally:
                service.registry.release("vm", handle=True)
            assert refcount_errors(repo.index) == []
        finally:
            service.registry.close_all()


def test_disk_delete_counts_and_drops_its_trash(captured: Repository):
    trash.delete(captured.index, ["d@p1", "d@p2", "d@p3"])
    service = DiskService(captured)
    with pytest.raises(RpfsError, match=r"3 point\(s\): p1 \(in the trash\)"):
        service.delete("d")
    service.delete("d", with_points=True)
    assert trash.listing(captured.index) == []
    assert refcount_errors(captured.index) == []
    with captured.index.read() as txn:
        assert captured.index.list_lineages(txn) == []


def test_an_open_point_image_reads_on_through_a_purge(captured: Repository):
    """Deleted and purged while open, an image reads its bytes to the end: the purge
    leaves it in the trash marked purge_on_close (not undeletable), purges of other
    points go through at once, and the image's close purges it, refcounts exact."""
    service = DiskService(captured)
    cache = ChunkCache(captured)
    try:
        point = service.registry.open_point("d", "p2")  # as the mount's open counts it
        image = open_point(captured, cache, "d", "p2")
        before = image.read(0, image.size)
        p3 = read(captured, "d@p3")
        service.delete_points(["d@p2"])
        assert image.read(0, image.size) == before
        [marked] = service.purge_trash(["d@p2"])
        assert (marked["name"], marked["purge_on_close"]) == ("p2", True)
        assert [(p["name"], p["purge_on_close"]) for p in service.list_trash()] == [
            ("p2", True)]
        with pytest.raises(RpfsError, match=r"d@p2 is being purged .* cannot be undeleted"):
            service.undelete("d@p2")
        [p1] = service.delete_points(["d@p1"], purge=True)
        assert (p1["purged"], p1["purge_on_close"]) == (True, False)
        assert names(captured) == ["p3"]
        assert image.read(0, image.size) == before
        assert refcount_errors(captured.index) == []
        service.registry.close_point(point)
        assert service.list_trash() == []
        assert refcount_errors(captured.index) == []
        service.clone("d@p3", "c")
        service.delete_points(["d@p3"], purge=True)
        assert names(captured) == []
        [clone] = [d for d in service.disks() if d["name"] == "c"]
        assert (clone["origin"], clone["origin_deleted"]) == ("d@p3", True)
        with service.registry.using("c") as disk:
            assert hashlib.sha256(disk.read(0, disk.size)).hexdigest() == p3
        assert service.list_trash() == []
        assert refcount_errors(captured.index) == []
    finally:
        service.registry.close_all()
        cache.close()


def test_a_purge_on_close_left_by_a_crash_goes_at_the_next_purge(captured: Repository):
    """A mark whose image is gone (the daemon was killed with it open) is purged by
    `rpfs trash purge` without a daemon, by name or with --expired (the daemon's start:
    test_purge_open.py)."""
    service = DiskService(captured)
    try:
        for name in ("p1", "p2"):
            service.registry.open_point("d", name)  # as the mount's open counts it
            service.delete_points([f"d@{name}"], purge=True)
            service.registry._point_readers.clear()  # the daemon died: no close comes
        assert [p["purge_on_close"] for p in service.list_trash()] == [True, True]
        assert [p["name"] for p in service.purge_trash(["d@p1"])] == ["p1"]
        [p2] = service.purge_trash(expired=True)  # not expired, but its close came
        assert (p2["name"], p2["purge_on_close"]) == ("p2", False)
        assert service.list_trash() == [] and names(captured) == ["p3"]
        assert refcount_errors(captured.index) == []
    finally:
        service.registry.close_all()


def test_trash_records_without_the_mark_read_and_encode_as_before(captured: Repository):
    """purge_on_close is optional (a trash record written before it reads unmarked) and
    written only when true, so an unmarked record encodes as it always did."""
    trash.delete(captured.index, ["d@p1"])
    with captured.index.read() as txn:
        [entry] = captured.index.list_trash(txn)
    assert "purge_on_close" not in json.loads(entry.encode())
    assert entry.purge_on_close is False
    entry.purge_on_close = True
    with captured.index.write() as txn:
        captured.index.put_trash(txn, entry)
    with captured.index.read() as txn:
        assert captured.index.list_trash(txn) == [entry]
    assert json.loads(entry.encode())["purge_on_close"] is True


def test_commands_without_a_daemon(rpfs, repo: Path, tmp_path: Path):
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(1).randbytes(256 << 10))
    rpfs.capture("d", source, "p1")
    source.write_bytes(random.Random(2).randbytes(256 << 10))
    rpfs.capture("d", source, "p2")
    done = rpfs("point", "delete", "d@p1", check=True)
    assert done.stdout == "d@p1: moved to the trash ('rpfs undelete' brings it back)\n"
    assert [p["name"] for p in rpfs.points("d")] == ["p2"]
    held = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert [(p["disk"], p["name"]) for p in held] == [("d", "p1")]
    assert "d@p1" in rpfs("trash", check=True).stdout
    bad = rpfs("undelete", "d@p2")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no point d@p2" in bad.stderr
    rpfs("undelete", "d@p1", check=True)
    assert [p["name"] for p in rpfs.points("d")] == ["p1", "p2"]
    rpfs("point", "delete", "d@p1", "d@p2", check=True)
    assert rpfs("trash", "purge", "--expired", check=True).stdout == "nothing to purge\n"
    assert rpfs("trash", "purge", "d@p1", check=True).stdout == "d@p1: purged\n"
    assert rpfs("trash", "purge", check=True).stdout == "d@p2: purged\n"
    assert rpfs("trash", check=True).stdout == "the trash is empty\n"
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []


def test_through_the_mount(rpfs, mounted: Path, tmp_path: Path):
    """With the daemon: a deleted point's name leaves MOUNT/points at once while an open
    image of it reads on; undelete brings it back bit-exact; purge leaves every survivor
    bit-exact."""
    rng = random.Random(3)
    source = tmp_path / "source.img"
    data = bytearray(rng.randbytes(1 << 20))
    source.write_bytes(data)
    rpfs.capture("d", source, "p1")
    data[: 64 << 10] = rng.randbytes(64 << 10)
    source.write_bytes(data)
    rpfs.capture("d", source, "p2")
    images = mounted / "points" / "d"
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in images.iterdir()}
    assert sorted(sums) == ["p1.img", "p2.img"]
    with open(images / "p1.img", "rb") as reader:
        half = reader.read(1 << 19)
        rpfs("point", "delete", "d@p1", check=True)
        assert sorted(os.listdir(images)) == ["p2.img"]
        assert not (images / "p1.img").exists()
        rest = reader.read()
    assert hashlib.sha256(half + rest).hexdigest() == sums["p1.img"]
    rpfs("undelete", "d@p1", check=True)
    assert hashlib.sha256((images / "p1.img").read_bytes()).hexdigest() == sums["p1.img"]
    rpfs("point", "delete", "--purge", "d@p1", check=True)
    assert sorted(os.listdir(images)) == ["p2.img"]
    assert hashlib.sha256((images / "p2.img").read_bytes()).hexdigest() == sums["p2.img"]
    assert json.loads(rpfs("trash", "--json", check=True).stdout) == []
