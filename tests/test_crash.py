"""A capture killed with SIGKILL midway leaves the repository consistent."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import (
    BS,
    RAW_RECORD,
    MiB,
    assert_check_clean,
    assert_same_bytes,
    point_image,
    sparse_copy,
    write_at,
    write_random,
)

from rpfs.repo import Repository

BIG = 512 * MiB


def pack_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "packs").glob("*.pack"))


def test_sigkill_midway_leaves_repository_consistent(rpfs, mounted, tmp_path):
    # Earlier points that must survive: one of another disk, and the first point of the
    # disk whose next capture is killed (its first 8 MiB of data, the rest a hole).
    small = tmp_path / "small.img"
    write_random(small, 8 * MiB, seed=1)
    rpfs.capture("small", small, "p1")
    big = tmp_path / "big.img"
    subprocess.run(["truncate", "-s", str(BIG), str(big)], check=True)
    write_at(big, 0, random.Random(2).randbytes(8 * MiB))
    at_p1 = tmp_path / "big-at-p1.img"
    sparse_copy(big, at_p1)
    rpfs.capture("big", big, "p1")
    points_before = rpfs.points()

    # Fill the rest with incompressible data (os.urandom: fast), then capture and kill.
    with open(big, "r+b") as f:
        f.seek(8 * MiB)
        for _ in range((BIG - 8 * MiB) // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    base = pack_bytes(rpfs.repo)
    proc = rpfs.popen(
        "capture",
        "big",
        big,
        "--name",
        "killed",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Past the first index flush (64 MiB of pack bytes), well before the end.
        deadline = time.monotonic() + 60
        while pack_bytes(rpfs.repo) - base < 100 * MiB and time.monotonic() < deadline:
            assert proc.poll() is None, "the capture finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    grown = pack_bytes(rpfs.repo) - base
    assert 100 * MiB <= grown < BIG - 64 * MiB, grown

    # No new point, nothing else changed.
    assert rpfs.points() == points_before
    assert not (mounted / "points" / "big" / "killed.img").exists()
    with Repository(rpfs.repo) as repo, repo.index.read() as txn:
        dead = repo.index.list_captures(txn)
    assert [info["pid"] for _, info in dead] == [proc.pid]  # the dead capture's record

    # Earlier points are still exact through the mount.
    assert_same_bytes(point_image(mounted, "big", "p1"), at_p1)
    assert_same_bytes(point_image(mounted, "small", "p1"), small)

    # The next capture succeeds, is exact, and the name of the killed one is free.
    write_at(big, 5 * BS, os.urandom(BS))
    p2 = rpfs.capture("big", big, "killed")
    assert p2["method"] == "incremental"
    assert p2["size"] == BIG
    changed = BIG // BS - 8 * MiB // BS + 1
    assert p2["blocks_written"] == changed
    # Chunks the killed capture made durable (its first 64 MiB flush at least) are reused.
    assert p2["bytes_stored"] <= (changed - 1024) * RAW_RECORD
    assert_same_bytes(point_image(mounted, "big", "killed"), big)
    assert_same_bytes(point_image(mounted, "big", "p1"), at_p1)
    assert_same_bytes(point_image(mounted, "small", "p1"), small)
    assert [p["name"] for p in rpfs.points("big")] == ["p1", "killed"]
    report = assert_check_clean(rpfs)
    assert report["reclaimable"], "the killed capture's records are reclaimable"


DEAD_CAPTURE = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from rpfs.repo import Repository

    repo = Repository(Path(sys.argv[1]))
    with repo.disk_lock(sys.argv[2]):
        with repo.index.write() as txn:
            cid = repo.index.next_id(txn, "capture")
            repo.index.put_capture(
                txn, cid, {"disk": sys.argv[2], "pid": os.getpid(), "started": time.time()}
            )
            for block in range(10):
                repo.index.stage(txn, cid, block, b"")
        os.kill(os.getpid(), signal.SIGKILL)  # dies as a capture would, after a flush
    """
)


def _leave_dead_capture(repo: Path, disk: str) -> None:
    res = subprocess.run([sys.executable, "-c", DEAD_CAPTURE, str(repo), disk])
    assert res.returncode == -signal.SIGKILL


def _captures(repo: Path) -> list[dict]:
    with Repository(repo) as r, r.index.read() as txn:
        return [info for _, info in r.index.list_captures(txn)]


def _staged_rows(repo: Path) -> int:
    with Repository(repo) as r, r.index.read() as txn:
        return sum(1 for _ in txn.cursor(db=r.index.db["staging"]))


def test_dead_capture_of_another_disk_is_reaped(rpfs, repo, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, MiB, seed=2)
    _leave_dead_capture(repo, "gone")
    assert len(_captures(repo)) == 1
    res = rpfs("capture", "other", src, "--name", "p", check=True)
    assert "dropping capture" in res.stderr
    assert _captures(repo) == []
    assert _staged_rows(repo) == 0


def test_dead_capture_is_reaped_by_the_next_capture_of_the_same_disk(rpfs, repo, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, MiB, seed=3)
    rpfs.capture("vm", src, "p1")
    _leave_dead_capture(repo, "vm")
    assert len(_captures(repo)) == 1
    rpfs.capture("vm", src, "p2")
    assert _captures(repo) == [], "the dead capture's record and staging rows were kept"
    assert _staged_rows(repo) == 0
    assert json.loads(rpfs("points", "--json", check=True).stdout)[-1]["name"] == "p2"


def test_concurrent_captures(rpfs, mounted, tmp_path):
    """Two captures of one disk at once: the second is refused (disk busy) and nothing is
    lost; a capture of another disk meanwhile succeeds. All points are exact."""
    big = tmp_path / "big.img"
    write_random(big, 128 * MiB)
    other = tmp_path / "other.img"
    write_random(other, 8 * MiB, seed=4)
    base = pack_bytes(rpfs.repo)
    proc = rpfs.popen(
        "capture", "big", big, "--name", "p1", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while pack_bytes(rpfs.repo) - base < 16 * MiB and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.005)
        # Hold the first capture still (it keeps its disk lock) while the second tries.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            busy = rpfs("capture", "big", big, "--name", "p2", timeout=60)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert proc.poll() is None
        rpfs("capture", "other", other, "--name", "p1", check=True)
    finally:
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert busy.returncode != 0
    assert busy.stderr.strip().splitlines() == [busy.stderr.strip()]
    assert busy.stderr.startswith("rpfs: error: disk big is busy")
    assert [p["name"] for p in rpfs.points("big")] == ["p1"]
    assert_same_bytes(point_image(mounted, "big", "p1"), big)
    assert_same_bytes(point_image(mounted, "other", "p1"), other)
    # Once the first has finished, the same capture goes through.
    assert rpfs.capture("big", big, "p2")["blocks_written"] == 0
