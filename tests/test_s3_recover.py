"""Disaster recovery from the S3 store (issue 13): the repository's host is lost, and
`rpfs init --from-store` in a fresh folder brings back every point whose packs were in the
store at the newest index checkpoint, bit-exact, with its writable disks as of their
newest stored point (or empty), each named in the command's output; `check` is clean.

The packs of the points that must be lost (pending when the host died) are made so by
deleting them from the bucket after the checkpoint that names them was pushed: the index
says "stored", only the store's LIST knows better.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

from helpers import (
    MiB,
    assert_check_clean,
    assert_one_line_error,
    assert_same_bytes,
    point_image,
    unread_extents,
    wait_pid_exit,
)
from s3helpers import bucket_packs, image, pwrite_all, random_writes

from rpfs.index import Index

SIZE = 8 * MiB


def sync_until_stored(rpfs, refs: set[str], timeout: float = 60) -> dict:
    """`store sync` until every point of `refs` is complete with all its data in the
    store (a live snapshot archives in the background first); the last sync's summary,
    which pushed an index checkpoint that names them."""
    deadline = time.monotonic() + timeout
    while True:
        done = json.loads(rpfs("store", "sync", "--wait", "--json", check=True).stdout)
        points = {f"{p['disk']}@{p['name']}": p for p in rpfs.points()}
        if all(points[r]["state"] == "complete" and points[r]["pending_bytes"] == 0
               for r in refs):
            assert done["pending_packs"] == 0 and done["checkpoint_error"] is None, done
            return done
        assert time.monotonic() < deadline, f"not stored after {timeout} s: {points}"
        time.sleep(0.5)


def test_recovery_from_the_store_reads_every_stored_point_exact(
        rpfs, s3_repo, s3_server, mount, tmp_path):
    rng = random.Random(1313)
    src1, src2, src3 = (tmp_path / f"v{i}.raw" for i in (1, 2, 3))
    image(src1, rng, SIZE)
    shutil.copyfile(src1, src2)
    pwrite_all(src2, None, random_writes(rng, 3, 200_000))  # p2: an incremental point
    rpfs("capture", "web01", src1, "--name", "p1", check=True)
    rpfs("capture", "web01", src2, "--name", "p2", check=True)

    mnt, _ = mount()
    rpfs("clone", "web01@p1", "c1", check=True)
    rpfs("disk", "create", "blank", "--size", str(SIZE), check=True)
    clone, at_s1 = mnt / "disks" / "c1.img", tmp_path / "c1-s1.raw"
    shutil.copyfile(src1, at_s1)
    pwrite_all(clone, at_s1, random_writes(rng, 20))
    rpfs("snapshot", "c1", "--name", "s1", check=True)
    pwrite_all(mnt / "disks" / "blank.img", None, random_writes(rng, 5))  # never a point
    first = sync_until_stored(rpfs, {"web01@p1", "web01@p2", "c1@s1"})
    assert first["checkpoint"], first
    kept = set(bucket_packs(s3_server))

    # After that: writes to the clone never snapshotted (lost with the local file), and
    # a snapshot and a capture whose packs were pending when the host died.
    pwrite_all(clone, None, random_writes(rng, 20))
    rpfs("snapshot", "c1", "--name", "s2", check=True)
    shutil.copyfile(src2, src3)
    pwrite_all(src3, None, random_writes(rng, 3, 200_000))
    rpfs("capture", "web01", src3, "--name", "p3", check=True)
    rpfs("config", "set", "trash-days", "3", check=True)  # after init: the push carries it
    last = sync_until_stored(rpfs, {"c1@s2", "web01@p3"})
    assert last["checkpoint"] > first["checkpoint"], (first, last)
    daemon = mount.daemon_pid()
    os.kill(daemon, signal.SIGKILL)  # the host is lost: no orderly stop, no last push
    assert wait_pid_exit(daemon, 10)
    mount.cleanup()
    pending = set(bucket_packs(s3_server)) - kept
    assert pending, "s2 and p3 wrote no pack of their own"
    client = s3_server.client()
    for name in pending:
        client.delete_object(Bucket=s3_server.bucket, Key=f"repo/{name}")

    shutil.rmtree(s3_repo)
    rpfs.repo = tmp_path / "recovered"
    res = rpfs("init", "--from-store", f"s3://{s3_server.bucket}/repo", "--s3-endpoint",
               s3_server.endpoint, check=True)
    out = res.stdout
    assert f"checkpoint {last['checkpoint'][len('index/'):]}" in out, out
    assert "disk c1: as of its point c1@s1 (newer writes were lost)" in out, out
    assert "disk blank: empty" in out, out
    assert "lost (their data was not in the store yet): c1@s2, web01@p3" in out, out

    config = json.loads(rpfs("config", "show", "--json", check=True).stdout)
    assert config["trash_days"] == 3, config
    points = {f"{p['disk']}@{p['name']}" for p in rpfs.points()}
    assert points == {"web01@p1", "web01@p2", "c1@s1"}, points
    mnt, _ = mount()
    assert_same_bytes(point_image(mnt, "web01", "p1"), src1)
    assert_same_bytes(point_image(mnt, "web01", "p2"), src2)
    assert_same_bytes(point_image(mnt, "c1", "s1"), at_s1)
    assert_same_bytes(clone, at_s1)
    zeros = tmp_path / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(SIZE)
    assert_same_bytes(mnt / "disks" / "blank.img", zeros)
    # the recovered clone is writable, and its next point is exact
    pwrite_all(clone, at_s1, random_writes(rng, 5))
    rpfs("snapshot", "c1", "--name", "s3", check=True)
    assert_same_bytes(point_image(mnt, "c1", "s3"), at_s1)
    sync_until_stored(rpfs, {"c1@s3"})
    mount.cleanup()
    assert_check_clean(rpfs)
    index = Index(rpfs.repo / "index")
    try:
        assert unread_extents(index) == []
    finally:
        index.close()


def test_recovery_refuses_a_folder_in_use_and_a_prefix_without_a_repository(
        rpfs, s3_repo, s3_server, tmp_path):
    url = f"s3://{s3_server.bucket}/repo"
    endpoint = ("--s3-endpoint", s3_server.endpoint)
    res = rpfs("init", "--from-store", url, *endpoint)  # the repository's own folder
    assert_one_line_error(res, "is not an empty directory")
    rpfs.repo = tmp_path / "elsewhere"
    res = rpfs("init", "--from-store", f"s3://{s3_server.bucket}/nothing-here", *endpoint)
    assert_one_line_error(res, "holds no rpfs repository")
    assert not rpfs.repo.exists()
    res = rpfs("init", "--from-store", url, *endpoint)  # nothing uploaded yet
    assert_one_line_error(res, "holds no index checkpoint")
    assert not rpfs.repo.exists()


def test_a_lost_newest_capture_cuts_its_disk_back_and_empties_a_clone_of_it(
        rpfs, s3_repo, s3_server, tmp_path):
    """No daemon: `store sync` pushes the checkpoint itself. p2's packs never reach the
    store: p2 is lost, and so is the point of its clone, which comes back empty (its
    origin is lost too); web01's next capture starts from p1 again and reads exact."""
    rng = random.Random(1314)
    src1, src2 = tmp_path / "v1.raw", tmp_path / "v2.raw"
    image(src1, rng, SIZE)
    shutil.copyfile(src1, src2)
    pwrite_all(src2, None, random_writes(rng, 4, 200_000))
    rpfs("capture", "web01", src1, "--name", "p1", check=True)
    sync_until_stored(rpfs, {"web01@p1"})
    kept = set(bucket_packs(s3_server))
    rpfs("capture", "web01", src2, "--name", "p2", check=True)
    rpfs("clone", "web01@p2", "c2", check=True)
    rpfs("snapshot", "c2", "--name", "s1", check=True)
    last = sync_until_stored(rpfs, {"web01@p2", "c2@s1"})
    assert last["checkpoint"], last
    for name in set(bucket_packs(s3_server)) - kept:
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"repo/{name}")

    shutil.rmtree(s3_repo)
    rpfs.repo = tmp_path / "recovered"
    out = rpfs("init", "--from-store", f"s3://{s3_server.bucket}/repo", "--s3-endpoint",
               s3_server.endpoint, check=True).stdout
    assert "disk c2: empty" in out, out
    assert "lost (their data was not in the store yet): c2@s1, web01@p2" in out, out
    assert_check_clean(rpfs)
    rpfs("capture", "web01", src2, "--name", "p2", check=True)  # the name is free again
    points = {p["name"]: p for p in rpfs.points("web01")}
    assert set(points) == {"p1", "p2"} and points["p2"]["method"] == "incremental", points
    restored = tmp_path / "p2.out"
    for name, src in (("p1", src1), ("p2", src2)):
        rpfs("restore", f"web01@{name}", restored, "--force", check=True)
        assert_same_bytes(restored, src)
    assert_check_clean(rpfs)
