"""Packs on an S3 store (issue 13): the daemon's work, checked through the mount against a
real S3 server on loopback (SeaweedFS, tests/s3server.py).

Capture, clone, writes and a live snapshot on an s3 store read back exact; the packs go
to the bucket in the background and the points say so; a cache emptied, or smaller than
the data, still reads every point exact through ranged GETs, and stays within its bound.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from helpers import MiB, assert_check_clean, assert_same_bytes, point_image
from s3helpers import (
    bucket_packs,
    cache_bytes,
    image,
    pwrite_all,
    random_writes,
    status,
    stored_packs,
    wait_uploaded,
)


def test_capture_clone_and_live_snapshot_read_exact_from_the_store(
        rpfs, s3_repo, s3_server, mount, tmp_path):
    repo = s3_repo
    rng = random.Random(13)
    src1, src2 = tmp_path / "v1.raw", tmp_path / "v2.raw"
    image(src1, rng, 24 * MiB)
    shutil.copyfile(src1, src2)
    with open(src2, "r+b") as f:  # an incremental point: a few changed blocks
        for off in (0, 5 * MiB, 20 * MiB + 4096):
            f.seek(off)
            f.write(rng.randbytes(200_000))
    rpfs("capture", "web01", src1, "--name", "p1", check=True)
    rpfs("capture", "web01", src2, "--name", "p2", check=True)
    points = rpfs("points", "web01", check=True).stdout
    assert "pending" in points  # nothing uploaded yet: no daemon runs

    mnt, _ = mount()
    rpfs("clone", "web01@p1", "c1", check=True)
    clone = mnt / "disks" / "c1.img"
    plain = tmp_path / "c1.plain"
    shutil.copyfile(src1, plain)
    pwrite_all(clone, plain, random_writes(rng, 40, within=24 * MiB))
    rpfs("snapshot", "c1", "--name", "s1", check=True)
    s = wait_uploaded(rpfs)
    assert s["stored_packs"] > 0 and s["last_error"] is None, s
    table = rpfs("points", check=True).stdout
    assert "pending" not in table and table.count("in the store") == 3, table

    # what the index says is stored is in the bucket, byte for byte the same size
    assert bucket_packs(s3_server) == stored_packs(repo)
    assert not list((repo / "packs").iterdir())  # nothing left pending locally
    assert_same_bytes(point_image(mnt, "web01", "p1"), src1)
    assert_same_bytes(point_image(mnt, "web01", "p2"), src2)
    assert_same_bytes(point_image(mnt, "c1", "s1"), plain)
    assert_same_bytes(clone, plain)

    # the cache gone (a new host, a wiped disk): every point still reads exact, by GETs
    mount.cleanup()
    shutil.rmtree(repo / "cache")
    mnt, _ = mount()
    assert_same_bytes(point_image(mnt, "web01", "p2"), src2)
    assert_same_bytes(point_image(mnt, "web01", "p1"), src1)
    assert_same_bytes(point_image(mnt, "c1", "s1"), plain)
    after = status(rpfs)
    assert after["gets"] > 0 and after["get_bytes"] >= 20 * MiB, after
    mount.cleanup()
    assert_check_clean(rpfs)


def test_a_cache_smaller_than_the_data_reads_every_point_exact(
        rpfs, repo_dir, s3_server, mount, tmp_path):
    """A 4 MiB cache for 3 points of 40 MiB: each read goes to the store again, reads are
    exact, and the cache never holds more than its bound."""
    rpfs.env.update(s3_server.env())
    rpfs("init", "--store", f"s3://{s3_server.bucket}/repo", "--s3-endpoint",
         s3_server.endpoint, "--cache-size", "4M", check=True)
    rng = random.Random(14)
    sources = []
    for i in range(3):
        src = tmp_path / f"v{i}.raw"
        image(src, rng, 40 * MiB)
        rpfs("capture", "vm", src, "--name", f"p{i}", check=True)
        sources.append(src)
    done = json.loads(rpfs("store", "sync", "--wait", "--json", check=True).stdout)
    assert done["pending_packs"] == 0 and done["packs"] >= 3, done
    assert cache_bytes(repo_dir) <= 4 * MiB
    assert bucket_packs(s3_server) == stored_packs(repo_dir)

    mnt, _ = mount()
    for _ in range(2):  # the second pass finds the first's segments evicted
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # and not in the page cache
        for i, src in enumerate(sources):
            assert_same_bytes(point_image(mnt, "vm", f"p{i}"), src)
            assert cache_bytes(repo_dir) <= 4 * MiB
    s = status(rpfs)
    # each pass went to the store (but for what the daemon's 32 MiB chunk cache kept)
    assert s["get_bytes"] >= 2 * 3 * 30 * MiB - 32 * MiB, s
    assert s["cache_bytes"] <= 4 * MiB
