"""The mount and restore: sizes, live updates, unmounting, restore output, block devices."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import RPFS_CMD
from helpers import (
    BS,
    MiB,
    assert_same_bytes,
    is_fuse_mounted,
    mount_bdi,
    pid_alive,
    point_image,
    read_at,
    wait_pid_exit,
    write_at,
    write_random,
)

from rpfs.capture import capture
from rpfs.errors import RpfsError
from rpfs.repo import Repository


def test_image_size_is_disk_size_even_unaligned(rpfs, mounted, tmp_path):
    sizes = {"aligned": 8 * MiB, "odd": 5 * MiB + 777, "tiny": 1000, "one-block": BS}
    for disk, size in sizes.items():
        src = tmp_path / f"{disk}.img"
        write_random(src, size, seed=size)
        rpfs.capture(disk, src, "p")
    for disk, size in sizes.items():
        src = tmp_path / f"{disk}.img"
        img = point_image(mounted, disk, "p")
        st = img.stat()
        assert st.st_size == size
        assert rpfs.point(disk, "p")["size"] == size
        assert oct(st.st_mode & 0o777) == oct(0o400)  # root only, by default
        assert_same_bytes(img, src)
        # Reads at and past the end: the tail is exact, nothing beyond it.
        assert read_at(img, size - 10, 100) == read_at(src, size - 10, 10)
        assert read_at(img, size, 100) == b""
        assert read_at(img, size + 5 * BS, 100) == b""
    # st_blocks reports the allocated (non-zero) blocks, not the size.
    sparse = tmp_path / "sparse.img"
    subprocess.run(["truncate", "-s", "1G", str(sparse)], check=True)
    write_at(sparse, 512 * MiB, b"x" * 10)
    rpfs.capture("sparse", sparse, "p")
    st = point_image(mounted, "sparse", "p").stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 == BS
    assert_readahead_tuned(mounted, rpfs.repo)


def test_restore_equals_point_and_is_sparse(rpfs, mounted, tmp_path):
    src = tmp_path / "src.img"
    subprocess.run(["truncate", "-s", "256M", str(src)], check=True)
    rng = random.Random(5)
    for off in (0, 17 * MiB + 5, 100 * MiB, 256 * MiB - 3 * BS):
        write_at(src, off, rng.randbytes(2 * BS))
    rpfs.capture("vm", src, "p1")
    out = tmp_path / "restored.img"
    res = rpfs("restore", "vm@p1", out, check=True)
    assert "restored vm@p1" in res.stdout
    assert out.stat().st_size == 256 * MiB
    assert_same_bytes(out, src)
    assert_same_bytes(out, point_image(mounted, "vm", "p1"))
    assert out.stat().st_blocks * 512 <= 16 * BS, out.stat().st_blocks  # ~10 data blocks

    # --force overwrites a non-empty file, and the result is exact again.
    write_at(src, 50 * MiB, rng.randbytes(BS))
    rpfs.capture("vm", src, "p2")
    rpfs("restore", "vm@p2", out, "--force", check=True)
    assert_same_bytes(out, src)
    assert out.stat().st_blocks * 512 <= 18 * BS
    # A dense random point restores exactly too (and an unaligned size).
    dense = tmp_path / "dense.img"
    write_random(dense, 9 * MiB + 123, seed=6)
    rpfs.capture("dense", dense, "p")
    rpfs("restore", "dense@p", tmp_path / "dense-out.img", check=True)
    assert_same_bytes(tmp_path / "dense-out.img", dense)


def test_point_captured_while_mounted_appears_without_remount(rpfs, mounted, tmp_path):
    points = mounted / "points"
    assert list(points.iterdir()) == []
    src = tmp_path / "live.img"
    write_random(src, 4 * MiB, seed=7)
    assert not (points / "live").exists()
    rpfs.capture("live", src, "p1")
    assert [p.name for p in points.iterdir()] == ["live"]
    assert [p.name for p in (points / "live").iterdir()] == ["p1.img"]
    img1 = point_image(mounted, "live", "p1")
    with open(img1, "rb") as held:  # an open image stays valid across new captures
        first = held.read(BS)
        assert not point_image(mounted, "live", "p2").exists()
        write_at(src, 0, os.urandom(BS))
        rpfs.capture("live", src, "p2")
        assert point_image(mounted, "live", "p2").exists()
        assert sorted(p.name for p in (points / "live").iterdir()) == ["p1.img", "p2.img"]
        assert_same_bytes(point_image(mounted, "live", "p2"), src)
        held.seek(0)
        assert held.read(BS) == first
    assert read_at(img1, 0, BS) == first != read_at(src, 0, BS)


def test_umount_unmounts_and_daemon_exits(rpfs, repo, mount, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, MiB, seed=8)
    rpfs.capture("vm", src, "p")
    mnt, res = mount()
    info = json.loads((repo / "locks" / "daemon.lock").read_text())
    pid = info["pid"]
    assert info["mountpoint"] == str(mnt)
    assert f"daemon pid {pid}" in res.stdout
    assert pid_alive(pid)
    assert_same_bytes(point_image(mnt, "vm", "p"), src)

    # Busy: a clear error, and the mount stays up.
    with open(point_image(mnt, "vm", "p"), "rb"):
        busy = rpfs("umount", mnt)
        assert busy.returncode != 0
        assert busy.stderr.startswith("rpfs: error: cannot unmount")
        assert "busy" in busy.stderr
        assert is_fuse_mounted(mnt)
    out = rpfs("umount", mnt, check=True)
    assert "unmounted" in out.stdout
    assert not is_fuse_mounted(mnt)
    assert not os.path.ismount(mnt)
    assert wait_pid_exit(pid, 5), "the daemon is still running after rpfs umount"
    assert "unmounted" in (repo / "rpfs.log").read_text()
    # Unmounted: the directory is an empty directory again; a second umount is an error.
    assert list(mnt.iterdir()) == []
    again = rpfs("umount", mnt)
    assert again.returncode != 0 and "not mounted" in again.stderr
    # And the repository can be mounted again.
    mnt2, _ = mount()
    assert_same_bytes(point_image(mnt2, "vm", "p"), src)


def test_sigterm_to_daemon_unmounts_cleanly(rpfs, repo, mount, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, MiB, seed=9)
    rpfs.capture("vm", src, "p")
    mnt, _ = mount()
    pid = mount.daemon_pid()
    os.kill(pid, 15)
    assert wait_pid_exit(pid, 20)
    deadline = time.monotonic() + 5
    while is_fuse_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_fuse_mounted(mnt)


def test_concurrent_reads_of_several_points(rpfs, mounted, tmp_path):
    # Three points of one disk, each changing a third of the blocks of the previous one.
    rng = random.Random(3)
    data = {0: rng.randbytes(16 * MiB)}
    for i in (1, 2):
        buf = bytearray(data[i - 1])
        for b in range(i, 256, 3):
            buf[b * BS : (b + 1) * BS] = rng.randbytes(BS)
        data[i] = bytes(buf)
    for i in (0, 1, 2):
        path = tmp_path / f"conc-{i}.img"
        path.write_bytes(data[i])
        rpfs.capture("conc", path, f"p{i}")
    errors: list[str] = []

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(150):
                i = r.randrange(3)
                off = r.randrange(16 * MiB - 1)
                n = r.choice([1, 512, 4096, BS, 3 * BS + 7, MiB])
                got = read_at(point_image(mounted, "conc", f"p{i}"), off, n)
                if got != data[i][off : off + n]:
                    errors.append(f"p{i} @{off}+{n}")
        except OSError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    if shutil.which("fio"):
        res = subprocess.run(
            [
                "fio",
                "--name=r",
                f"--filename={point_image(mounted, 'conc', 'p2')}",
                "--rw=randread",
                "--bs=64k",
                "--size=16M",
                "--numjobs=2",
                "--readonly",
                "--ioengine=psync",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        jobs = json.loads(res.stdout)["jobs"]
        assert all(j["error"] == 0 and j["read"]["io_bytes"] == 16 * MiB for j in jobs), jobs


@contextlib.contextmanager
def loop_device(path: Path, read_only: bool) -> Path:
    args = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(path)]
    dev = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_capture_from_and_restore_to_block_devices(rpfs, repo, tmp_path):
    src = tmp_path / "src.img"
    write_random(src, 8 * MiB, seed=10)
    write_at(src, 2 * MiB, bytes(MiB))  # zero blocks: a device gets them written
    with loop_device(src, read_only=True) as dev:
        p = rpfs.capture("blk", dev, "p")
    assert p["size"] == 8 * MiB
    assert p["allocated_blocks"] == 128 - 16
    target = tmp_path / "target.img"
    write_random(target, 8 * MiB, seed=11)  # old content that must be overwritten
    small = tmp_path / "small.img"
    subprocess.run(["truncate", "-s", "4M", str(small)], check=True)
    with loop_device(target, read_only=False) as dev:
        rpfs("restore", "blk@p", dev, check=True)
    assert_same_bytes(target, src)
    with loop_device(small, read_only=False) as dev:
        res = rpfs("restore", "blk@p", dev)
    assert res.returncode != 0 and "the point needs" in res.stderr
    assert small.stat().st_blocks == 0  # nothing was written to the too-small device


def test_default_point_names_do_not_collide(repo, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, BS, seed=11)
    with Repository(repo) as r:
        while time.time() % 1 > 0.3:  # start just after a second boundary
            time.sleep(0.01)
        first = capture(r, "vm", src)
        try:
            second = capture(r, "vm", src)
        except RpfsError as exc:
            pytest.fail(f"second capture without --name failed: {exc} (first: {first.name})")
    assert first.name != second.name


UMOUNT_UNDER_SUBREAPER = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys, time
    cmd, mnt, timeout = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    # Be the subreaper that the daemon is re-parented to, and do not reap it at once:
    # the situation of a container whose PID 1 does not reap orphans promptly.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    subprocess.run(cmd + ["mount", mnt], check=True, capture_output=True)
    start = time.monotonic()
    result = {"elapsed": None}
    try:
        subprocess.run(cmd + ["umount", mnt], check=True, capture_output=True, timeout=timeout)
        result["elapsed"] = time.monotonic() - start
    except subprocess.TimeoutExpired:
        pass
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
    print(json.dumps(result))
    """
)


def test_umount_returns_once_the_daemon_has_exited(rpfs, repo, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "RPFS_REPO": str(repo)}
    res = subprocess.run(
        [sys.executable, "-c", UMOUNT_UNDER_SUBREAPER, json.dumps(RPFS_CMD), str(mnt), "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert not is_fuse_mounted(mnt)
    assert res.returncode == 0, res.stderr
    elapsed = json.loads(res.stdout.strip().splitlines()[-1])["elapsed"]
    assert elapsed is not None, "rpfs umount did not return within 4 s of a clean unmount"


def test_reading_a_missing_point_is_enoent(rpfs, mounted, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, MiB, seed=12)
    rpfs.capture("vm", src, "p")
    for rel in ("points/vm/nope.img", "points/vm/p", "points/nodisk", "other", "points/vm/p.img/x"):
        with pytest.raises(OSError) as err:
            os.stat(mounted / rel)
        assert err.value.errno in (errno.ENOENT, errno.ENOTDIR), rel


@pytest.mark.parametrize("block_size", ["4K", "4M"])
def test_other_block_sizes_round_trip(rpfs, mount, tmp_path, block_size):
    rpfs("init", "--block-size", block_size, check=True)
    bs = {"4K": 4096, "1M": MiB, "4M": 4 * MiB}[block_size]
    src = tmp_path / "src.img"
    size = 9 * MiB + 4097  # not a multiple of any block size
    subprocess.run(["truncate", "-s", str(size), str(src)], check=True)
    rng = random.Random(bs)
    for off in (0, 3 * MiB - 5, 8 * MiB + 100):
        write_at(src, off, rng.randbytes(300_000))
    at_p1 = tmp_path / "at-p1.img"
    at_p1.write_bytes(src.read_bytes())
    p1 = rpfs.capture("vm", src, "p1")
    assert p1["block_size"] == bs
    write_at(src, 5 * MiB, rng.randbytes(10))
    p2 = rpfs.capture("vm", src, "p2")
    assert p2["blocks_written"] == 1
    mnt, _ = mount()
    assert point_image(mnt, "vm", "p1").stat().st_size == size
    assert_same_bytes(point_image(mnt, "vm", "p1"), at_p1)
    assert_same_bytes(point_image(mnt, "vm", "p2"), src)
    rpfs("restore", "vm@p1", tmp_path / "out.img", check=True)
    assert_same_bytes(tmp_path / "out.img", at_p1)


def test_mount_point_with_a_space_gets_readahead_tuned(rpfs, repo, mount, tmp_path):
    src = tmp_path / "s.img"
    write_random(src, 4 * MiB, seed=14)
    rpfs.capture("vm", src, "p")
    mnt, _ = mount(tmp_path / "mount point")
    assert is_fuse_mounted(mnt)
    assert_same_bytes(point_image(mnt, "vm", "p"), src)  # serving works with a space
    assert_readahead_tuned(mnt, repo)


def assert_readahead_tuned(mnt: Path, repo: Path) -> None:
    """The daemon raises its mount's readahead to 1 MiB (sequential reads come in 1 MiB)."""
    dev = mount_bdi(mnt)
    assert dev is not None
    assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "1024"
    assert "cannot set" not in (repo / "rpfs.log").read_text()
