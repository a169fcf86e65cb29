"""The writer process and the checks of the live-disk tests, shared by test_points_live.py
and test_crash_loop.py.

The writer stamps every 4 KiB record it writes with a sequence number (seq, slot, then
filler derived from both) and fsyncs each write, logging when each write was issued and
when its fsync returned. `prefix_of` and `check_instant` check an image against that
log: a point must be exactly "the disk's base content plus the writes 1..M" for some M.
`Live` holds one test's mount, disk handles and helper processes (the `live` fixture in
conftest.py).

Run as a script (`python livewriter.py writer ...`) this file is the writer process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SLOT = 4096  # the writer's record size
HEAD = 16  # seq (8) + slot (8)


def record(seq: int, slot: int) -> bytes:
    """The 4 KiB record the writer puts in `slot` as write number `seq` (never all zeros)."""
    head = seq.to_bytes(8, "big") + slot.to_bytes(8, "big")
    return head + hashlib.shake_128(head).digest(SLOT - HEAD)


def writer_main(argv: list[str]) -> int:
    """The writer process: records to random slots, each write fsynced and logged.

    Log lines (line-buffered): `W seq disk slot issued_ns acked_ns` once the fsync
    returned, `E seq disk slot issued_ns errno` for a write that failed (then it exits).
    With several images it writes each record to each image in turn (d1, d2, d1, ...).
    Half of the writes go to the first `--hot` slots, so slots are rewritten.
    """
    p = argparse.ArgumentParser(prog="writer")
    p.add_argument("--log", required=True)
    p.add_argument("--stop", required=True, help="stop when this file exists")
    p.add_argument("--first-seq", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot", type=int, default=512)
    p.add_argument("--max-seconds", type=float, default=90.0)
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    fds = [os.open(path, os.O_RDWR) for path in args.images]
    nslots = os.fstat(fds[0]).st_size // SLOT
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.max_seconds
    seq = args.first_seq
    try:
        with open(args.log, "w", buffering=1) as log:
            while not os.path.exists(args.stop) and time.monotonic() < deadline:
                slot = rng.randrange(args.hot) if rng.random() < 0.5 else rng.randrange(nslots)
                data = record(seq, slot)
                for i, fd in enumerate(fds):
                    issued = time.monotonic_ns()
                    try:
                        os.pwrite(fd, data, slot * SLOT)
                        os.fsync(fd)
                    except OSError as exc:
                        log.write(f"E {seq} {i} {slot} {issued} {exc.errno}\n")
                        return 0
                    log.write(f"W {seq} {i} {slot} {issued} {time.monotonic_ns()}\n")
                seq += 1
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    sys.exit(writer_main(sys.argv[2:]))


import pytest  # noqa: E402  (the writer process above needs none of this)
from helpers import BS, MiB, is_fuse_mounted, point_image, wait_pid_exit  # noqa: E402

DISK_SIZE = 64 * MiB
SNAPSHOT_HANG = 10.0  # seconds: a snapshot this slow is stuck

# -- the writer's log and the prefix check -------------------------------------------------


@dataclass(frozen=True)
class Write:
    seq: int
    disk: int  # index of the image in the writer's argument list
    slot: int
    issued: int  # monotonic ns, before pwrite
    acked: int | None  # monotonic ns, after fsync returned; None: it failed


def parse_log(path: Path) -> list[Write]:
    out = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # the writer is still writing this line
        kind, *fields = line.split()
        seq, disk, slot, issued, last = map(int, fields)
        out.append(Write(seq, disk, slot, issued, last if kind == "W" else None))
    return out


def apply_writes(base: bytes | None, size: int, writes: list[Write], upto: int) -> bytearray:
    """`base` (zeros if None) with the writes of seq <= upto applied in order."""
    image = bytearray(base) if base is not None else bytearray(size)
    for w in sorted(writes, key=lambda w: w.seq):
        if w.seq <= upto:
            image[w.slot * SLOT : (w.slot + 1) * SLOT] = record(w.seq, w.slot)
    return image


def prefix_of(image: bytes, base: bytes | None, writes: list[Write], what: str) -> int:
    """The M for which `image` is exactly base + writes 1..M; fails if there is none."""
    seqs_of: dict[int, set[int]] = defaultdict(set)
    for w in writes:
        seqs_of[w.slot].add(w.seq)
    m = 0
    for slot, seqs in seqs_of.items():
        seq = int.from_bytes(image[slot * SLOT : slot * SLOT + 8], "big")
        if seq in seqs:
            m = max(m, seq)
    expected = apply_writes(base, len(image), writes, m)
    if image != expected:
        bad = []
        for slot in range(len(image) // SLOT):
            a = image[slot * SLOT : (slot + 1) * SLOT]
            if a != expected[slot * SLOT : (slot + 1) * SLOT]:
                found = int.from_bytes(a[:8], "big")
                want = int.from_bytes(expected[slot * SLOT : slot * SLOT + 8], "big")
                bad.append(f"slot {slot} (block {slot * SLOT // BS}): seq {found}, expected {want}")
        raise AssertionError(
            f"{what} is not the disk at one instant (no prefix of the writes matches; newest "
            f"record seen: seq {m}); {len(bad)} slots differ: {bad[:8]}"
        )
    return m


def check_instant(
    image: bytes, base: bytes | None, writes: list[Write], t0: int, t1: int, what: str
) -> int:
    """The point is a prefix M that contains every write acknowledged before the snapshot
    started (t0) and none issued after it returned (t1); returns M."""
    m = prefix_of(image, base, writes, what)
    missing = [w.seq for w in writes if w.acked is not None and w.acked < t0 and w.seq > m]
    assert not missing, f"{what} (at write {m}) lacks writes acked before it: {missing[:10]}"
    late = [w.seq for w in writes if w.issued > t1 and w.seq <= m]
    assert not late, f"{what} (at write {m}) holds writes issued after it: {late[:10]}"
    return m


# -- images, processes, the daemon -------------------------------------------------------


def read_image(path: Path, chunk: int = MiB) -> bytes:
    """The whole image with O_DIRECT: what the daemon serves now, not the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    out = bytearray()
    try:
        while (n := os.preadv(fd, [buf], len(out))) > 0:
            out += buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def image_matches(image: Path, expected: Path, start: int = 0, chunk: int = MiB) -> bool:
    """Whether the image from `start` on (read with O_DIRECT, as read_image) equals the
    file `expected` from `start` on, comparing a piece at a time: no whole copies held."""
    fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    try:
        with open(expected, "rb") as want:
            want.seek(start)
            pos = start
            while True:
                n = os.preadv(fd, [buf], pos)
                if buf[:n] != want.read(n) or n == 0:
                    return n == 0 and want.read(1) == b""
                pos += n
    finally:
        os.close(fd)
        buf.close()


# -- the live-disk test's state ----------------------------------------------------------


@dataclass
class Snap:
    disks: tuple[str, ...]
    name: str
    t0: int  # monotonic ns just before `rpfs snapshot` started
    t1: int  # ... and just after it returned

    @property
    def seconds(self) -> float:
        return (self.t1 - self.t0) / 1e9


class Writer:
    """The writer process on some disk images (see writer_main)."""

    def __init__(
        self, tmp: Path, images: list[Path], first_seq: int = 1, seed: int = 0, hot: int = 512
    ) -> None:
        tag = f"writer-{time.monotonic_ns()}"
        self.log = tmp / f"{tag}.log"
        self.stop_file = tmp / f"{tag}.stop"
        self.stderr = open(tmp / f"{tag}.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "writer",
                "--log",
                str(self.log),
                "--stop",
                str(self.stop_file),
                "--first-seq",
                str(first_seq),
                "--seed",
                str(seed),
                "--hot",
                str(hot),
                *map(str, images),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )

    def writes(self, disk: int | None = None) -> list[Write]:
        return [w for w in parse_log(self.log) if disk is None or w.disk == disk]

    def wait_writes(self, n: int, timeout: float = 30.0) -> None:
        """Until at least `n` more writes are acknowledged than now."""
        target = len(self.writes()) + n
        deadline = time.monotonic() + timeout
        while len(self.writes()) < target:
            assert self.proc.poll() is None, f"the writer exited: {self.errors()}"
            assert time.monotonic() < deadline, f"the writer made no progress in {timeout}s"
            time.sleep(0.02)

    def errors(self) -> str:
        return Path(self.stderr.name).read_text() if Path(self.stderr.name).exists() else ""

    def stop(self, timeout: float = 30.0) -> list[Write]:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen (pid)
            self.proc.wait()
            raise AssertionError(f"the writer did not stop in {timeout}s") from None
        finally:
            self.stderr.close()
        assert self.proc.returncode == 0, f"writer failed: {self.errors()}"
        return self.writes()


class Live:
    """One test's mount, disk handles and helper processes; all undone at teardown."""

    def __init__(self, rpfs, mount, tmp_path: Path, options: tuple[str, ...] = ()) -> None:
        self.rpfs = rpfs
        self.mount = mount
        self.options = options  # of `rpfs mount`
        self.tmp = tmp_path
        self.mnt: Path = tmp_path / "mnt"
        self.writers: list[Writer] = []
        self.procs: list[subprocess.Popen] = []
        self.fds: dict[str, list[int]] = defaultdict(list)

    # mount and daemon

    def start(self) -> Path:
        self.mnt, _ = self.mount(self.mnt, *self.options)
        return self.mnt

    def daemon_pid(self) -> int:
        info = json.loads((self.rpfs.repo / "locks" / "daemon.lock").read_text())
        assert info["mountpoint"] == str(self.mnt), info
        return info["pid"]

    def kill_daemon(self) -> None:
        """SIGKILL the daemon this test started, then clear its dead mount."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_exit(pid, 20), f"daemon {pid} survived SIGKILL"
        for disk in list(self.fds):
            self.close(disk)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        assert not is_fuse_mounted(self.mnt)

    def unmount(self) -> None:
        for disk in list(self.fds):
            self.close(disk)
        self.rpfs("umount", self.mnt, check=True, timeout=90)

    def _stuck(self, what: str) -> None:
        """A command hung: take the daemon's stacks, kill it, and fail with them.

        Every process this one forks closes its copies of our open image fds, which
        waits for the daemon: with fds open, the daemon must die before py-spy can run.
        """
        stacks = ""
        if not self.fds and shutil.which("py-spy"):
            res = subprocess.run(
                ["py-spy", "dump", "--pid", str(self.daemon_pid())],
                capture_output=True,
                text=True,
                timeout=60,
            )
            stacks = res.stdout
        for writer in self.writers:
            writer.stop_file.touch()
        self.kill_daemon()
        pytest.fail(f"{what}; daemon stacks:\n{stacks}")

    # disks

    def disk(self, name: str) -> Path:
        return self.mnt / "disks" / f"{name}.img"

    def point(self, disk: str, name: str) -> Path:
        return point_image(self.mnt, disk, name)

    def open(self, disk: str, flags: int = os.O_RDWR) -> int:
        """Open the disk image and keep it open until close(disk) or teardown."""
        fd = os.open(self.disk(disk), flags)
        self.fds[disk].append(fd)
        return fd

    def close(self, disk: str) -> None:
        for fd in self.fds.pop(disk, []):
            with contextlib.suppress(OSError):
                os.close(fd)

    def disk_state(self, disk: str) -> str:
        disks = json.loads(self.rpfs("disks", "--json", check=True).stdout)
        return next(d["state"] for d in disks if d["name"] == disk)

    def wait_state(self, disk: str, open_files: int, timeout: float = 20.0) -> None:
        """Until the daemon has `open_files` open files of the image (the kernel sends
        the release of a closed file asynchronously)."""
        want = f"open ({open_files})" if open_files else "idle"
        deadline = time.monotonic() + timeout
        while (state := self.disk_state(disk)) != want:
            assert time.monotonic() < deadline, f"disk {disk} is {state!r}, not {want!r}"
            time.sleep(0.05)

    def create(self, name: str, size: int = DISK_SIZE) -> None:
        self.rpfs("disk", "create", name, "--size", str(size), check=True)

    # points

    def snapshot(self, *disks: str, name: str) -> Snap:
        t0 = time.monotonic_ns()
        try:
            res = self.rpfs("snapshot", *disks, "--name", name, timeout=SNAPSHOT_HANG)
        except subprocess.TimeoutExpired:
            self._stuck(
                f"rpfs snapshot {' '.join(disks)} --name {name} did not return in "
                f"{SNAPSHOT_HANG:.0f}s"
            )
        t1 = time.monotonic_ns()
        assert res.returncode == 0, f"rpfs snapshot failed: {res.stderr}"
        return Snap(disks, name, t0, t1)

    def wait_complete(self, disk: str | None = None, timeout: float = 60.0) -> list[dict]:
        """Until every point (of `disk`) is archived; returns the points."""
        deadline = time.monotonic() + timeout
        while True:
            points = self.rpfs.points(disk)
            if all(p["state"] == "complete" for p in points):
                return points
            assert time.monotonic() < deadline, f"points still archiving: {points}"
            time.sleep(0.1)

    # processes

    def writer(self, *disks: str, **kw) -> Writer:
        writer = Writer(self.tmp, [self.disk(d) for d in disks], **kw)
        self.writers.append(writer)
        return writer

    def spawn(self, *args: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(list(args), **kw)
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for writer in self.writers:
            writer.stop_file.touch()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # only processes this test started, by pid
            proc.wait()
        for writer in self.writers:
            try:
                writer.proc.wait(30)
            except subprocess.TimeoutExpired:
                writer.proc.kill()
                writer.proc.wait()
            writer.stderr.close()
        for disk in list(self.fds):
            self.close(disk)
