"""Deleting points while the mount uses them, with real files through the daemon: a point
image held open reads its old bytes to the end through a purge (its name is gone at
once, its extents go at its close, also across a daemon's SIGKILL), and `point delete
--wait` waits for a point still being archived.

Every point's data here is its own (each capture rewrites every block), so an extent
released too early reads as zeros or the next point's bytes, never by luck as the same.
Reads use O_DIRECT: what the daemon serves, not the kernel's cache of the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    is_fuse_mounted,
    point_image,
    wait_pid_exit,
    write_at,
    write_random,
)

from rpfs.lifecycle.purge import refcount_errors
from rpfs.repo import Repository

MiB = 1 << 20
SIZE = 2 * MiB
ON_CLOSE = "purged when its image open in the mount closes"
FAULTS = Path(__file__).parent / "faults"  # sitecustomize.py: RPFS_TEST_PACK_GATE


class Reader:
    """An open point image of the mount, read with O_DIRECT a piece at a time."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, MiB)
        self.data = bytearray()

    def read(self, upto: int) -> None:
        """Read on until `upto` bytes (or the end) are read."""
        while len(self.data) < upto and (n := os.preadv(self.fd, [self.buf], len(self.data))):
            self.data += self.buf[:n]

    def close(self) -> None:
        """Close it (the fd goes even if the close fails: ENOTCONN on a dead mount)."""
        try:
            os.close(self.fd)
        finally:
            self.buf.close()


def capture_points(rpfs, tmp_path: Path, names: list[str]) -> dict[str, str]:
    """Full captures of disk d, each rewriting every block; their sha256 by name."""
    source = tmp_path / "source.img"
    sums = {}
    for seed, name in enumerate(names):
        write_random(source, SIZE, seed=100 + seed)
        rpfs.capture("d", source, name)
        sums[name] = hashlib.sha256(source.read_bytes()).hexdigest()
    return sums


def image_sum(mnt: Path, name: str) -> str:
    reader = Reader(point_image(mnt, "d", name))
    try:
        reader.read(SIZE + 1)
        return hashlib.sha256(reader.data).hexdigest()
    finally:
        reader.close()


def live_bytes(repo: Path) -> int:
    with Repository(repo) as opened, opened.index.read() as txn:
        return opened.index.live_stored_bytes(txn)


def trash(rpfs) -> list[dict]:
    return json.loads(rpfs("trash", "--json", check=True).stdout)


def wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["delete --purge", "trash purge"])
def test_an_open_image_reads_on_through_a_purge(rpfs, repo, mounted, tmp_path, how):
    sums = capture_points(rpfs, tmp_path, ["p1", "p2"])
    owned = rpfs.point_record("d", "p1")["owned_bytes"]
    assert owned > 0, "p1's data is its own: its purge must free something"
    before = live_bytes(repo)
    reader = Reader(point_image(mounted, "d", "p1"))
    try:
        reader.read(SIZE // 2)
        if how == "delete --purge":
            done = rpfs("point", "delete", "--purge", "d@p1", check=True).stdout
            assert done == f"d@p1: deleted; {ON_CLOSE}\n"
        else:
            rpfs("point", "delete", "d@p1", check=True)
            assert rpfs("trash", "purge", check=True).stdout == f"d@p1: {ON_CLOSE}\n"
        assert os.listdir(mounted / "points" / "d") == ["p2.img"], "the name is gone at once"
        assert [(p["name"], p["purge_on_close"]) for p in trash(rpfs)] == [("p1", True)]
        assert "when its open image closes" in rpfs("trash", check=True).stdout
        assert_one_line_error(rpfs("undelete", "d@p1"), "d@p1 is being purged")
        assert live_bytes(repo) == before, "released while the image is open"
        reader.read(SIZE + 1)
    finally:
        reader.close()
    assert len(reader.data) == SIZE
    assert hashlib.sha256(reader.data).hexdigest() == sums["p1"]
    wait_until(lambda: trash(rpfs) == [], "the purge at the image's close")
    assert before - live_bytes(repo) == owned
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []
    assert image_sum(mounted, "p2") == sums["p2"]
    assert [p["name"] for p in rpfs.points("d")] == ["p2"]


def test_a_purge_on_close_survives_a_daemon_sigkill(rpfs, repo, mount, tmp_path):
    """Images open across a SIGKILL leave their points marked purge_on_close; `rpfs trash
    purge` without a daemon completes one, the next mount's start the other."""
    sums = capture_points(rpfs, tmp_path, ["p1", "p2", "p3"])
    mnt, _ = mount()
    readers = [Reader(point_image(mnt, "d", name)) for name in ("p1", "p2")]
    try:
        for reader in readers:
            reader.read(MiB)
        rpfs("point", "delete", "--purge", "d@p1", "d@p2", check=True)
        pid = mount.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_exit(pid, 20), f"daemon {pid} survived SIGKILL"
    finally:
        for reader in readers:
            with contextlib.suppress(OSError):  # ENOTCONN: nothing hears it
                reader.close()
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    wait_until(lambda: not is_fuse_mounted(mnt), "the dead mount to go")
    assert [(p["name"], p["purge_on_close"]) for p in trash(rpfs)] == [
        ("p1", True), ("p2", True)]
    assert rpfs("trash", "purge", "d@p1", check=True).stdout == "d@p1: purged\n"
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []
    mount(mnt)
    wait_until(lambda: trash(rpfs) == [], "the daemon's start to purge d@p2")
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []
    assert os.listdir(mnt / "points" / "d") == ["p3.img"]
    assert image_sum(mnt, "p3") == sums["p3"]


@pytest.fixture
def gated(rpfs, repo, mount, tmp_path):
    """A mount whose daemon's pack writes wait while the returned gate file exists."""
    gate = tmp_path / "pack-gate"
    rpfs.env.update(PYTHONPATH=f"{FAULTS}:{os.environ.get('PYTHONPATH', '')}",
                    RPFS_TEST_PACK_GATE=str(gate))
    mnt, _ = mount()
    rpfs("disk", "create", "d", "--size", str(SIZE), check=True)
    write_at(mnt / "disks" / "d.img", 0, os.urandom(SIZE))
    yield mnt, gate
    gate.unlink(missing_ok=True)  # a failed test must not leave the unmount waiting on it


def state(rpfs, name: str) -> str:
    return rpfs.point("d", name)["state"]


def test_delete_waits_for_the_archive_with_wait(rpfs, gated):
    _, gate = gated
    gate.touch()
    rpfs("snapshot", "d", "--name", "p1", check=True)
    assert state(rpfs, "p1") == "archiving"
    refused = rpfs("point", "delete", "d@p1")
    assert_one_line_error(refused, "d@p1 is still being archived", "--wait")
    assert [p["name"] for p in rpfs.points("d")] == ["p1"] and trash(rpfs) == []
    waiting = rpfs.popen("point", "delete", "--wait", "d@p1", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert waiting.poll() is None, "delete --wait did not wait for the archive"
        assert state(rpfs, "p1") == "archiving"
        gate.unlink()
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert out == "d@p1: moved to the trash ('rpfs undelete' brings it back)\n"
    assert rpfs.points("d") == []
    [held] = trash(rpfs)
    assert (held["name"], held["purge_on_close"]) == ("p1", False)
    rpfs("undelete", "d@p1", check=True)
    assert state(rpfs, "p1") == "complete"


def test_delete_wait_on_a_stalled_archive_says_so(rpfs, gated):
    """A full disk stalls the archive: --wait is an error naming the stall, not a hang."""
    _, gate = gated
    gate.write_text("ENOSPC")
    rpfs("snapshot", "d", "--name", "p1", check=True)
    res = rpfs("point", "delete", "--wait", "d@p1", timeout=60)
    assert_one_line_error(res, "archiving of its newest point is stalled", "no space")
    assert [p["name"] for p in rpfs.points("d")] == ["p1"] and trash(rpfs) == []
    gate.unlink()  # space is back: the archive resumes at its next try (1 s, 2 s, ...)
    wait_until(lambda: state(rpfs, "p1") == "complete", "the archive to resume")
    rpfs("point", "delete", "--wait", "d@p1", check=True)
    assert rpfs.points("d") == []


def test_delete_wait_without_a_daemon_says_to_mount(rpfs, repo, gated, mount):
    """A point left archiving (here: the daemon killed while its archive waits) has no
    archiver without a daemon: --wait refuses at once, saying to mount."""
    mnt, gate = gated
    gate.touch()
    rpfs("snapshot", "d", "--name", "p1", check=True)
    pid = mount.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_pid_exit(pid, 20)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    wait_until(lambda: not is_fuse_mounted(mnt), "the dead mount to go")
    res = rpfs("point", "delete", "--wait", "d@p1", timeout=60)
    assert_one_line_error(res, "still being archived", "rpfs mount")
    gate.unlink()
    mount(mnt)
    rpfs("point", "delete", "--wait", "d@p1", check=True)
    assert rpfs.points("d") == []
