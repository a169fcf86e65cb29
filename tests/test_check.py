"""`rpfs check` and `rpfs info` on a real repository: clean after a history of captures,
clones, snapshots and deletions (also through the daemon); every kind of damage found,
named, with what to do, a non-zero exit and nothing changed; what crashes leave listed
as reclaimable; `info --json` equal to a recount."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MiB, write_at

from rpfs.index import ChunkLoc, u64
from rpfs.repo import Repository
from rpfs.store.format import pack_name


def _history(rpfs, tmp_path: Path) -> None:
    """Three captures with churn, a clone written to, a point of it, one point purged and
    one in the trash."""
    source = tmp_path / "src.img"
    rng = random.Random(5)
    source.write_bytes(rng.randbytes(3 * MiB) + bytes(MiB))
    for name in ("p1", "p2", "p3"):
        rpfs.capture("vm", source, name)
        write_at(source, rng.randrange(0, 3 * MiB), rng.randbytes(300_000))
    rpfs("clone", "vm@p2", "c", check=True)
    rpfs("snapshot", "c", "--name", "s1", check=True)
    rpfs("point", "delete", "vm@p1", "--purge", check=True)
    rpfs("point", "delete", "vm@p3", check=True)


def _check(rpfs) -> tuple[int, dict]:
    res = rpfs("check", "--json")
    return res.returncode, json.loads(res.stdout)


def test_a_history_checks_clean_and_info_agrees_with_a_recount(rpfs, repo: Path,
                                                               tmp_path: Path):
    _history(rpfs, tmp_path)
    rc, report = _check(rpfs)
    assert (rc, report["clean"], report["problems"]) == (0, True, [])
    packs = len(list((repo / "packs").glob("*.pack")))
    assert report["checked"] == {"lineages": 2, "disks": 2, "points": 2, "trash": 1,
                                 "chunks": report["checked"]["chunks"], "packs": packs}
    text = rpfs("check", check=True).stdout
    assert text.splitlines()[-1].endswith(": clean")

    figures = json.loads(rpfs("info", "--json", check=True).stdout)
    with Repository(repo) as opened, opened.index.read() as txn:
        live = opened.index.live_stored_bytes(txn)  # a scan of every chunk record
        points = opened.index.list_points(txn)
        referenced = sum(loc.refcount > 0 for _, loc in opened.index.iter_chunks(txn))
    pack_bytes = sum(p.stat().st_size for p in (repo / "packs").glob("*.pack"))
    bs = 64 << 10
    assert figures["stored_bytes"] == live
    assert figures["pack_bytes"] == pack_bytes
    assert figures["dead_bytes"] == pack_bytes - live > 0, "p1's purge left dead records"
    assert (figures["disks"], figures["writable_disks"], figures["points"],
            figures["trash_points"], figures["packs"]) == (2, 1, 2, 1, packs)
    assert figures["logical_bytes"] == sum(p.size for p in points) == 2 * 4 * MiB
    allocated = sum(p.allocated_blocks for p in points) * bs
    assert figures["allocated_bytes"] == allocated
    assert figures["dedup_ratio"] == round(allocated / (referenced * bs), 3)
    assert figures["compression_ratio"] == round(referenced * bs / live, 3)
    local = next((repo / "disks").glob("*.raw")).stat().st_blocks * 512
    assert figures["local_bytes"] == local


def test_check_through_the_daemon(rpfs, repo: Path, mount, tmp_path: Path):
    _history(rpfs, tmp_path)
    mnt, _ = mount()
    image = mnt / "disks" / "c.img"
    write_at(image, 5 * 65536 + 100, b"written through the mount")
    rpfs("snapshot", "c", "--name", "s2", check=True)
    rc, report = _check(rpfs)
    assert (rc, report["problems"]) == (0, [])
    assert report["checked"]["points"] == 3
    assert json.loads(rpfs("info", "--json", check=True).stdout)["points"] == 3


def _edit_index(repo: Path, edit: Callable) -> None:
    with Repository(repo) as opened, opened.index.write() as txn:
        edit(opened.index, txn)


def _first_chunk(index, txn) -> tuple[bytes, ChunkLoc]:
    return next((d, loc) for d, loc in index.iter_chunks(txn) if loc.refcount > 0)


def _bump_refcount(repo: Path) -> None:
    def edit(index, txn):
        digest, loc = _first_chunk(index, txn)
        txn.put(digest, ChunkLoc(loc.pack, loc.offset, loc.length, loc.refcount + 1).encode(),
                db=index.db["chunks"])
    _edit_index(repo, edit)


def _move_chunk(repo: Path) -> None:
    def edit(index, txn):
        digest, loc = _first_chunk(index, txn)
        txn.put(digest, ChunkLoc(loc.pack, loc.offset + 1, loc.length, loc.refcount).encode(),
                db=index.db["chunks"])
    _edit_index(repo, edit)


def _cut_pack(repo: Path) -> None:
    pack = repo / "packs" / pack_name(1)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 1000)


def _drop_lineage(repo: Path) -> None:
    def edit(index, txn):
        clone = index.get_disk(txn, "c")
        txn.delete(u64(clone.lineage), db=index.db["lineages"])
    _edit_index(repo, edit)


def _drop_gens_entry(repo: Path) -> None:
    def edit(index, txn):
        with txn.cursor(db=index.db["gens"]) as cur:
            cur.first()
            cur.delete()
    _edit_index(repo, edit)


def _unlist_disk(repo: Path) -> None:
    """The points of vm stop being readers a purge sees."""
    def edit(index, txn):
        lin = index.get_lineage(txn, index.get_disk(txn, "vm").lineage)
        lin.disks.remove("vm")
        index.put_lineage(txn, lin)
    _edit_index(repo, edit)


def _bad_map_state(repo: Path) -> None:
    def edit(index, txn):
        disk = index.get_disk(txn, "c")
        index.put_map_page(txn, disk.file_id, 0, bytes([1, 9, 0]))
    _edit_index(repo, edit)


def _orphan_map(repo: Path) -> None:
    _edit_index(repo, lambda index, txn: index.put_map_page(txn, 4242, 0, bytes(4)))


def _lose_local_file(repo: Path) -> None:
    next((repo / "disks").glob("*.raw")).unlink()


DAMAGE = {
    "refcount": (_bump_refcount, "refcount", "index restore"),
    "location": (_move_chunk, "no record header", "rpfs verify"),
    "pack-cut": (_cut_pack, "in pack 1 of", "rpfs verify"),
    "pack-gone": (lambda repo: (repo / "packs" / pack_name(1)).unlink(),
                  "pack 1 is missing", "rpfs verify"),
    "lineage": (_drop_lineage, "its lineage", "index restore"),
    "gens": (_drop_gens_entry, "missing from gens", "index restore"),
    "reader": (_unlist_disk, "does not list disk vm", "index restore"),
    "local-file": (_lose_local_file, "its local file disks/", "index restore"),
    "map-state": (_bad_map_state, "block-map page 0 holds a state", "index restore"),
    "map-orphan": (_orphan_map, "local file 4242, which no disk names", "index restore"),
}


def _manifest(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file() and p.suffix != ".lock"
            and p.name != "lock.mdb"}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_found_named_and_nothing_changes(case, rpfs, repo: Path, tmp_path: Path):
    _history(rpfs, tmp_path)
    damage, problem, fix = DAMAGE[case]
    damage(repo)
    before = _manifest(repo)
    rc, report = _check(rpfs)
    assert rc == 1 and not report["clean"]
    assert any(problem in f["problem"] and fix in f["fix"] for f in report["problems"]), \
        report["problems"]
    res = rpfs("check")
    assert res.returncode == 1
    assert res.stdout.splitlines()[-1].endswith(f"{len(report['problems'])} problems")
    assert _manifest(repo) == before, "check changed the repository"


def test_what_crashes_leave_is_reclaimable_not_a_problem(rpfs, repo: Path, tmp_path: Path):
    _history(rpfs, tmp_path)
    (repo / "disks" / "00000099.raw").write_bytes(b"x" * 4096)
    (repo / "packs" / pack_name(77)).write_bytes(b"")

    def dead_capture(index, txn):
        index.put_capture(txn, 999, {"disk": "vm", "pid": 1 << 22, "started": 0})
        index.stage(txn, 999, 0, b"")
    _edit_index(repo, dead_capture)
    rc, report = _check(rpfs)
    assert (rc, report["problems"]) == (0, [])
    reclaimable = "\n".join(report["reclaimable"])
    for needle in ("local file disks/00000099.raw (no disk names it)",
                   "staging rows of capture 999 of disk vm",
                   "pack 77 (0 bytes): nothing the index names",
                   "bytes that no extent references"):
        assert needle in reclaimable, reclaimable
