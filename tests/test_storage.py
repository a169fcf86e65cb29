"""What a capture stores: only changed blocks, nothing for zeros, one copy of duplicates,
and exactly the extents a --changed list names."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from helpers import (
    BS,
    RAW_RECORD,
    MiB,
    assert_same_bytes,
    dir_size,
    point_image,
    read_at,
    sha256_file,
    sparse_copy,
    write_at,
    write_random,
)

RECORD = RAW_RECORD


def test_second_point_stores_only_changed_blocks(rpfs, mounted, tmp_path):
    src = tmp_path / "raw.img"
    nblocks = 1024  # 64 MiB
    write_random(src, nblocks * BS, seed=1)
    at_p1 = tmp_path / "at-p1.img"
    sparse_copy(src, at_p1)
    p1 = rpfs.capture("raw", src, "p1")
    assert p1["blocks_written"] == nblocks
    assert p1["allocated_blocks"] == nblocks
    assert p1["bytes_stored"] == nblocks * RECORD  # random data is stored raw, once

    rng = random.Random(2)
    new_random = [5, 100, 511, 1023]  # whole blocks of new random data, incl. the last
    write_at(src, 7 * BS, bytes(BS))  # block 7 becomes zeros: written, nothing stored
    for b in new_random:
        write_at(src, b * BS, rng.randbytes(BS))
    write_at(
        src, 300 * BS + 12345, b"\xff" if read_at(src, 300 * BS + 12345, 1) != b"\xff" else b"\x00"
    )  # one byte of block 300
    write_at(src, 600 * BS, read_at(src, 3 * BS, BS))  # block 600 := copy of block 3: dedup
    # An unchanged rewrite is no change at all.
    write_at(src, 40 * BS, read_at(src, 40 * BS, BS))
    k = len(new_random) + 3
    rpfs("capture", "raw", src, "--name", "p2", check=True)
    p2 = rpfs.point("raw", "p2")  # from `rpfs points --json`
    assert p2 == rpfs.point_record("raw", "p2")
    assert p2["method"] == "incremental"
    assert p2["blocks_written"] == k
    assert p2["bytes_stored"] == (len(new_random) + 1) * RECORD  # the zero and the copy: 0
    assert p2["allocated_blocks"] == nblocks - 1

    packs_before = dir_size(rpfs.repo / "packs")
    p3 = rpfs.capture("raw", src, "p3")  # nothing changed since p2
    assert (p3["blocks_written"], p3["bytes_stored"]) == (0, 0)
    assert dir_size(rpfs.repo / "packs") == packs_before

    assert_same_bytes(point_image(mounted, "raw", "p1"), at_p1)
    assert_same_bytes(point_image(mounted, "raw", "p2"), src)
    assert_same_bytes(point_image(mounted, "raw", "p3"), src)


def test_sparse_and_zero_disks_store_almost_nothing(rpfs, mounted, tmp_path):
    sparse = tmp_path / "sparse.img"
    subprocess.run(["truncate", "-s", "256M", str(sparse)], check=True)
    zeros = tmp_path / "zeros.img"
    with open(zeros, "wb") as f:  # written zeros: no holes for SEEK_DATA to skip
        for _ in range(64):
            f.write(bytes(MiB))
    assert os.stat(zeros).st_blocks * 512 >= 64 * MiB
    rpfs("capture", "sparse", sparse, "--name", "p", check=True)
    rpfs("capture", "zeros", zeros, "--name", "p", check=True)
    p_sparse, p_zero = rpfs.points()  # `rpfs points --json`, sorted by disk
    for p in (p_sparse, p_zero):
        assert p["bytes_stored"] == 0, p
        assert p["allocated_blocks"] == 0, p
    assert p_sparse["size"] == 256 * MiB
    assert dir_size(rpfs.repo / "packs") < 256 << 10

    # A sparse disk with a little data stores only that data.
    mostly = tmp_path / "mostly-sparse.img"
    subprocess.run(["truncate", "-s", "256M", str(mostly)], check=True)
    rng = random.Random(9)
    for off in (0, 100 * MiB + 3, 256 * MiB - 100):
        write_at(mostly, off, rng.randbytes(100))
    p = rpfs.capture("mostly", mostly, "p")
    assert p["allocated_blocks"] == 3  # three 100-byte writes, none across a boundary
    assert p["bytes_stored"] < 4 * 2048, p
    assert dir_size(rpfs.repo / "packs") < 512 << 10

    for disk, src in (("sparse", sparse), ("zeros", zeros), ("mostly", mostly)):
        img = point_image(mounted, disk, "p")
        assert img.stat().st_size == src.stat().st_size
        assert_same_bytes(img, src)


def test_identical_disks_dedup_to_one_copy(rpfs, mounted, tmp_path):
    a = tmp_path / "a.img"
    write_random(a, 32 * MiB, seed=3)
    with open(a, "r+b") as f:  # some compressible blocks as well
        f.seek(8 * MiB)
        f.write((b"text text " * 400_000)[: 4 * MiB])
    b = tmp_path / "b.img"
    sparse_copy(a, b)
    pa = rpfs.capture("vm-a", a, "p")
    packs = dir_size(rpfs.repo / "packs")
    rpfs("capture", "vm-b", b, "--name", "p", check=True)
    pb = rpfs.point("vm-b", "p")  # from `rpfs points --json`
    assert pa["bytes_stored"] > 28 * MiB
    assert pb["bytes_stored"] == 0
    assert pb["blocks_written"] == pa["blocks_written"]  # each disk has all its blocks
    assert dir_size(rpfs.repo / "packs") == packs
    # A disk whose blocks repeat one block stores that block once.
    rep = tmp_path / "repeat.img"
    block = random.Random(4).randbytes(BS)
    rep.write_bytes(block * 256)
    pr = rpfs.capture("repeat", rep, "p")
    assert pr["blocks_written"] == 256
    assert pr["bytes_stored"] == RECORD
    assert_same_bytes(point_image(mounted, "vm-a", "p"), a)
    assert_same_bytes(point_image(mounted, "vm-b", "p"), b)
    assert_same_bytes(point_image(mounted, "repeat", "p"), rep)


def punch_hole(path: Path, offset: int, length: int) -> None:
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length), str(path)],
        check=True,
    )


def _changed_file(path: Path, extents: list[tuple[int, int]]) -> Path:
    path.write_text(json.dumps([{"start": s, "length": n} for s, n in extents]))
    return path


def test_changed_list_reads_only_listed_extents(rpfs, mounted, tmp_path):
    src = tmp_path / "cbt.img"
    write_random(src, 32 * MiB, seed=6)
    at_p1 = tmp_path / "at-p1.img"
    sparse_copy(src, at_p1)
    rpfs.capture("cbt", src, "p1")

    rng = random.Random(7)
    a_start, a_len = 3 * BS + 1000, BS  # region A spans blocks 3 and 4
    b_start, b_len = 20 * BS, 5000  # region B, inside block 20
    write_at(src, a_start, rng.randbytes(a_len))
    write_at(src, b_start, rng.randbytes(b_len))

    # Only A listed: the point has A's new bytes and B's old bytes (B was never read).
    p2 = rpfs.capture(
        "cbt", src, "p2", "--changed", _changed_file(tmp_path / "a.json", [(a_start, a_len)])
    )
    assert p2["method"] == "changed-list"
    assert p2["blocks_written"] == 2
    expected = tmp_path / "expected-p2.img"
    sparse_copy(at_p1, expected)
    write_at(expected, a_start, read_at(src, a_start, a_len))
    img2 = point_image(mounted, "cbt", "p2")
    assert read_at(img2, a_start, a_len) == read_at(src, a_start, a_len)
    assert read_at(img2, b_start, b_len) == read_at(at_p1, b_start, b_len)
    assert read_at(img2, b_start, b_len) != read_at(src, b_start, b_len)
    assert_same_bytes(img2, expected)

    # A complete list (in VMware's shape, unsorted, overlapping) gives the exact source.
    full = {
        "changedArea": [
            {"start": b_start, "length": b_len},
            {"start": a_start, "length": a_len},
            {"start": a_start + 10, "length": 20},
        ]
    }
    (tmp_path / "full.json").write_text(json.dumps(full))
    p3 = rpfs.capture("cbt", src, "p3", "--changed", tmp_path / "full.json")
    assert p3["blocks_written"] == 1  # A's blocks are already in p2: only B's block changes
    assert_same_bytes(point_image(mounted, "cbt", "p3"), src)
    # An empty list is a point identical to the previous one.
    p4 = rpfs.capture("cbt", src, "p4", "--changed", _changed_file(tmp_path / "e.json", []))
    assert (p4["blocks_written"], p4["bytes_stored"]) == (0, 0)
    assert_same_bytes(point_image(mounted, "cbt", "p4"), src)
    assert_same_bytes(point_image(mounted, "cbt", "p1"), at_p1)
    assert sha256_file(point_image(mounted, "cbt", "p2")) == sha256_file(expected)


def test_changed_list_sees_source_holes_as_zeros(rpfs, mounted, tmp_path):
    """A listed extent the source no longer holds data in is captured as zeros."""
    src = tmp_path / "holes.img"
    write_random(src, 8 * MiB, seed=8)
    rpfs.capture("holes", src, "p1")
    # Punch a hole over blocks 10..11, list them as changed.
    punch_hole(src, 10 * BS, 2 * BS)
    assert read_at(src, 10 * BS, 2 * BS) == bytes(2 * BS)
    p2 = rpfs.capture(
        "holes", src, "p2", "--changed", _changed_file(tmp_path / "c.json", [(10 * BS, 2 * BS)])
    )
    assert p2["blocks_written"] == 2
    assert p2["bytes_stored"] == 0
    assert p2["allocated_blocks"] == 128 - 2
    assert_same_bytes(point_image(mounted, "holes", "p2"), src)
    # A hole punched without a changed list is found by the next full comparison too.
    punch_hole(src, 50 * BS, BS)
    p3 = rpfs.capture("holes", src, "p3")
    assert (p3["blocks_written"], p3["bytes_stored"]) == (1, 0)
    assert_same_bytes(point_image(mounted, "holes", "p3"), src)


def test_first_capture_with_changed_list_takes_unlisted_as_zero(rpfs, mounted, tmp_path):
    """docs/design.md: on a disk's first capture, unlisted extents are taken as zero."""
    src = tmp_path / "first.img"
    write_random(src, 4 * MiB, seed=12)
    listed = [(BS, 2 * BS), (40 * BS + 10, 100)]
    p = rpfs.capture("first", src, "p", "--changed", _changed_file(tmp_path / "c.json", listed))
    assert p["method"] == "changed-list"
    assert p["blocks_written"] == 3
    expected = bytearray(4 * MiB)
    for first, end in ((1, 3), (40, 41)):
        expected[first * BS : end * BS] = read_at(src, first * BS, (end - first) * BS)
    assert point_image(mounted, "first", "p").read_bytes() == bytes(expected)


def test_capture_of_a_point_image_from_the_mount_dedups_fully(rpfs, mounted, tmp_path):
    """A point read back through the mount and captured as a new disk stores nothing new."""
    src = tmp_path / "orig.img"
    write_random(src, 16 * MiB, seed=13)
    write_at(src, 4 * MiB, bytes(2 * MiB))  # some zero blocks too
    rpfs.capture("orig", src, "p")
    copy = rpfs.capture("copy", point_image(mounted, "orig", "p"), "p")
    assert copy["bytes_stored"] == 0
    assert copy["size"] == 16 * MiB
    assert copy["allocated_blocks"] == 256 - 32
    assert_same_bytes(point_image(mounted, "copy", "p"), src)
