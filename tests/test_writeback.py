"""`rpfs mount --writeback`: the kernel caches buffered writes to disk images.

What changes for the user, checked through the mount: a point holds every write whose
`write()` returned before the snapshot, fsynced or not (the daemon flushes the mount
first); a write past a disk's end is taken by the kernel and refused at fsync and close
(ENOSPC), the part within the disk kept and the image's size set back; O_DIRECT writes
are not cached (without an fsync, they survive a SIGKILL of the daemon once it has
persisted the disk's block map, as in write-through mode). The point-under-
writes and SIGKILL tests of test_points_live.py run in this mode too.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BS, MiB, point_image, wait_pid_exit

from rpfs.serve.daemon import SYNC_INTERVAL

SIZE = 64 * MiB
UNTOUCHED = 32 * MiB  # the write from a malloc'ed buffer never touched (issue 16)


def untouched_buffer(size: int) -> memoryview:
    """`size` bytes never touched, 16 bytes into a fresh anonymous mapping (where glibc's
    malloc puts a large buffer): in write-through mode a write from them reaches the
    daemon in page-sized pieces. Not malloc itself: in a long-lived process (the whole
    suite) malloc may serve 32 MiB from its heap, whose pages hold old data."""
    mapping = mmap.mmap(-1, size + mmap.PAGESIZE)
    return memoryview(mapping)[16 : 16 + size]


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    """`got == want`, or a one-line failure naming the first differing offset (pytest's
    own diff of two 64 MiB strings takes minutes)."""
    if got == want:
        return
    at = next((i for i in range(0, min(len(got), len(want)), 4096)
               if got[i : i + 4096] != want[i : i + 4096]), min(len(got), len(want)))
    raise AssertionError(f"{what}: {len(got)} bytes against {len(want)}, first difference "
                         f"in the 4 KiB at {at}")


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def image(mnt: Path, disk: str) -> Path:
    return mnt / "disks" / f"{disk}.img"


# Writes 4 KiB pieces (argv: image, pieces file, offsets), says so, and keeps the image
# open until its stdin closes: its pages stay dirty. Its own process, because any close of
# a copy of the fd (a forked child's, as subprocess makes) flushes them.
HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
pieces = open(sys.argv[2], "rb").read()
for i, offset in enumerate(map(int, sys.argv[3:])):
    os.pwrite(fd, pieces[i * 4096 : (i + 1) * 4096], offset)
print("written", flush=True)
sys.stdin.read()
"""


def test_a_point_holds_the_writes_the_kernel_cached(rpfs, repo, mount, tmp_path):
    mnt, _ = mount(None, "--writeback")
    rpfs("disk", "create", "d", "--size", str(SIZE), check=True)
    model = bytearray(os.urandom(SIZE))
    fd = os.open(image(mnt, "d"), os.O_RDWR)
    try:
        assert os.pwrite(fd, model, 0) == SIZE
        untouched = untouched_buffer(UNTOUCHED)
        assert os.pwrite(fd, untouched, 20 * MiB + 16) == UNTOUCHED
        model[20 * MiB + 16 : 20 * MiB + 16 + UNTOUCHED] = untouched  # zeros
        os.fsync(fd)
    finally:
        os.close(fd)
    # Not fsynced, and the image stays open: in the kernel's pages only. Kept small: the
    # kernel writes a FUSE mount's dirty pages back early beyond a few MiB.
    offsets = [5 * BS + 123, 20 * MiB, 40 * MiB - 2, SIZE - 4096]
    pieces = os.urandom(4096 * len(offsets))
    (tmp_path / "pieces").write_bytes(pieces)
    for i, offset in enumerate(offsets):
        model[offset : offset + 4096] = pieces[i * 4096 : (i + 1) * 4096]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, image(mnt, "d"), tmp_path / "pieces", *map(str, offsets)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "written\n"
        rpfs("snapshot", "d", "--name", "s1", check=True)
        assert_bytes(point_image(mnt, "d", "s1").read_bytes(), model, "the point")
        assert_bytes(image(mnt, "d").read_bytes(), model, "the disk")
    finally:
        holder.stdin.close()
        holder.wait(30)
    rpfs("umount", mnt, check=True)
    mnt, _ = mount()  # write-through: what the disk and the point hold on their own
    assert_bytes(image(mnt, "d").read_bytes(), model, "the disk after a remount")
    assert_bytes(point_image(mnt, "d", "s1").read_bytes(), model, "the point after a remount")


def test_a_cached_write_past_the_end_is_refused_at_fsync(rpfs, repo, mount):
    mnt, _ = mount(None, "--writeback")
    rpfs("disk", "create", "d", "--size", str(SIZE), check=True)
    path = image(mnt, "d")
    model = bytearray(SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in ((SIZE, 4096), (SIZE + 3 * BS, 5000), (SIZE - 100, 5000)):
            data = os.urandom(length)
            assert os.pwrite(fd, data, offset) == length  # the kernel took it
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.ENOSPC
            model[offset : offset + length] = data[: max(0, SIZE - offset)]
            wait_for(lambda: os.fstat(fd).st_size == SIZE, 10, "the image's size set back")
            assert os.pread(fd, 4096, SIZE) == b""  # nothing past the end
            assert os.pread(fd, 4096, SIZE - 4096) == model[-4096:]
        os.fsync(fd)  # the error was reported once
    finally:
        os.close(fd)
    # Without an fsync, close reports it.
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"x" * 10, SIZE + 1)
    with pytest.raises(OSError) as exc:
        os.close(fd)
    assert exc.value.errno == errno.ENOSPC
    wait_for(lambda: path.stat().st_size == SIZE, 10, "the image's size set back")
    assert_bytes(path.read_bytes(), model, "the disk")
    rpfs("umount", mnt, check=True)
    mnt, _ = mount()
    assert image(mnt, "d").stat().st_size == SIZE
    assert_bytes(image(mnt, "d").read_bytes(), model, "the disk after a remount")
    assert "reaches past its end" in (repo / "rpfs.log").read_text()


def test_direct_writes_are_not_cached(rpfs, repo, mount):
    mnt, _ = mount(None, "--writeback")
    rpfs("disk", "create", "d", "--size", str(SIZE), check=True)
    data = os.urandom(MiB)
    aligned = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    aligned[:] = data
    fd = os.open(image(mnt, "d"), os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, aligned, 7 * MiB) == MiB  # no fsync
        with pytest.raises(OSError) as exc:  # past the end: refused at once
            os.pwrite(fd, aligned, SIZE)
        assert exc.value.errno == errno.ENOSPC
        # Unsynced writes the daemon has are kept once it persists the disk's block map.
        time.sleep(2 * SYNC_INTERVAL)
        pid = mount.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_exit(pid, 20), f"daemon {pid} survived SIGKILL"
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the daemon is gone
            os.close(fd)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=True)
    mnt, _ = mount()
    assert image(mnt, "d").stat().st_size == SIZE
    with open(image(mnt, "d"), "rb") as f:
        f.seek(7 * MiB)
        assert f.read(MiB) == data
