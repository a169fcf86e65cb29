"""Writable disks: clone, disk create/delete, disks, hydrate, and the read-write images
MOUNT/disks/<name>.img, checked byte for byte through the real mount with real tools
(loop mount + e2fsck, cmp, fio, qemu-io, dd), through the daemon's control socket and
directly on the repository, including a SIGKILL of the daemon mid-write.

Run as a script, this file is the crash test's writer: `python test_disks.py writer ...`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    BS,
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    disks_by_name,
    e2fsck_clean,
    fio_errors,
    is_fuse_mounted,
    local_files,
    loop_mount,
    point_image,
    sparse_copy,
    tree_checksums,
    wait_pid_exit,
)

GiB = 1 << 30
HERE = Path(__file__).resolve()


# -- sources and comparisons ----------------------------------------------------------------


def make_source(path: Path, size: int, seed: int) -> bytearray:
    """A seeded source image: runs of random data, compressible text and holes whose
    boundaries are mostly not block aligned. Returns its bytes (the reference)."""
    rng = random.Random(seed)
    data = bytearray(size)
    runs = []
    pos = 0
    while pos < size:
        n = min(rng.choice([BS, 2 * BS, 50_000, 3 * BS + 1234, 7777]), size - pos)
        kind = rng.random()
        if kind < 0.6:
            data[pos : pos + n] = rng.randbytes(n)
            runs.append((pos, n))
        elif kind < 0.75:
            text = f"block at {pos} of seed {seed}\n".encode() * (n // 20 + 1)
            data[pos : pos + n] = text[:n]
            runs.append((pos, n))
        pos += n  # else: a hole
    with open(path, "wb") as f:
        f.truncate(size)
        for start, n in runs:
            f.seek(start)
            f.write(data[start : start + n])
    return data


def captured_source(rpfs, tmp_path: Path, disk: str, size: int, seed: int, point: str = "p1"):
    """Capture a fresh seeded source as DISK@POINT; returns (source file, its bytes)."""
    src = tmp_path / f"{disk}-src.img"
    ref = make_source(src, size, seed)
    rpfs.capture(disk, src, point)
    return src, ref


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for start in range(0, len(a), MiB):
        if a[start : start + MiB] != b[start : start + MiB]:
            for i in range(start, min(start + MiB, len(a))):
                if a[i] != b[i]:
                    return f"first difference at byte {i} (block {i // BS})"
    return "identical"


def remount(rpfs, mount, mnt: Path) -> None:
    rpfs("umount", mnt, check=True)
    assert not is_fuse_mounted(mnt)
    mount(mnt)


class Disks:
    """The writable images of a mount."""

    def __init__(self, repo: Path, mnt: Path) -> None:
        self.repo = repo
        self.mnt = mnt

    def __call__(self, name: str) -> Path:
        return self.mnt / "disks" / f"{name}.img"

    @contextlib.contextmanager
    def fd(self, name: str, flags: int = os.O_RDWR) -> Iterator[int]:
        fd = os.open(self(name), flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        return read_file(self(name))

    def write(self, name: str, offset: int, data: bytes) -> None:
        with self.fd(name) as fd:
            assert pwrite_all(fd, data, offset) == len(data)

    def assert_is(self, name: str, expected: bytes | bytearray) -> None:
        actual = self.read(name)
        assert actual == expected, f"disk {name}: {first_difference(actual, bytes(expected))}"

    def assert_same(self, name: str, plain: Path) -> None:
        """`cmp` of the image and a plain file."""
        assert_same_bytes(self(name), plain)

    def run(self, name: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """A tool that opens the image (fio, qemu-io, dd, e2fsck, truncate)."""
        return subprocess.run(cmd, capture_output=True, text=True, **kw)


def make_disks(repo: Path, mnt: Path) -> Disks:
    return Disks(repo, mnt)


# -- I/O patterns -------------------------------------------------------------------------

# Write sizes around every interesting boundary: sectors, pages, the 64 KiB block, the
# kernel's 128 KiB FUSE request size and beyond.
WRITE_SIZES = [
    1,
    2,
    511,
    512,
    4095,
    4096,
    4097,
    BS - 1,
    BS,
    BS + 1,
    2 * BS + 3,
    100_000,
    131_072,
    300_001,
    MiB + 7,
]


def random_writes(rng: random.Random, size: int, count: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data): unaligned, block-straddling, near the end and across the end."""
    for _ in range(count):
        n = rng.choice(WRITE_SIZES)
        mode = rng.random()
        if mode < 0.2:  # at a block boundary, or one byte either side of it
            off = rng.randrange(0, size // BS + 1) * BS + rng.choice([-1, 0, 1])
        elif mode < 0.3:  # ending at, or straddling, the end of the disk
            off = size - rng.randrange(1, n + 1)
        else:
            off = rng.randrange(0, size)
        yield min(max(off, 0), size - 1), rng.randbytes(n)


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view, done = memoryview(data), 0
    while done < len(data):
        n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            break
        done += n
    return done


def check_random_reads(fd: int, ref: bytes | bytearray, rng: random.Random, count: int):
    """Reads at any offset and length behave like those of a raw file of that size."""
    size = len(ref)
    for _ in range(count):
        n = rng.choice([1, 3, 4096, BS - 1, BS + 17, 200_000])
        off = rng.choice(
            [
                rng.randrange(0, size),
                size - rng.randrange(1, n + 1),
                size,
                size + 12345,
                rng.randrange(0, size // BS + 1) * BS - 1,
            ]
        )
        off = max(off, 0)
        assert os.pread(fd, n, off) == bytes(ref[off : off + n]), f"pread({n}, {off})"


@contextlib.contextmanager
def loop_mount_rw(image: Path, where: Path) -> Iterator[Path]:
    """`mount -o loop image where` read-write; always unmounted, loop device detached."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-o", "loop", str(image), str(where)], check=True, capture_output=True
        )
        yield where
    finally:
        if os.path.ismount(where):
            res = subprocess.run(["umount", str(where)], capture_output=True, text=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
        res = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            if line.strip():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)


@contextlib.contextmanager
def holding_open(image: Path) -> Iterator[subprocess.Popen]:
    """`sleep 60 < image`: a process that holds the image open; killed by its pid."""
    with open(image, "rb") as f:
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- create, clone, list: through the daemon ----------------------------------------------


def test_clone_appears_at_once_and_reads_like_its_point(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src, ref = captured_source(rpfs, tmp_path, "vm", 8 * MiB + 12345, seed=1)
    assert not disks("web").exists()
    assert os.listdir(mounted / "disks") == []
    res = rpfs("clone", "vm@p1", "web", check=True)
    assert "web" in res.stdout
    # The daemon did it (through its control socket) and logged it.
    assert (repo / "control.sock").is_socket()
    assert "disk web: created" in (repo / "rpfs.log").read_text()
    # No waiting: the image is there and listed as soon as the command returns.
    assert disks("web").stat().st_size == len(ref)
    assert os.listdir(mounted / "disks") == ["web.img"]
    info = disks_by_name(rpfs)["web"]
    assert info["size"] == len(ref)
    assert info["origin"] == "vm@p1"
    assert info["hydrated_pct"] == 0
    assert info["state"] == "idle"
    assert disks_by_name(rpfs)["vm"]["hydrated_pct"] is None
    with disks.fd("web", os.O_RDONLY) as fd:
        check_random_reads(fd, ref, random.Random(5), 200)
        assert disks_by_name(rpfs)["web"]["state"] == "open (1)"
    assert disks_by_name(rpfs)["web"]["hydrated_pct"] > 0  # copy-on-read kept what it read
    disks.assert_same("web", src)
    assert disks_by_name(rpfs)["web"]["hydrated_pct"] == 100
    # The table form lists the same disks.
    table = rpfs("disks", check=True).stdout.splitlines()
    assert table[0].split() == ["DISK", "SIZE", "ORIGIN", "HYDRATED", "STATE"]
    assert any(line.split()[:1] == ["web"] and "vm@p1" in line for line in table[1:])


def test_disk_create_20g_is_sparse_zeros_with_fixed_size(rpfs, repo, mounted):
    disks = make_disks(repo, mounted)
    res = rpfs("disk", "create", "scratch", "--size", "20G", check=True)
    assert "scratch" in res.stdout
    assert disks("scratch").stat().st_size == 20 * GiB
    info = disks_by_name(rpfs)["scratch"]
    assert (info["size"], info["origin"], info["state"]) == (20 * GiB, None, "idle")
    assert info["hydrated_pct"] == 100  # nothing to fetch: it has no origin
    with disks.fd("scratch") as fd:
        assert os.pread(fd, BS + 7, 10 * GiB - 3) == bytes(BS + 7)
        assert pwrite_all(fd, b"tail" * 1000, 20 * GiB - 4000) == 4000
        assert pwrite_all(fd, b"head", 0) == 4
        os.fsync(fd)
        assert os.pread(fd, 5000, 20 * GiB - 5000) == bytes(1000) + b"tail" * 1000
    with disks.fd("scratch", os.O_RDONLY) as fd:
        assert os.pread(fd, 8, 0) == b"head" + bytes(4)
        assert os.pread(fd, 5000, 20 * GiB - 5000) == bytes(1000) + b"tail" * 1000
    local = list((repo / "disks").glob("*.raw"))
    assert len(local) == 1 and local[0].stat().st_blocks * 512 < 4 * MiB  # still sparse


def test_fixed_size_truncate_and_end_of_disk(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src, ref = captured_source(rpfs, tmp_path, "vm", 4 * MiB + 1000, seed=2)
    rpfs("clone", "vm@p1", "c", check=True)
    image = disks("c")
    size = len(ref)
    for new_size in (0, size - 1, size + 1, size + BS, 2 * size):
        with pytest.raises(PermissionError):
            os.truncate(image, new_size)
    res = disks.run("c", ["truncate", "-s", "1G", str(image)])
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    os.truncate(image, size)  # to its own size: allowed, a no-op
    with disks.fd("c") as fd:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", size)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 5000, size + 3 * BS)
        assert exc.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 5000, size - 100) == 100  # straddling: short
        ref[size - 100 :] = b"y" * 100
        assert os.pwrite(fd, b"z", size - 1) == 1
        ref[size - 1 :] = b"z"
        os.fsync(fd)
        assert os.pread(fd, 4096, size) == b""
        assert os.pread(fd, 4096, size - 10) == bytes(ref[size - 10 :])
    with disks.fd("c", os.O_WRONLY | os.O_APPEND) as fd, pytest.raises(OSError) as exc:
        os.write(fd, b"appended")  # O_APPEND writes at the end: past it
    assert exc.value.errno == errno.ENOSPC
    assert image.stat().st_size == size
    disks.assert_is("c", ref)
    assert_same_bytes(point_image(mounted, "vm", "p1"), src)  # the point is untouched


def test_random_writes_match_a_plain_copy_across_remount(rpfs, repo, mount, tmp_path):
    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    src, _ = captured_source(rpfs, tmp_path, "vm", 12 * MiB + 4321, seed=3)
    copy = tmp_path / "copy.img"
    sparse_copy(src, copy)
    rpfs("clone", "vm@p1", "c", check=True)
    rpfs("disk", "create", "e", "--size", str(3 * MiB + 333), check=True)
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(3 * MiB + 333))
    rng = random.Random(4)
    for name, plain in (("c", copy), ("e", blank)):
        size = plain.stat().st_size
        assert disks(name).stat().st_size == size
        with disks.fd(name) as fd, open(plain, "r+b") as p:
            for i, (off, data) in enumerate(random_writes(rng, size, 400)):
                n = min(len(data), size - off)
                assert os.pwrite(fd, data, off) == n, (off, len(data))
                p.seek(off)
                p.write(data[:n])
                if i % 97 == 0:
                    os.fsync(fd)
            for _ in range(5):  # past the end: refused, nothing changes
                with pytest.raises(OSError) as exc:
                    os.pwrite(fd, b"!" * rng.choice([1, 4096]), size + rng.randrange(BS))
                assert exc.value.errno == errno.ENOSPC
        assert disks(name).stat().st_size == size
        disks.assert_same(name, plain)
        with disks.fd(name, os.O_RDONLY) as fd:
            check_random_reads(fd, read_file(plain), random.Random(6), 150)
    remount(rpfs, mount, mnt)
    disks.assert_same("c", copy)
    disks.assert_same("e", blank)
    assert_same_bytes(point_image(mnt, "vm", "p1"), src)


# -- real tools -----------------------------------------------------------------------------


def test_ext4_clone_loop_mounted_read_write(rpfs, repo, mounted, ext4_builder, tmp_path):
    disks = make_disks(repo, mounted)
    source, _, sums = ext4_builder("vm", seed=7, size=64 * MiB)
    original = tmp_path / "vm-original.img"
    sparse_copy(source, original)
    rpfs.capture("vm", source, "p1")
    rpfs("clone", "vm@p1", "vm2", check=True)

    new_bin = random.Random(8).randbytes(MiB + 3)
    with disks.fd("vm2", os.O_RDONLY), loop_mount_rw(disks("vm2"), tmp_path / "rw") as root:
        (root / "data" / "copy-of-random.bin").unlink()
        (root / "etc" / "config.ini").write_text("rewritten = yes\n" * 2000)
        (root / "srv").mkdir()
        (root / "srv" / "new.bin").write_bytes(new_bin)
        with open(root / "var" / "log" / "syslog", "a") as f:
            f.write("appended by the clone\n" * 100)
        expected = tree_checksums(root)
    assert expected != sums
    assert expected["srv/new.bin"] == hashlib.sha256(new_bin).hexdigest()
    assert "data/copy-of-random.bin" not in expected

    res = disks.run("vm2", ["e2fsck", "-fn", str(disks("vm2"))])
    assert res.returncode == 0, f"e2fsck -fn: rc {res.returncode}\n{res.stdout}{res.stderr}"
    with loop_mount(disks("vm2"), tmp_path / "ro") as root:
        assert tree_checksums(root) == expected
    point = point_image(mounted, "vm", "p1")
    assert_same_bytes(point, original)  # the point it came from is bit-exact
    e2fsck_clean(point)
    with loop_mount(point, tmp_path / "ro-point") as root:
        assert tree_checksums(root) == sums


@pytest.mark.parametrize("direct", [0, 1], ids=["buffered", "direct"])
def test_fio_verify_on_a_clone(rpfs, repo, mounted, tmp_path, direct):
    disks = make_disks(repo, mounted)
    # A clone of random data: fio's 4 KiB writes are partial blocks (copy-on-read first).
    _, ref = captured_source(rpfs, tmp_path, "vm", 40 * MiB, seed=9)
    rpfs("clone", "vm@p1", "f", check=True)
    res = disks.run(
        "f",
        [
            "fio",
            "--name=v",
            f"--filename={disks('f')}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",  # else it leaves local-v-0-verify.state in the cwd
            f"--direct={direct}",
            "--ioengine=psync",
            "--randseed=11",
            "--output-format=json",
        ],
        timeout=240,
    )
    assert res.returncode == 0, f"fio failed: {res.stdout[-2000:]}{res.stderr}"
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert fio_errors(report) == []
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] == 24 * MiB
    assert job["read"]["io_bytes"] == 24 * MiB  # the verify pass read everything back
    # fio never touched the rest: still the origin's bytes.
    assert disks.read("f")[24 * MiB :] == bytes(ref[24 * MiB :])
    assert disks("f").stat().st_size == len(ref)


def test_qemu_io_direct_on_a_clone(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src, ref = captured_source(rpfs, tmp_path, "vm", 8 * MiB, seed=10)
    rpfs("clone", "vm@p1", "q", check=True)
    res = disks.run(
        "q",
        [
            "qemu-io",
            "-f",
            "raw",
            "-t",
            "none",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 3000 70000",
            "-c",
            "read -P 0xcd 3000 70000",
            str(disks("q")),
        ],
        timeout=60,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Pattern verification failed" not in out
    assert "failed" not in out.lower(), out
    assert out.count("wrote ") == 2 and out.count("read ") == 2, out
    ref[MiB : MiB + 64 * 1024] = b"\xab" * (64 * 1024)
    ref[3000 : 3000 + 70000] = b"\xcd" * 70000
    disks.assert_is("q", ref)
    assert_same_bytes(point_image(mounted, "vm", "p1"), src)


# -- crash ----------------------------------------------------------------------------------

CRASH_LENGTHS = [1, 100, 4095, 4096, 5000, BS, BS + 1, 70_000, 200_000]


def crash_record(seed: int, i: int, size: int) -> tuple[int, bytes]:
    """The i-th write of the crash test's writer (the test recomputes it)."""
    rng = random.Random(f"{seed}:{i}")
    n = rng.choice(CRASH_LENGTHS)
    return rng.randrange(0, size - n + 1), rng.randbytes(n)


def writer_main(image: str, log: str, seed: int, size: int, limit: int = 100_000) -> int:
    """Write records, fsync after each, log each acknowledged one; stop at the first error."""
    fd = os.open(image, os.O_RDWR)
    with open(log, "a") as acks:
        for i in range(limit):
            off, data = crash_record(seed, i, size)
            try:
                if pwrite_all(fd, data, off) != len(data):
                    return 3
                os.fsync(fd)
            except OSError as exc:
                print(f"writer: record {i}: {exc}", file=sys.stderr)
                return 0
            acks.write(f"{i}\n")
            acks.flush()
    return 0


def test_sigkill_of_daemon_keeps_every_acknowledged_write(rpfs, repo, mount, tmp_path):
    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    size = 16 * MiB + 777
    src, ref = captured_source(rpfs, tmp_path, "vm", size, seed=12)
    rpfs("clone", "vm@p1", "c", check=True)
    with disks.fd("c", os.O_RDONLY) as fd:  # part hydrated: PRESENT blocks must survive too
        assert os.pread(fd, 3 * MiB, 0) == ref[: 3 * MiB]
    acks = tmp_path / "acks.log"
    acks.touch()
    seed = 13
    writer = subprocess.Popen(
        [sys.executable, str(HERE), "writer", str(disks("c")), str(acks), str(seed), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    info = json.loads((repo / "locks" / "daemon.lock").read_text())
    assert info["mountpoint"] == str(mnt)
    pid = int(info["pid"])
    try:
        deadline = time.monotonic() + 60
        while len(acks.read_text().splitlines()) < 60:
            assert writer.poll() is None, f"writer ended early: {writer.communicate()}"
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_exit(pid, 10), "daemon survived SIGKILL"
        _, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
    assert writer.returncode == 0, err

    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while is_fuse_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_fuse_mounted(mnt)
    mount(mnt)

    acked = [int(line) for line in acks.read_text().split()]
    assert len(acked) >= 60 and acked == list(range(len(acked)))
    expected = bytearray(ref)
    for i in acked:
        off, data = crash_record(seed, i, size)
        expected[off : off + len(data)] = data
    actual = disks.read("c")
    # The one write after the last acknowledged one may or may not have happened.
    off, data = crash_record(seed, len(acked), size)
    expected[off : off + len(data)] = actual[off : off + len(data)]
    assert actual == expected, f"after SIGKILL: {first_difference(actual, bytes(expected))}"
    assert_same_bytes(point_image(mnt, "vm", "p1"), src)
    # And the remounted disk takes writes and keeps them.
    disks.write("c", 5, b"after")
    expected[5:10] = b"after"
    remount(rpfs, mount, mnt)
    disks.assert_is("c", expected)


# -- size and hydration --------------------------------------------------------------------


def test_clone_of_64g_point_is_instant(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    big = tmp_path / "big.img"
    size = 64 * GiB
    subprocess.run(["truncate", "-s", str(size), str(big)], check=True)
    rng = random.Random(14)
    pieces = {off: rng.randbytes(100_000) for off in (12345, 17 * GiB + 3, 40 * GiB - 5)}
    pieces[size - 5000] = rng.randbytes(5000)
    with open(big, "r+b") as f:
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    rpfs.capture("big", big, "p1")

    start = time.monotonic()
    rpfs("clone", "big@p1", "bigc", check=True)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"clone of a 64 GiB point took {elapsed:.1f}s"
    assert disks("bigc").stat().st_size == size
    assert sum(p.stat().st_blocks for p in (repo / "disks").glob("*.raw")) * 512 < MiB
    info = disks_by_name(rpfs)["bigc"]
    assert info["size"] == size and info["hydrated_pct"] < 1
    with disks.fd("bigc") as fd:
        for off, data in pieces.items():
            assert os.pread(fd, len(data) + 10, off - 10) == bytes(10) + data
        assert os.pread(fd, BS, 30 * GiB + 1) == bytes(BS)
        assert os.pwrite(fd, b"E" * 300, size - 200) == 200
        os.fsync(fd)
        assert os.pread(fd, 300, size - 300) == pieces[size - 5000][4700:4800] + b"E" * 200


def test_hydrate_1g_clone_by_reading_and_by_command(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src = tmp_path / "g.img"
    size = GiB
    rng = random.Random(15)
    with open(src, "wb") as f:  # data in every MiB, unaligned; holes and zeros between
        f.truncate(size)
        for i in range(1024):
            f.seek(i * MiB + (i * 37 % 13) * BS + (i % 7) * 1001)
            f.write(rng.randbytes(40_000) if i % 4 else b"text %d\n" % i * 4000)
    rpfs.capture("g", src, "p1")
    rpfs("clone", "g@p1", "h1", check=True)
    rpfs("clone", "g@p1", "h2", check=True)

    res = disks.run("h1", ["dd", f"if={disks('h1')}", "of=/dev/null", "bs=1M"], timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"{size} bytes" in res.stderr
    listed = disks_by_name(rpfs)
    assert listed["h1"]["hydrated_pct"] == 100
    assert listed["h2"]["hydrated_pct"] == 0
    disks.assert_same("h1", src)

    res = rpfs("hydrate", "h2", check=True, timeout=240)
    assert "h2" in res.stdout
    assert disks_by_name(rpfs)["h2"]["hydrated_pct"] == 100
    rpfs("hydrate", "h2", check=True)  # again: nothing left to do, fine
    disks.assert_same("h2", src)


READER = """
import hashlib, os, sys, time
path, start, length, piece, go = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
while not os.path.exists(go):
    time.sleep(0.001)
h = hashlib.sha256()
fd = os.open(path, os.O_RDONLY)
pos = start
while pos < start + length:
    data = os.pread(fd, min(piece, start + length - pos), pos)
    assert data, pos
    h.update(data)
    pos += len(data)
print(h.hexdigest())
"""


def test_concurrent_reads_of_unhydrated_region(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src, ref = captured_source(rpfs, tmp_path, "vm", 24 * MiB, seed=16)
    rpfs("clone", "vm@p1", "c", check=True)
    start, length = 3 * MiB + 123, 9 * MiB + 4567
    expected = hashlib.sha256(ref[start : start + length]).hexdigest()
    go = tmp_path / "go"
    with disks.fd("c", os.O_RDONLY):  # keeps the disk open while readers come and go
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    READER,
                    str(disks("c")),
                    str(start),
                    str(length),
                    str(piece),
                    str(go),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for piece in (4096, 5000, BS, BS + 1, 100_000, MiB, 777_777, 4096)
        ]
        try:
            time.sleep(0.3)
            go.touch()
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == expected
    assert 0 < disks_by_name(rpfs)["c"]["hydrated_pct"] < 100
    disks.assert_same("c", src)


# -- points of clones ------------------------------------------------------------------------


def test_clone_of_a_clones_point_is_exact(rpfs, repo, mount, tmp_path):
    if rpfs("snapshot", "--help").returncode != 0:
        pytest.skip("rpfs snapshot does not exist yet")
    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    src, ref = captured_source(rpfs, tmp_path, "vm", 6 * MiB + 99, seed=17)
    rpfs("clone", "vm@p1", "c1", check=True)
    rng = random.Random(18)
    with disks.fd("c1") as fd:
        for off, data in random_writes(rng, len(ref), 60):
            data = data[: len(ref) - off]
            assert pwrite_all(fd, data, off) == len(data)
            ref[off : off + len(data)] = data
    at_s1 = bytes(ref)
    rpfs("snapshot", "c1", "--name", "s1", check=True, timeout=120)
    rpfs("clone", "c1@s1", "c2", check=True)
    disks.assert_is("c2", at_s1)
    assert read_file(point_image(mnt, "c1", "s1")) == at_s1
    # Later writes to either side stay on that side.
    disks.write("c1", 0, b"c1 after s1")
    disks.write("c2", BS, b"c2 only")
    expected_c2 = bytearray(at_s1)
    expected_c2[BS : BS + 7] = b"c2 only"
    disks.assert_is("c2", expected_c2)
    assert read_file(point_image(mnt, "c1", "s1")) == at_s1
    assert disks.read("c1")[:11] == b"c1 after s1"
    remount(rpfs, mount, mnt)
    disks.assert_is("c2", expected_c2)
    assert read_file(point_image(mnt, "c1", "s1")) == at_s1
    assert_same_bytes(point_image(mnt, "vm", "p1"), src)

    # c2 depends on c1's point: delete c1 only with --force; c2 keeps every byte.
    assert_one_line_error(rpfs("disk", "delete", "c1", "--with-points"), "c2", "--force")
    disks.assert_is("c2", expected_c2)
    rpfs("disk", "delete", "c1", "--force", "--with-points", check=True, timeout=120)
    assert "c1" not in disks_by_name(rpfs)
    disks.assert_is("c2", expected_c2)
    remount(rpfs, mount, mnt)
    disks.assert_is("c2", expected_c2)


# -- delete ----------------------------------------------------------------------------------


def test_delete_frees_the_local_file(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    _, ref = captured_source(rpfs, tmp_path, "vm", 2 * MiB, seed=19)
    before = local_files(repo)
    rpfs("clone", "vm@p1", "c", check=True)
    rpfs("clone", "vm@p1", "keep", check=True)
    assert len(local_files(repo) - before) == 2
    disks.write("c", 0, b"dirty")
    disks.write("keep", 0, b"kept!")
    disks.assert_is("c", b"dirty" + ref[5:])
    res = rpfs("disk", "delete", "c", check=True)
    assert "c" in res.stdout
    assert len(local_files(repo) - before) == 1
    assert os.listdir(mounted / "disks") == ["keep.img"]
    assert set(disks_by_name(rpfs)) == {"vm", "keep"}
    disks.assert_is("keep", b"kept!" + ref[5:])
    assert_one_line_error(rpfs("disk", "delete", "c"), "'c'")
    # The name is free again.
    rpfs("clone", "vm@p1", "c", check=True)
    time.sleep(1.2)  # past the kernel's attribute cache (see test_recreated_disk_...)
    disks.assert_is("c", ref)


def test_delete_of_an_open_disk_is_refused(rpfs, repo, mounted, tmp_path):
    disks = make_disks(repo, mounted)
    src, ref = captured_source(rpfs, tmp_path, "vm", 2 * MiB, seed=20)
    rpfs("clone", "vm@p1", "c", check=True)
    files = local_files(repo)
    with holding_open(disks("c")) as sleeper:
        assert disks_by_name(rpfs)["c"]["state"] == "open (1)"
        line = assert_one_line_error(rpfs("disk", "delete", "c"), "open")
        assert "disk c" in line
        assert_one_line_error(rpfs("disk", "delete", "c", "--force"), "open")
        assert local_files(repo) == files
        with open(disks("c"), "rb") as f:  # a second open, while the first holds it
            assert f.read() == ref
        assert sleeper.poll() is None
    deadline = time.monotonic() + 15
    while disks_by_name(rpfs)["c"]["state"] != "idle":  # the kernel's release is async
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rpfs("disk", "delete", "c", check=True)
    assert "c" not in disks_by_name(rpfs)
    assert local_files(repo) == set()
    assert_same_bytes(point_image(mounted, "vm", "p1"), src)


def test_delete_of_an_origin_needs_force_and_keeps_dependants(rpfs, repo, mount, tmp_path):
    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    src, ref = captured_source(rpfs, tmp_path, "vm", 5 * MiB + 5, seed=21)
    rpfs("clone", "vm@p1", "a", check=True)
    rpfs("clone", "vm@p1", "b", check=True)
    expected_a = bytearray(ref)
    disks.write("a", BS - 3, b"a" * 10)  # a: a little written, the rest never read
    expected_a[BS - 3 : BS + 7] = b"a" * 10
    with disks.fd("b", os.O_RDONLY) as fd:  # b: partly hydrated
        assert os.pread(fd, MiB, 0) == ref[:MiB]

    line = assert_one_line_error(rpfs("disk", "delete", "vm", "--with-points"), "--force")
    assert "a" in line and "b" in line
    assert "vm" in disks_by_name(rpfs)
    assert_same_bytes(point_image(mnt, "vm", "p1"), src)

    res = rpfs("disk", "delete", "vm", "--force", "--with-points", check=True)
    assert "a" in res.stdout and "b" in res.stdout
    assert set(disks_by_name(rpfs)) == {"a", "b"}
    assert "vm" not in os.listdir(mnt / "points")
    assert rpfs.points() == []
    disks.assert_is("a", expected_a)
    disks.assert_is("b", ref)
    remount(rpfs, mount, mnt)
    disks.assert_is("a", expected_a)
    disks.assert_is("b", ref)
    rpfs("hydrate", "a", check=True)
    assert disks_by_name(rpfs)["a"]["hydrated_pct"] == 100
    disks.assert_is("a", expected_a)


def test_a_hydrated_clone_no_longer_needs_its_origin(rpfs, repo, mount, tmp_path):
    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    _, ref = captured_source(rpfs, tmp_path, "vm", 3 * MiB + 7, seed=23)
    rpfs("clone", "vm@p1", "c", check=True)
    expected = bytearray(ref)
    disks.write("c", 5, b"written")
    expected[5:12] = b"written"
    rpfs("snapshot", "c", "--name", "s1", check=True)  # a point of c reads through vm too
    rpfs("hydrate", "c", check=True)
    rpfs("disk", "delete", "vm", "--with-points", check=True)  # no --force needed any more
    assert set(disks_by_name(rpfs)) == {"c"}
    disks.assert_is("c", expected)
    assert read_file(point_image(mnt, "c", "s1")) == expected
    remount(rpfs, mount, mnt)
    disks.assert_is("c", expected)


def test_delete_while_a_point_image_is_open_is_refused(rpfs, repo, mounted, tmp_path):
    src, ref = captured_source(rpfs, tmp_path, "vm", MiB, seed=22)
    rpfs("clone", "vm@p1", "c", check=True)
    fd = os.open(point_image(mounted, "vm", "p1"), os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 0) == ref
        assert_one_line_error(rpfs("disk", "delete", "vm"), "open")
        assert_one_line_error(rpfs("disk", "delete", "vm", "--force"), "open")
        assert os.pread(fd, MiB, 0) == ref
    finally:
        os.close(fd)
    assert_same_bytes(point_image(mounted, "vm", "p1"), src)
    deadline = time.monotonic() + 15
    while (res := rpfs("disk", "delete", "vm", "--force", "--with-points")).returncode != 0:
        assert time.monotonic() < deadline, res.stderr  # the kernel's release is async
        time.sleep(0.05)
    assert "vm" not in disks_by_name(rpfs)
    assert make_disks(repo, mounted).read("c") == ref


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "direct"])
def test_delete_of_a_disk_with_points_needs_with_points(rpfs, repo, mount, tmp_path, daemon):
    src = tmp_path / "src.img"
    make_source(src, MiB + 7, seed=27)
    for i in range(1, 7):  # a disk that has only captured points
        rpfs.capture("vm", src, f"p{i}")
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    expected_w = bytearray(MiB)
    if daemon:
        mnt, _ = mount()
        disks = make_disks(repo, mnt)
        disks.write("w", 3, b"kept")
        expected_w[3:7] = b"kept"
    rpfs("snapshot", "w", "--name", "s1", check=True)
    files = local_files(repo)
    deadline = time.monotonic() + 15
    while disks_by_name(rpfs)["w"]["state"] != "idle":  # the kernel's release is async
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert_one_line_error(rpfs("disk", "delete", "vm"),
                          "disk vm has 6 point(s): p1, p2, p3, p4, p5 and 1 more;",
                          "pass --with-points")
    assert_one_line_error(rpfs("disk", "delete", "vm", "--force"), "6 point(s)", "--with-points")
    assert_one_line_error(rpfs("disk", "delete", "w"), "disk w has 1 point(s): s1;",
                          "--with-points")
    assert set(disks_by_name(rpfs)) == {"vm", "w"}
    assert [p["name"] for p in rpfs.points()] == ["p1", "p2", "p3", "p4", "p5", "p6", "s1"]
    assert local_files(repo) == files
    if daemon:
        assert_same_bytes(point_image(mnt, "vm", "p6"), src)
        disks.assert_is("w", expected_w)
        assert read_file(point_image(mnt, "w", "s1")) == expected_w
    else:
        rpfs("restore", "vm@p6", tmp_path / "p6.img", check=True)
        assert_same_bytes(tmp_path / "p6.img", src)

    res = rpfs("disk", "delete", "vm", "--with-points", check=True)
    assert res.stdout == "disk vm: deleted with 6 point(s): p1, p2, p3, p4, p5, p6\n"
    res = rpfs("disk", "delete", "w", "--with-points", check=True)
    assert res.stdout == "disk w: deleted with 1 point(s): s1\n"
    assert disks_by_name(rpfs) == {}
    assert rpfs.points() == []
    assert local_files(repo) == set()
    if daemon:
        assert os.listdir(mnt / "points") == [] and os.listdir(mnt / "disks") == []


# -- without a daemon -------------------------------------------------------------------------


def test_commands_work_on_the_repository_without_a_daemon(rpfs, repo, mount, tmp_path):
    src, ref = captured_source(rpfs, tmp_path, "vm", 6 * MiB + 3, seed=23)
    assert not (repo / "control.sock").exists()
    start = time.monotonic()
    rpfs("clone", "vm@p1", "c", check=True)
    assert time.monotonic() - start < 5
    rpfs("clone", "vm@p1", "d", check=True)
    rpfs("disk", "create", "e", "--size", "20G", check=True)
    assert not (repo / "rpfs.log").exists()  # no daemon was involved
    listed = disks_by_name(rpfs)
    assert {k: listed["c"][k] for k in ("size", "origin", "hydrated_pct", "state")} == {
        "size": len(ref),
        "origin": "vm@p1",
        "hydrated_pct": 0,
        "state": "idle",
    }
    assert (listed["e"]["size"], listed["e"]["origin"]) == (20 * GiB, None)
    assert listed["vm"]["hydrated_pct"] is None
    rpfs("hydrate", "c", check=True)
    assert disks_by_name(rpfs)["c"]["hydrated_pct"] == 100
    assert len(local_files(repo)) == 3

    mnt, _ = mount()
    disks = make_disks(repo, mnt)
    assert sorted(os.listdir(mnt / "disks")) == ["c.img", "d.img", "e.img"]
    disks.assert_same("c", src)
    disks.assert_same("d", src)
    assert disks("e").stat().st_size == 20 * GiB
    disks.write("d", MiB + 1, b"written while mounted")
    ref[MiB + 1 : MiB + 22] = b"written while mounted"
    rpfs("umount", mnt, check=True)

    # Delete without a daemon: the origin needs --force, its dependants keep their bytes.
    assert_one_line_error(rpfs("disk", "delete", "vm", "--with-points"), "--force")
    rpfs("disk", "delete", "vm", "--force", "--with-points", check=True)
    files = local_files(repo)
    rpfs("disk", "delete", "c", check=True)
    assert len(files - local_files(repo)) == 1
    assert set(disks_by_name(rpfs)) == {"d", "e"}
    mount(mnt)
    assert sorted(os.listdir(mnt / "disks")) == ["d.img", "e.img"]
    disks.assert_is("d", ref)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "direct"])
def test_bad_input_is_one_clear_error_and_loses_nothing(rpfs, repo, mount, tmp_path, daemon):
    src, ref = captured_source(rpfs, tmp_path, "vm", MiB + 1, seed=24)
    rpfs("clone", "vm@p1", "c", check=True)
    if daemon:
        mnt, _ = mount()
        disks = make_disks(repo, mnt)
        disks.write("c", 0, b"mine")
        ref[:4] = b"mine"
    fields = ("size", "origin", "hydrated_pct")
    before = {k: {f: v[f] for f in fields} for k, v in disks_by_name(rpfs).items()}
    files = local_files(repo)
    cases = [
        (("clone", "vm@nope", "x"), ["nope"]),
        (("clone", "nope@p1", "x"), ["nope"]),
        (("clone", "vm@", "x"), ["invalid"]),
        (("clone", "@p1", "x"), ["invalid"]),
        (("clone", "vm@p1", "c"), ["already exists"]),
        (("clone", "vm@p1", "vm"), ["already exists"]),
        (("clone", "vm@p1", "a/b"), ["invalid"]),
        (("clone", "vm@p1", ".hidden"), ["invalid"]),
        (("clone", "vm@p1", "x" * 129), ["invalid"]),
        (("clone", "vm@p1", "sp ace"), ["invalid"]),
        (("disk", "create", "c", "--size", "1G"), ["already exists"]),
        (("disk", "create", "..", "--size", "1G"), ["invalid"]),
        (("disk", "create", "y", "--size", "0"), ["size"]),
        (("disk", "create", "y", "--size", "12X"), ["size"]),
        (("disk", "delete", "nope"), ["nope"]),
        (("disk", "delete", "a/b"), []),
        (("hydrate", "nope"), ["nope"]),
        (("hydrate", "vm"), ["vm"]),
    ]
    for args, needles in cases:
        assert_one_line_error(rpfs(*args), *needles)
    after = {k: {f: v[f] for f in fields} for k, v in disks_by_name(rpfs).items()}
    assert after == before
    assert local_files(repo) == files
    if daemon:
        with disks.fd("c", os.O_WRONLY) as fd, pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", len(ref) + 1)
        assert exc.value.errno == errno.ENOSPC
        assert disks.run("c", ["truncate", "-s", "0", str(disks("c"))]).returncode != 0
        disks.assert_is("c", ref)
        assert_same_bytes(point_image(mnt, "vm", "p1"), src)
        rpfs("umount", mnt, check=True)
    mnt, _ = mount(tmp_path / "check")
    make_disks(repo, mnt).assert_is("c", ref)


# -- regressions of fixed bugs ---------------------------------------------------------------


def test_image_reopens_right_after_close(rpfs, repo, mounted):
    rpfs("disk", "create", "d", "--size", "4M", check=True)
    image = mounted / "disks" / "d.img"
    expected = bytearray(4 * MiB)
    refused = 0
    for i in range(200):
        try:
            fd = os.open(image, os.O_RDWR)
        except OSError as exc:
            assert exc.errno == errno.EBUSY, exc
            refused += 1
            continue
        try:
            os.pwrite(fd, bytes([i % 251 + 1]), i * 4096 + 1)
            expected[i * 4096 + 1] = i % 251 + 1
        finally:
            os.close(fd)
    assert read_file(image) == expected
    assert refused == 0, f"{refused} of 200 opens right after a close failed with EBUSY"


def test_open_with_o_trunc_is_refused(rpfs, repo, mounted, tmp_path):
    _, ref = captured_source(rpfs, tmp_path, "vm", MiB, seed=25)
    rpfs("clone", "vm@p1", "c", check=True)
    image = mounted / "disks" / "c.img"
    try:
        with pytest.raises(PermissionError):
            os.close(os.open(image, os.O_WRONLY | os.O_TRUNC))
    finally:
        assert image.stat().st_size == MiB
        assert read_file(image) == ref


def test_qemu_io_opens_a_clone_every_time(rpfs, repo, mounted, tmp_path):
    captured_source(rpfs, tmp_path, "vm", MiB, seed=26)
    rpfs("clone", "vm@p1", "q", check=True)
    image = mounted / "disks" / "q.img"
    failures = []
    for _ in range(10):
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-t", "none", "-c", "read 0 4k", str(image)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            failures.append((res.stdout + res.stderr).strip().splitlines()[-1])
    assert failures == [], f"{len(failures)} of 10 qemu-io runs failed: {failures[0]}"


def test_disk_create_too_large_is_one_clear_error(rpfs, repo):
    res = rpfs("disk", "create", "huge", "--size", "100000T")
    assert "huge" not in disks_by_name(rpfs)
    assert local_files(repo) == set(), "an orphan local file was left behind"
    assert_one_line_error(res, "huge")


def test_recreated_disk_shows_its_new_size_at_once(rpfs, repo, mounted):
    from rpfs.serve.control import RemoteService

    remote = RemoteService(repo / "control.sock")  # what the CLI uses, minus its start-up
    image = mounted / "disks" / "r.img"
    remote.create(name="r", size=MiB)
    start = time.monotonic()
    assert image.stat().st_size == MiB
    remote.delete(name="r", force=False)
    remote.create(name="r", size=10 * MiB)
    size = image.stat().st_size
    if time.monotonic() - start > 0.8:
        pytest.skip("too slow to stay inside the kernel's attribute cache time")
    assert size == 10 * MiB


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "writer":
        sys.exit(writer_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    sys.exit("usage: test_disks.py writer IMAGE ACK_LOG SEED SIZE")
