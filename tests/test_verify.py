"""`rpfs verify`: a flipped byte in one record is found, named by point and byte range,
reads as EIO through the mount, and is healed by the next capture of the same content;
verifying named points reads exactly their chunks; `--max-duration` stops between packs
and the next run goes on with the packs not yet verified."""

from __future__ import annotations

import errno
import json
import random
import time
from pathlib import Path

import pytest
from helpers import MiB, assert_check_clean, point_image, sha256_file

from rpfs.capture import capture
from rpfs.disks.service import DiskService
from rpfs.index import ChunkLoc
from rpfs.repo import Repository
from rpfs.store.format import HEADER, pack_name

BS = 64 << 10


def _loc_of_block(repo: Path, disk: str, point: str, block: int) -> tuple[bytes, ChunkLoc]:
    with Repository(repo) as opened, opened.index.read() as txn:
        rec = opened.index.get_point(txn, disk, point)
        value = opened.index.resolve(txn, opened.index.chain(txn, rec.lineage, rec.gen), block)
        return value, opened.index.get_chunk(txn, value)


def _flip(repo: Path, loc: ChunkLoc, at: int) -> None:
    path = repo / "packs" / pack_name(loc.pack)
    with open(path, "r+b") as f:
        f.seek(loc.offset + at)
        byte = f.read(1)[0]
        f.seek(loc.offset + at)
        f.write(bytes([byte ^ 0x40]))


def _verify(rpfs, *args: str) -> tuple[int, dict]:
    res = rpfs("verify", *args, "--json", timeout=300)
    return res.returncode, json.loads(res.stdout)


def test_a_flipped_byte_is_named_reads_eio_and_a_capture_heals_it(rpfs, repo: Path, mount,
                                                                  tmp_path: Path):
    source = tmp_path / "vm.img"
    data = bytearray(random.Random(3).randbytes(4 * MiB))
    source.write_bytes(data)
    rpfs.capture("vm", source, "p1")
    data[0:BS] = random.Random(4).randbytes(BS)  # p2 rewrites block 0 only
    source.write_bytes(data)
    rpfs.capture("vm", source, "p2")
    rpfs("clone", "vm@p2", "c", check=True)  # a clone's point reads it through its origin
    mnt, _ = mount()
    rpfs("snapshot", "c", "--name", "s1", check=True)
    rpfs("point", "delete", "vm@p1", check=True)  # in the trash: still a reader
    rc, report = _verify(rpfs)
    assert rc == 0 and report["sound"] and report["bad"] == []

    digest, loc = _loc_of_block(repo, "vm", "p2", 5)
    _flip(repo, loc, HEADER.size + 1000)
    rc, report = _verify(rpfs)
    assert rc == 1 and not report["sound"]
    [bad] = report["bad"]
    assert (bad["chunk"], bad["pack"], bad["offset"], bad["found_now"]) == (
        digest.hex(), loc.pack, loc.offset, True)
    assert sorted((r["point"], r["in_trash"], r["ranges"]) for r in bad["readers"]) == [
        ("c@s1", False, [[5 * BS, BS]]), ("vm@p1", True, [[5 * BS, BS]]),
        ("vm@p2", False, [[5 * BS, BS]])]
    text = rpfs("verify").stdout
    assert f"read by vm@p2 at bytes {5 * BS}-{6 * BS - 1} (64.0 KiB)" in text
    assert text.splitlines()[-1].endswith("1 bad chunks (reads of them fail; a capture or "
                                          "snapshot of the same content heals them)")
    with open(point_image(mnt, "vm", "p2"), "rb", buffering=0) as f, \
            pytest.raises(OSError) as err:
        f.seek(5 * BS)
        f.read(BS)
    assert err.value.errno == errno.EIO
    assert_check_clean(rpfs)  # a bad payload is verify's to find, not an inconsistency

    # The same content captured again: the point's block is unchanged, but its chunk is
    # bad, so the capture stores it anew and every reader reads the good copy.
    rpfs.capture("vm", source, "p3")
    rc, report = _verify(rpfs)
    assert (rc, report["bad"]) == (0, [])
    assert sha256_file(point_image(mnt, "vm", "p2")) == sha256_file(source)
    assert sha256_file(point_image(mnt, "c", "s1")) == sha256_file(source)
    assert_check_clean(rpfs)


def test_named_points_verify_exactly_the_chunks_they_read(rpfs, repo: Path, tmp_path: Path):
    rng = random.Random(8)
    for disk in ("a", "b"):
        source = tmp_path / f"{disk}.img"
        source.write_bytes(rng.randbytes(MiB) + bytes(MiB))  # 16 data blocks, 16 zero
        rpfs.capture(disk, source, "p1")
    _, loc = _loc_of_block(repo, "b", "p1", 2)
    _flip(repo, loc, HEADER.size + 7)
    rc, report = _verify(rpfs, "a@p1")
    assert (rc, report["chunks_verified"], report["bad"]) == (0, 16, [])
    assert report["packs_verified"] == 0, "a point's chunks are not a whole pack"
    rc, report = _verify(rpfs, "b@p1")
    assert rc == 1 and report["chunks_verified"] == 16
    assert [r["point"] for r in report["bad"][0]["readers"]] == ["b@p1"]
    res = rpfs("verify", "b@p9")
    assert res.returncode == 1 and "no point 'p9'" in res.stderr


def test_max_duration_stops_between_packs_and_the_next_run_goes_on(repo: Path, tmp_path,
                                                                   monkeypatch):
    """Ten packs, each read taking 50 ms: a 0.12 s run verifies a few and stops, the next
    takes the packs verified longest ago (never, first), so every pack is verified once
    before any twice."""
    rng = random.Random(1)
    with Repository(repo) as opened:
        service = DiskService(opened)
        for i in range(10):
            source = tmp_path / f"d{i}.img"
            source.write_bytes(rng.randbytes(256 << 10))
            capture(opened, f"d{i}", source, point="p1")
        slow = opened.store.get_many

        def get_many(wanted, **kw):
            time.sleep(0.05)
            return slow(wanted, **kw)

        monkeypatch.setattr(opened.store, "get_many", get_many)
        runs: list[set[int]] = []
        verified: dict[int, dict] = {}
        while len(set().union(*runs)) < 10:
            before = verified
            report = service.verify(max_duration=0.12)
            assert report["sound"] and report["stopped_early"], report
            assert 1 <= report["packs_verified"] <= 4, report
            assert report["packs_left"] == 10 - report["packs_verified"]
            with opened.index.read() as txn:
                verified = opened.index.verified(txn)
            done = set().union(*runs)
            runs.append({p for p, v in verified.items() if before.get(p) != v})
            assert len(runs[-1]) == report["packs_verified"]
            if runs[-1] & done:  # a second time only once every pack had its first
                assert set(verified) - done <= runs[-1], runs
            assert len(runs) <= 10
        assert len(verified) == 10
        service.registry.close_all()
