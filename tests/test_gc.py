"""`rpfs gc`: the space of deleted points comes back while the mount serves (packs within
10 % of the live bytes, every point and clone bit-exact, check clean); the dedup race
with a capture, forced each way with hooks; a compaction cut short (no space, or a
crash after its copies were durable) leaves the repository consistent and the next gc
finishes it without copying again."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from helpers import MiB, assert_check_clean, churn, point_image, sha256_file, write_random

from rpfs import capture as capture_module
from rpfs.capture import capture
from rpfs.errors import NoSpace
from rpfs.index import Index
from rpfs.lifecycle import trash
from rpfs.lifecycle.purge import refcount_errors
from rpfs.maintenance import gc
from rpfs.repo import Repository
from rpfs.store.format import pack_name


def _pack_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "packs").glob("*.pack"))


def test_gc_gives_the_space_of_deleted_points_back(rpfs, repo: Path, mount, tmp_path: Path):
    source = tmp_path / "vm.img"
    rng = random.Random(12)
    write_random(source, 256 * MiB, seed=12)
    sums = {}
    for i in range(1, 6):
        rpfs.capture("vm", source, f"p{i}")
        sums[f"p{i}"] = sha256_file(source)
        churn(source, rng, pieces=14)  # ~56 MiB of each point is its own
    mnt, _ = mount()
    rpfs("clone", "vm@p3", "c", check=True)  # reads p3's blocks through its origin
    rpfs("point", "delete", "vm@p1", "vm@p2", "vm@p3", "vm@p4", "--purge", check=True)
    before = _pack_bytes(repo)
    dry = json.loads(rpfs("gc", "--dry-run", "--json", check=True).stdout)
    assert _pack_bytes(repo) == before and dry["dry_run"] and dry["bytes_freed"] > 100 * MiB
    done = json.loads(rpfs("gc", "--json", timeout=600, check=True).stdout)
    assert done["stopped"] is None and done["chunks_freed"] == dry["chunks_freed"]
    info = json.loads(rpfs("info", "--json", check=True).stdout)
    du = _pack_bytes(repo)
    assert du == info["pack_bytes"] and du < before
    assert du <= 1.1 * info["stored_bytes"], (du, info["stored_bytes"])
    assert sha256_file(point_image(mnt, "vm", "p5")) == sums["p5"]
    assert sha256_file(mnt / "disks" / "c.img") == sums["p3"]
    assert_check_clean(rpfs)
    again = json.loads(rpfs("gc", "--json", check=True).stdout)
    assert (again["chunks_freed"], again["packs_deleted"]) == (0, 0), "nothing left to do"


# -- the dedup race, forced with hooks -----------------------------------------------------

BS = 4096


@pytest.fixture
def opened(tmp_path: Path):
    Repository.init(tmp_path / "repo", BS).close()
    with Repository(tmp_path / "repo") as repo:
        yield repo


def _image(tmp_path: Path, name: str, blocks: list[int]) -> Path:
    """An image whose block i holds content `blocks[i]` (the same number, the same bytes)."""
    path = tmp_path / f"{name}.img"
    path.write_bytes(b"".join(random.Random(b).randbytes(BS) for b in blocks))
    return path


def _read(repo: Repository, disk: str, point: str) -> str:
    from rpfs.disks.point import open_point
    from rpfs.store.cache import ChunkCache

    with ChunkCache(repo) as cache:
        image = open_point(repo, cache, disk, point)
        return hashlib.sha256(image.read(0, image.size)).hexdigest()


def _delete_disk(repo: Repository, disk: str) -> None:
    """Delete a disk and its points at once: its chunks lose their references."""
    from rpfs.disks.service import DiskService

    service = DiskService(repo)
    service.delete(disk, with_points=True)
    trash.purge_trash(repo.index)
    service.registry.close_all()


def _around(monkeypatch, target, name: str, before) -> None:
    """Run `before(repo)` each time `target.name` is called, before it."""
    original = getattr(target, name)

    def hooked(self, *args, **kw):
        before()
        return original(self, *args, **kw)

    monkeypatch.setattr(target, name, hooked)


def test_a_chunk_freed_between_examine_and_protect_is_stored_anew(opened, tmp_path,
                                                                  monkeypatch):
    """Content 7 is unreferenced (its only disk deleted) before the capture starts; GC
    frees it after the capture examined it and before it protects it: the capture
    stores its own copy, and its point reads exactly."""
    capture(opened, "old", _image(tmp_path, "old", [7, 8]), point="p1")
    _delete_disk(opened, "old")
    ran = []
    examine = capture_module.examine

    def examine_then_gc(*args, **kw):  # GC runs once the capture examined its blocks
        change = examine(*args, **kw)
        if args[2] == 1 and not ran:
            ran.append(gc.run(opened))
        return change

    monkeypatch.setattr(capture_module, "examine", examine_then_gc)
    source = _image(tmp_path, "new", [7, 9])
    capture(opened, "new", source, point="p1")
    assert ran and ran[0]["chunks_freed"] == 2, "GC ran in the window and freed 7 and 8"
    assert _read(opened, "new", "p1") == hashlib.sha256(source.read_bytes()).hexdigest()
    assert refcount_errors(opened.index) == []


def test_a_chunk_a_running_capture_protected_is_not_freed(opened, tmp_path, monkeypatch):
    """Content 7 is unreferenced when the capture meets it; GC runs between its protect
    and its publish: 7 became free again (by the protect) after the capture started, so
    GC leaves it; the point reads exactly, and once the capture is done 8 is freed."""
    capture(opened, "old", _image(tmp_path, "old", [7, 8]), point="p1")
    _delete_disk(opened, "old")
    ran = []
    _around(monkeypatch, capture_module._Capture, "_publish",
            lambda: ran.append(gc.run(opened)))
    source = _image(tmp_path, "new", [7, 9])
    capture(opened, "new", source, point="p1")
    # Freed: 8. Left: 7 (protected) and 9 (stored by the capture, named at its publish).
    assert (ran[0]["chunks_freed"], ran[0]["chunks_deferred"]) == (1, 2), ran
    assert _read(opened, "new", "p1") == hashlib.sha256(source.read_bytes()).hexdigest()
    assert refcount_errors(opened.index) == []


def test_a_chunk_dropped_to_0_during_a_capture_that_deduplicated_it_stays(opened, tmp_path,
                                                                         monkeypatch):
    """The capture deduplicates against content 7 while a point references it; before
    the capture publishes, that point's disk is deleted and GC runs: 7 dropped to 0 after the
    capture started, so it is not freed, and the point reads exactly."""
    capture(opened, "old", _image(tmp_path, "old", [7, 8]), point="p1")
    ran = []

    def purge_then_gc():
        _delete_disk(opened, "old")
        ran.append(gc.run(opened))

    _around(monkeypatch, capture_module._Capture, "_publish", purge_then_gc)
    source = _image(tmp_path, "new", [7, 9])
    capture(opened, "new", source, point="p1")
    # Left: 7 and 8 (free since the capture started) and 9 (the capture's own, unnamed yet).
    assert (ran[0]["chunks_freed"], ran[0]["chunks_deferred"]) == (0, 3), ran
    assert _read(opened, "new", "p1") == hashlib.sha256(source.read_bytes()).hexdigest()
    assert refcount_errors(opened.index) == []
    assert gc.run(opened)["chunks_freed"] == 1, "8, once the capture is done"


# -- compaction cut short ------------------------------------------------------------------

def _two_packs_half_dead(opened: Repository, tmp_path: Path) -> dict[str, str]:
    """Two disks of 64 blocks, then half of each rewritten and the first points purged:
    every pack is half dead. The surviving points' sha256."""
    sums = {}
    for disk, seed in (("a", 100), ("b", 200)):
        blocks = list(range(seed, seed + 64))
        capture(opened, disk, _image(tmp_path, disk, blocks), point="p1")
        blocks[::2] = [b + 1000 for b in blocks[::2]]
        source = _image(tmp_path, disk, blocks)
        capture(opened, disk, source, point="p2")
        sums[disk] = hashlib.sha256(source.read_bytes()).hexdigest()
        trash.delete(opened.index, [f"{disk}@p1"], purge=True)
    return sums


def test_no_space_stops_gc_cleanly_and_the_next_run_goes_on(opened, tmp_path, monkeypatch):
    sums = _two_packs_half_dead(opened, tmp_path)
    compact = gc._compact
    calls = []

    def no_room(what):
        raise NoSpace(f"no space for {what} (a test)", str(opened.root))

    def second_finds_no_room(repo, packs, writer, uploader):
        calls.append(packs)
        if len(calls) == 2:
            monkeypatch.setattr(opened.space, "check", no_room)
        return compact(repo, packs, writer, uploader)

    monkeypatch.setattr(gc, "_compact", second_finds_no_room)
    stopped = gc.run(opened, threshold=1.0)
    assert stopped["stopped"] and "no space" in stopped["stopped"]
    assert stopped["packs_compacted"] == 1
    assert refcount_errors(opened.index) == []
    assert {d: _read(opened, d, "p2") for d in sums} == sums
    monkeypatch.undo()
    done = gc.run(opened)
    assert done["stopped"] is None and done["packs_deleted"] >= 1
    assert {d: _read(opened, d, "p2") for d in sums} == sums
    assert refcount_errors(opened.index) == []


def test_a_compaction_killed_after_its_copies_resumes_without_copying(opened, tmp_path,
                                                                      monkeypatch):
    sums = _two_packs_half_dead(opened, tmp_path)

    class Killed(Exception):
        pass

    moves = []
    move_chunk = Index.move_chunk

    def dies_midway(self, txn, digest, loc):
        moves.append(loc.pack)
        if len(moves) == 10:  # in the third batch of 4: 8 chunks moved, committed
            raise Killed
        return move_chunk(self, txn, digest, loc)

    monkeypatch.setattr(gc, "MOVE_BATCH", 4)
    monkeypatch.setattr(Index, "move_chunk", dies_midway)
    with pytest.raises(Killed):
        gc.run(opened, threshold=1.0)
    monkeypatch.undo()
    with opened.index.read() as txn:
        state = opened.index.get_note(txn, gc.STATE)
        interrupted = set(state["packs"])
        moved = sum(loc.pack in state["into"] for _, loc in opened.index.iter_chunks(txn))
    assert moved == 8, "two batches committed before the kill"
    copies = {p: (opened.root / "packs" / pack_name(p)).stat().st_size for p in state["into"]}
    assert refcount_errors(opened.index) == []
    assert {d: _read(opened, d, "p2") for d in sums} == sums
    done = gc.run(opened, threshold=0.8)
    assert done["packs_deleted"] >= 1
    with opened.index.read() as txn:
        assert opened.index.get_note(txn, gc.STATE) is None
        packs = {loc.pack for _, loc in opened.index.iter_chunks(txn)}
    assert {p: (opened.root / "packs" / pack_name(p)).stat().st_size for p in state["into"]
            } == copies, "the finish copied nothing again: it moved the chunks to the copies"
    assert not packs & interrupted, "the interrupted pack was finished and deleted"
    assert {d: _read(opened, d, "p2") for d in sums} == sums
    assert refcount_errors(opened.index) == []


def test_what_crashes_leave_goes(opened, tmp_path):
    """A pack's tail past its last named record (a killed writer's), a local file no
    disk names (a crash between a disk's deletion and its file's) once it is old enough,
    and the staging rows of a capture whose process is gone."""
    import os

    source = _image(tmp_path, "a", list(range(32)))
    capture(opened, "a", source, point="p1")
    [pack] = sorted((opened.root / "packs").glob("*.pack"))
    size = pack.stat().st_size
    with open(pack, "ab") as f:
        f.write(b"RPC1" + os.urandom(5000))  # half a record, as a killed append leaves
    (opened.root / "disks").mkdir(exist_ok=True)
    old, new = opened.root / "disks" / "00000077.raw", opened.root / "disks" / "00000078.raw"
    for path in (old, new):
        path.write_bytes(b"x" * 4096)
    os.utime(old, (1, 1))
    with opened.index.write() as txn:
        opened.index.put_capture(txn, 55, {"disk": "gone", "pid": 1 << 22, "started": 0})
        opened.index.stage(txn, 55, 0, b"")
    done = gc.run(opened)
    assert done["tail_bytes"] == 5004 and pack.stat().st_size == size
    assert done["orphan_files"] == ["disks/00000077.raw"]
    assert not old.exists() and new.exists(), "a recent file may be a disk being created"
    with opened.index.read() as txn:
        assert opened.index.list_captures(txn) == []
    assert _read(opened, "a", "p1") == hashlib.sha256(source.read_bytes()).hexdigest()
    assert refcount_errors(opened.index) == []
    again = gc.run(opened)
    assert (again["tail_bytes"], again["orphan_files"]) == (0, [])
