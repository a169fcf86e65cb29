"""Live points of writable disks, checked byte for byte through the real mount.

A writer process stamps every 4 KiB record it writes with a sequence number (seq, slot,
then filler derived from both) and fsyncs each write, logging when each write was issued
and when its fsync returned. Points taken with `rpfs snapshot` while it runs must each
equal the disk at one instant: the point image is exactly "the disk's base content plus
the writes 1..M" for some M (a prefix of the write sequence), every write acknowledged
before the snapshot command started is in it, and none issued after it returned is.

Also here: incremental sizes of tracked points, a clone's first point, SIGKILL of the
daemon (the next point falls back to a full compare), group snapshots, rollback (refused
while open, exact after, branches kept, offline too), `changed` / `allocated` against the
writer's log and the image bytes, a point read while it is still being archived, bad input.

Run as a script (`python test_points_live.py writer ...`) this file is the writer process.
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
from helpers import (  # noqa: E402
    BS,
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    is_fuse_mounted,
    point_image,
    read_at,
    wait_pid_exit,
    write_random,
)

DISK_SIZE = 64 * MiB
SNAPSHOT_BOUND = 5.0  # seconds: "returns quickly" (the benchmark measures real speed)
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


def read_buffered(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def blocks_of(extents: list[dict]) -> set[int]:
    out = set()
    for e in extents:
        assert e["start"] % BS == 0, e
        out.update(range(e["start"] // BS, -(-(e["start"] + e["length"]) // BS)))
    return out


def differing_blocks(a: bytes, b: bytes) -> set[int]:
    return {i for i in range(len(a) // BS) if a[i * BS : (i + 1) * BS] != b[i * BS : (i + 1) * BS]}


def nonzero_blocks(a: bytes) -> set[int]:
    zero = bytes(BS)
    return {i for i in range(len(a) // BS) if a[i * BS : (i + 1) * BS] != zero}


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

    def __init__(self, rpfs, mount, tmp_path: Path) -> None:
        self.rpfs = rpfs
        self.mount = mount
        self.tmp = tmp_path
        self.mnt: Path = tmp_path / "mnt"
        self.writers: list[Writer] = []
        self.procs: list[subprocess.Popen] = []
        self.fds: dict[str, list[int]] = defaultdict(list)

    # mount and daemon

    def start(self) -> Path:
        self.mnt, _ = self.mount(self.mnt)
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


@pytest.fixture
def live(rpfs, repo, mount, tmp_path):
    """A mounted repository and helpers; set up after `mount`, so torn down before it."""
    state = Live(rpfs, mount, tmp_path)
    state.start()
    try:
        yield state
    finally:
        state.teardown()


def run_points_under_writes(live: Live, disk: str, base: bytes | None, rounds: int = 3) -> None:
    """Snapshots while the writer runs; each point is the disk at one instant."""
    writer = live.writer(disk, seed=len(disk))
    snaps = []
    for i in range(rounds):
        writer.wait_writes(150)
        snaps.append(live.snapshot(disk, name=f"w{i}"))
    writer.wait_writes(50)  # the writer went on after the last point
    writes = writer.stop()
    for snap in snaps:
        assert snap.seconds < SNAPSHOT_BOUND, f"snapshot {snap.name} took {snap.seconds:.1f}s"
    points = {p["name"]: p for p in live.wait_complete(disk)}
    prev_m, prev_image = 0, base
    for snap in snaps:
        image = read_image(live.point(disk, snap.name))
        m = check_instant(image, base, writes, snap.t0, snap.t1, f"{disk}@{snap.name}")
        assert m > prev_m, f"{disk}@{snap.name}: no write between points (prefix {m})"
        point = points[snap.name]
        assert point["method"] == "tracked", point
        if prev_image is not None:
            assert point["blocks_written"] == len(differing_blocks(prev_image, image)), point
        prev_m, prev_image = m, image
    assert prev_m < writes[-1].seq, "the writer did not run after the last snapshot"
    # The disk itself holds every acknowledged write.
    final = read_image(live.disk(disk))
    assert final == apply_writes(base, len(final), writes, writes[-1].seq)


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_points_of_a_created_disk_are_instants_under_writes(live):
    live.create("vm")
    run_points_under_writes(live, "vm", None)


@pytest.mark.timeout(180)
def test_points_of_a_clone_of_a_captured_point_are_instants_under_writes(live, tmp_path):
    # A captured source: data in alternate MiB, holes elsewhere; the clone starts unhydrated.
    src = tmp_path / "src.img"
    write_random(src, DISK_SIZE, seed=7)
    with open(src, "r+b") as f:
        for off in range(MiB, DISK_SIZE, 2 * MiB):
            f.seek(off)
            f.write(bytes(MiB))
    live.rpfs.capture("golden", src, "base")
    live.rpfs("clone", "golden@base", "vm2", check=True)
    run_points_under_writes(live, "vm2", src.read_bytes())
    assert_same_bytes(live.point("golden", "base"), src)  # the origin is untouched


@pytest.mark.timeout(180)
def test_snapshot_returns_quickly_with_much_to_archive(live):
    """32 MiB dirty, writes going on (half of them into the frozen area): the snapshot
    does not wait for the archive, and both points are still instants."""
    live.create("big")
    fd = live.open("big")
    data = os.urandom(32 * MiB)
    for off in range(0, len(data), MiB):
        os.pwrite(fd, data[off : off + MiB], off)
    os.fsync(fd)
    live.close("big")  # no fd of ours while snapshots may hang (see Live._stuck)
    base = data + bytes(DISK_SIZE - len(data))
    writer = live.writer("big", hot=8192)  # hot slots: the first 32 MiB
    writer.wait_writes(100)
    first = live.snapshot("big", name="s1")
    writer.wait_writes(100)
    second = live.snapshot("big", name="s2")
    writer.wait_writes(50)
    writes = writer.stop()
    point = live.rpfs.point("big", "s1")
    assert point["frozen_blocks"] >= 512, point
    assert first.seconds < SNAPSHOT_BOUND, f"snapshot with 32 MiB to archive: {first.seconds:.1f}s"
    assert second.seconds < SNAPSHOT_BOUND, f"next snapshot: {second.seconds:.1f}s"
    live.wait_complete("big")
    for snap in (first, second):
        image = read_image(live.point("big", snap.name))
        check_instant(image, base, writes, snap.t0, snap.t1, f"big@{snap.name}")


@pytest.mark.timeout(120)
def test_tracked_points_store_only_the_blocks_written(live):
    live.create("inc")
    fd = live.open("inc")
    model = bytearray(DISK_SIZE)

    def write(off: int, data: bytes) -> None:
        os.pwrite(fd, data, off)
        model[off : off + len(data)] = data

    write(0, os.urandom(4 * MiB))
    os.fsync(fd)
    live.snapshot("inc", name="p0")
    # N distinct whole blocks, some over data, some over zeros, one written three times.
    blocks = [3, 17, 40, 63, 64, 200, 511, 700, 1023]
    for b in blocks:
        write(b * BS, os.urandom(BS))
    for _ in range(2):
        write(200 * BS, os.urandom(BS))
    os.fsync(fd)
    live.snapshot("inc", name="p1")
    expected_p1 = bytes(model)
    # 4 KiB writes inside 5 blocks, and one 4 KiB write across a block boundary (2 blocks).
    for b in (5, 6, 300, 301, 900):
        write(b * BS + 12 * 1024, os.urandom(4096))
    write(800 * BS - 2048, os.urandom(4096))
    os.fsync(fd)
    live.snapshot("inc", name="p2")
    points = {p["name"]: p for p in live.wait_complete("inc")}
    assert points["p1"]["method"] == points["p2"]["method"] == "tracked", points
    assert points["p1"]["frozen_blocks"] == points["p1"]["blocks_written"] == len(blocks)
    assert points["p2"]["blocks_written"] == 7, points["p2"]
    # Random data does not compress: about one stored block per written block, no more.
    assert points["p1"]["bytes_stored"] <= len(blocks) * (BS + 4096), points["p1"]
    assert read_image(live.point("inc", "p1")) == expected_p1
    assert read_image(live.point("inc", "p2")) == model


@pytest.mark.timeout(120)
def test_first_point_of_a_clone_stores_only_what_the_clone_wrote(live):
    live.create("src", 32 * MiB)
    fd = live.open("src")
    os.pwrite(fd, os.urandom(24 * MiB), 0)
    os.fsync(fd)
    live.snapshot("src", name="s1")
    live.wait_complete("src")
    live.rpfs("clone", "src@s1", "c", check=True)
    cfd = live.open("c")
    model = bytearray(read_image(live.disk("c")))  # copy-on-read of every block
    assert model == read_image(live.point("src", "s1"))
    hydrated = {d["name"]: d for d in json.loads(live.rpfs("disks", "--json", check=True).stdout)}
    assert hydrated["c"]["hydrated_pct"] == 100.0, hydrated["c"]
    written = {2: BS, 100: BS, 300: BS, 7: 4096, 450: 4096}  # block: bytes written in it
    for b, n in written.items():
        data = os.urandom(n)
        os.pwrite(cfd, data, b * BS + (BS - n))
        model[b * BS + BS - n : (b + 1) * BS] = data
    os.fsync(cfd)
    live.snapshot("c", name="c1")
    point = live.wait_complete("c")[0]
    assert point["method"] == "tracked", point
    assert point["blocks_written"] == len(written), point
    assert point["bytes_stored"] <= len(written) * (BS + 4096), point
    assert read_image(live.point("c", "c1")) == model


@pytest.mark.timeout(180)
def test_sigkill_of_the_daemon_during_writes(live):
    live.create("vm")
    writer = live.writer("vm")
    writer.wait_writes(200)
    before = live.snapshot("vm", name="p0")
    writer.wait_writes(200)
    live.kill_daemon()
    writer.proc.wait(30)  # its next write fails: the connection is gone
    writes = writer.stop()
    acked = [w for w in writes if w.acked is not None]
    assert writes[-1].acked is None, "the writer did not see the daemon die"
    assert len(acked) >= 400

    live.start()
    # The disk holds every write acknowledged before the kill (and is a prefix).
    disk = read_image(live.disk("vm"))
    m = prefix_of(disk, None, writes, "the disk after SIGKILL")
    assert m >= acked[-1].seq, f"acknowledged writes lost: disk at {m}, acked up to {acked[-1].seq}"
    # The point taken before the kill is still that instant.
    points = {p["name"]: p for p in live.wait_complete("vm")}
    p0 = read_image(live.point("vm", "p0"))
    check_instant(p0, None, writes, before.t0, before.t1, "vm@p0 after SIGKILL")
    # The dirty map is doubtful: the next point compares every block, and is exact.
    live.snapshot("vm", name="p1")
    points = {p["name"]: p for p in live.wait_complete("vm")}
    assert points["p1"]["method"] == "full-compare", points["p1"]
    assert_same_bytes(live.point("vm", "p1"), live.disk("vm"))
    p1 = read_image(live.point("vm", "p1"))
    assert p1 == disk
    assert points["p1"]["blocks_written"] == len(differing_blocks(p0, p1)), points["p1"]
    # After that point the map is trusted again.
    fd = live.open("vm")
    os.pwrite(fd, record(10**9, 5), 5 * SLOT)
    os.fsync(fd)
    live.snapshot("vm", name="p2")
    p2 = live.wait_complete("vm")[-1]
    assert (p2["name"], p2["method"], p2["blocks_written"]) == ("p2", "tracked", 1), p2
    assert_same_bytes(live.point("vm", "p2"), live.disk("vm"))


@pytest.mark.timeout(180)
def test_group_snapshot_is_one_instant_of_both_disks(live):
    live.create("d1", 32 * MiB)
    live.create("d2", 32 * MiB)
    writer = live.writer("d1", "d2")  # seq s to d1, then to d2, then s+1 to d1, ...
    snaps = []
    for i in range(3):
        writer.wait_writes(200)
        snaps.append(live.snapshot("d1", "d2", name=f"g{i}"))
    writer.wait_writes(20)
    writes = writer.stop()
    points = {(p["disk"], p["name"]): p for p in live.wait_complete()}
    for snap in snaps:
        assert snap.seconds < SNAPSHOT_BOUND, snap
        assert points["d1", snap.name]["created"] == points["d2", snap.name]["created"]
        m1, m2 = (
            check_instant(
                read_image(live.point(disk, snap.name)),
                None,
                [w for w in writes if w.disk == i],
                snap.t0,
                snap.t1,
                f"{disk}@{snap.name}",
            )
            for i, disk in enumerate(("d1", "d2"))
        )
        assert m2 <= m1 <= m2 + 1, f"{snap.name}: d1 at write {m1}, d2 at write {m2}"


def tree_lines(live: Live, disk: str) -> list[str]:
    return live.rpfs("points", disk, "--tree", check=True).stdout.splitlines()


def indent_of(lines: list[str], needle: str) -> int:
    found = [ln for ln in lines if ln.strip().startswith(needle)]
    assert len(found) == 1, f"{needle!r} in {lines}"
    return len(found[0]) - len(found[0].lstrip())


@pytest.mark.timeout(240)
def test_rollback(live, tmp_path):
    live.create("vm", 32 * MiB)
    fd = live.open("vm")
    model = bytearray(32 * MiB)
    rng = random.Random(3)
    seq = 0

    def scribble(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            slot = rng.randrange(len(model) // SLOT)
            os.pwrite(fd, record(seq, slot), slot * SLOT)
            model[slot * SLOT : (slot + 1) * SLOT] = record(seq, slot)
        os.fsync(fd)

    saved: dict[str, Path] = {}

    def snap(name: str) -> None:
        live.snapshot("vm", name=name)
        live.wait_complete("vm")
        saved[name] = tmp_path / f"{name}.saved"
        saved[name].write_bytes(model)
        assert read_image(live.point("vm", name)) == model, f"vm@{name} is not the disk"

    scribble(300)
    snap("p1")
    scribble(300)
    snap("p2")
    scribble(100)  # written after p2, never in a point: rollback drops it

    # Refused while the image is open, with a clear message; nothing changes.
    live.close("vm")
    live.wait_state("vm", 0)
    holder = live.spawn("sh", "-c", f"exec sleep 60 < '{live.disk('vm')}'")
    live.wait_state("vm", 1)
    res = live.rpfs("rollback", "vm@p1")
    assert_one_line_error(res, "vm", "open", "roll it back again")
    holder.kill()
    holder.wait()
    assert read_image(live.disk("vm")) == model
    live.wait_state("vm", 0)

    # Exact after close; the newer point stays exact.
    live.rpfs("rollback", "vm@p1", check=True)
    fd = live.open("vm")
    assert_same_bytes(live.disk("vm"), live.point("vm", "p1"))
    assert_same_bytes(live.disk("vm"), saved["p1"])
    assert_same_bytes(live.point("vm", "p2"), saved["p2"])
    lines = tree_lines(live, "vm")
    # p1 and p2 on the old lineage (a branch now), the current lineage under p1.
    assert any("[branch" in ln for ln in lines) and any("[current" in ln for ln in lines), lines
    assert indent_of(lines, "p1 ") == indent_of(lines, "p2 ")
    assert indent_of(lines, "[current") > indent_of(lines, "p1 ")
    current_at = next(i for i, ln in enumerate(lines) if "[current" in ln)
    p1_at = next(i for i, ln in enumerate(lines) if ln.strip().startswith("p1 "))
    assert p1_at < current_at, lines

    # A point after the rollback is exact; old points still are.
    model[:] = saved["p1"].read_bytes()
    scribble(200)
    snap("p3")
    assert live.rpfs.point("vm", "p3")["method"] == "tracked"
    assert_same_bytes(live.point("vm", "p3"), live.disk("vm"))
    assert_same_bytes(live.point("vm", "p1"), saved["p1"])
    assert_same_bytes(live.point("vm", "p2"), saved["p2"])
    changed = blocks_of(
        json.loads(live.rpfs("changed", "vm@p1", "vm@p3", "--json", check=True).stdout)
    )
    assert changed == differing_blocks(saved["p1"].read_bytes(), saved["p3"].read_bytes())

    # The rolled-back disk cloned again is exact.
    live.rpfs("clone", "vm@p3", "x", check=True)
    live.open("x", os.O_RDONLY)
    assert_same_bytes(live.disk("x"), saved["p3"])

    # Rollback without a daemon, to the branch's newest point.
    scribble(50)
    live.unmount()
    live.rpfs("rollback", "vm@p2", check=True)
    live.start()
    live.open("vm", os.O_RDONLY)
    live.open("x", os.O_RDONLY)
    assert_same_bytes(live.disk("vm"), saved["p2"])
    for name in ("p1", "p2", "p3"):
        assert_same_bytes(live.point("vm", name), saved[name])
    assert_same_bytes(live.disk("x"), saved["p3"])
    fd = live.open("vm")
    model[:] = saved["p2"].read_bytes()
    scribble(100)
    snap("p4")
    lines = tree_lines(live, "vm")
    assert sum("[branch" in ln for ln in lines) == 2 and sum("[current" in ln for ln in lines) == 1
    assert indent_of(lines, "p4 ") > indent_of(lines, "p2 "), lines

    # Back to a point of the other abandoned branch: the head reads lineage 1 up to p2,
    # p3 reads it up to p1, and each reads a lineage the other does not.
    live.close("vm")
    live.wait_state("vm", 0)
    live.rpfs("rollback", "vm@p3", check=True)
    live.open("vm", os.O_RDONLY)
    assert_same_bytes(live.disk("vm"), saved["p3"])
    assert_same_bytes(live.point("vm", "p4"), saved["p4"])


@pytest.mark.timeout(180)
def test_changed_and_allocated_against_the_writes(live, tmp_path):
    size = 32 * MiB
    live.create("ch", size)
    fd = live.open("ch")
    rng = random.Random(11)
    log: list[tuple[int, int]] = []  # (offset, length) of every write, in order
    seq = 0

    def write(off: int, data: bytes) -> None:
        os.pwrite(fd, data, off)
        log.append((off, len(data)))

    def records(n: int, slots: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            slot = rng.randrange(slots)
            write(slot * SLOT, record(seq, slot))

    # Phase A: records in the lower half, whole blocks of data in the upper half.
    records(300, size // 2 // SLOT)
    upper = list(range(size // 2 // BS, size // 2 // BS + 40))
    for b in upper:
        write(b * BS, os.urandom(BS))
    os.fsync(fd)
    live.snapshot("ch", name="a")
    mark = len(log)
    # Phase B: more records in the lower half; zeros over one data block; one data block
    # rewritten with the bytes it already holds.
    records(200, size // 2 // SLOT)
    zeroed, same = upper[3], upper[7]
    write(zeroed * BS, bytes(BS))
    write(same * BS, os.pread(fd, BS, same * BS))
    os.fsync(fd)
    live.snapshot("ch", name="b")
    points = {p["name"]: p for p in live.wait_complete("ch")}

    img_a = read_image(live.point("ch", "a"))
    img_b = read_image(live.point("ch", "b"))
    written = set()
    for off, length in log[mark:]:
        written.update(range(off // BS, -(-(off + length) // BS)))
    out = live.rpfs("changed", "ch@a", "ch@b", "--json", check=True).stdout
    changed = blocks_of(json.loads(out))
    assert changed == written - {same}, (
        f"missing {sorted(written - {same} - changed)[:10]}, extra {sorted(changed - written)[:10]}"
    )
    assert changed == differing_blocks(img_a, img_b)
    assert points["b"]["blocks_written"] == len(changed)

    for name, img in (("a", img_a), ("b", img_b)):
        extents = json.loads(live.rpfs("allocated", f"ch@{name}", "--json", check=True).stdout)
        allocated = blocks_of(extents)
        assert allocated == nonzero_blocks(img), f"allocated of ch@{name}"
        assert points[name]["allocated_bytes"] == sum(e["length"] for e in extents)
    assert zeroed not in blocks_of(
        json.loads(live.rpfs("allocated", "ch@b", "--json", check=True).stdout)
    )

    # One repository feeds another: a full capture of a, then b with only the changes.
    other = tmp_path / "other-repo"
    changed_file = tmp_path / "changed.json"
    changed_file.write_text(out)
    live.rpfs("-r", other, "init", check=True)
    live.rpfs("-r", other, "capture", "copy", live.point("ch", "a"), "--name", "a", check=True)
    live.rpfs(
        "-r",
        other,
        "capture",
        "copy",
        live.point("ch", "b"),
        "--name",
        "b",
        "--changed",
        changed_file,
        check=True,
    )
    copy_b = json.loads(live.rpfs("-r", other, "points", "copy", "--json", check=True).stdout)[-1]
    assert copy_b["name"] == "b" and copy_b["method"] == "changed-list", copy_b
    assert copy_b["blocks_written"] == len(changed), copy_b
    restored = tmp_path / "copy-b.img"
    live.rpfs("-r", other, "restore", "copy@b", restored, check=True)
    assert restored.read_bytes() == img_b


@pytest.mark.timeout(120)
def test_bad_input_gives_one_line_errors(live, tmp_path):
    src = tmp_path / "cap.img"
    write_random(src, 4 * MiB, seed=5)
    live.rpfs.capture("cap", src, "c1")
    live.create("d", 8 * MiB)
    live.create("e", 8 * MiB)
    live.snapshot("d", name="p1")
    live.snapshot("e", name="q1")
    cases = [
        (("snapshot", "nosuch"), ("nosuch",)),
        (("snapshot", "d", "nosuch", "--name", "p9"), ("nosuch",)),
        (("snapshot", "cap"), ("cap", "only recovery points")),
        (("snapshot", "d", "--name", "p1"), ("d@p1", "already exists")),
        (("snapshot", "d", "--name", "bad/name"), ("bad/name",)),
        (("rollback", "d@nosuch"), ("nosuch",)),
        (("rollback", "cap@c1"), ("cap", "only recovery points")),
        (("changed", "d@p1", "e@q1"), ("do not share a history",)),
        (("changed", "d@p1", "cap@c1"), ("do not share a history",)),
        (("changed", "d@p1", "d@nosuch"), ("nosuch",)),
    ]
    before = live.rpfs.points()
    for daemon in (True, False):
        if not daemon:
            live.unmount()
        for args, needles in cases:
            assert_one_line_error(live.rpfs(*args), *needles)
        assert live.rpfs.points() == before, f"a failed command changed the points ({daemon=})"


# -- known bugs: each test fails on the current rpfs ------------------------------------------


@pytest.mark.timeout(240)
def test_snapshot_during_fsyncs_does_not_deadlock(live):
    live.create("dl", 16 * MiB)
    writers = [live.writer("dl", seed=s) for s in (1, 2)]  # two fsync streams
    for writer in writers:
        writer.wait_writes(20)
    for i in range(30):
        t0 = time.monotonic()
        try:
            live.rpfs("snapshot", "dl", "--name", f"s{i}", check=True, timeout=10)
        except subprocess.TimeoutExpired:
            for writer in writers:
                writer.stop_file.touch()
            live.kill_daemon()
            raise AssertionError(f"snapshot {i} hung (> 10 s): the daemon deadlocked") from None
        assert time.monotonic() - t0 < SNAPSHOT_BOUND
    for writer in writers:
        writer.stop()


@pytest.mark.timeout(180)
def test_unchanged_points_ride_on_the_archiving_one(live):
    """Snapshots with nothing written since a point still archiving do not wait for it:
    they read as it does and complete with it, also after a SIGKILL."""
    size = 768 * MiB  # archived in ~3 s here; a snapshot takes ~0.2 s
    live.create("rd", size)
    expected = live.tmp / "rd.expected"  # compared piece by piece: no 768 MiB copies
    fd = live.open("rd")
    with open(expected, "wb") as f:
        for off in range(0, size, MiB):
            piece = os.urandom(MiB)
            os.pwrite(fd, piece, off)
            f.write(piece)
    os.fsync(fd)
    live.close("rd")
    assert image_matches(live.disk("rd"), expected)
    live.snapshot("rd", name="a")
    live.snapshot("rd", name="b")
    res = live.rpfs("snapshot", "rd", "--name", "c", check=True)
    assert "complete with it" in res.stdout, res.stdout
    # The last blocks are archived last: read them from the riders first.
    tail = size - 16 * MiB
    for n in "bc":
        assert image_matches(live.point("rd", n), expected, start=tail), f"rd@{n}"
    points = {p["name"]: p for p in live.rpfs.points("rd")}
    live.kill_daemon()  # all three still pending (checked next), nothing archives now
    # 768 MiB take longer to archive than two snapshots and those reads: a was pending
    # all along, so b and c are riders (a daemon without riders waited for a's archive
    # in b's snapshot).
    assert points["a"]["state"] == "archiving", points["a"]
    for n in "bc":
        assert points[n]["state"] == "archiving" and points[n]["frozen_blocks"] == 0, points[n]
    table = live.rpfs("points", "rd", check=True).stdout
    assert table.count("archiving with a") == 2, table
    # A rollback without the daemon says what it waits for, finishes the archive (a's
    # riders with it) and rolls back.
    res = live.rpfs("rollback", "rd@b", check=True)
    assert "rd@a is still being archived" in res.stderr, res.stderr
    live.start()
    done = {p["name"]: p for p in live.rpfs.points("rd")}
    assert [done[n]["state"] for n in "abc"] == ["complete"] * 3, done
    assert done["b"]["allocated_blocks"] == done["c"]["allocated_blocks"] == size // BS
    assert done["b"]["blocks_written"] == done["c"]["blocks_written"] == 0
    for n in "abc":
        assert image_matches(live.point("rd", n), expected), f"rd@{n} after the restart"
    assert image_matches(live.disk("rd"), expected)
    # After the kill the map is not trusted: d compares every block. A write while d is
    # archiving makes e a point of its own (it waits for d), with just that block.
    fd = live.open("rd")
    live.snapshot("rd", name="d")
    assert live.rpfs.point("rd", "d")["method"] == "full-compare"
    os.pwrite(fd, b"x" * 4096, 0)
    os.fsync(fd)
    live.snapshot("rd", name="e")
    e = live.rpfs.point("rd", "e")
    assert e["method"] == "tracked" and e["frozen_blocks"] == 1, e
    live.wait_complete("rd")
    assert image_matches(live.point("rd", "d"), expected)
    assert read_at(live.point("rd", "e"), 0, 4096) == b"x" * 4096
    assert image_matches(live.point("rd", "e"), expected, start=4096)


@pytest.mark.timeout(120)
def test_point_reads_correctly_while_archiving(live):
    live.create("ar")
    fd = live.open("ar")
    for rnd in range(3):
        data = os.urandom(32 * MiB)
        for off in range(0, len(data), MiB):
            os.pwrite(fd, data[off : off + MiB], off)
        os.fsync(fd)
        expected = read_image(live.disk("ar"))
        live.snapshot("ar", name=f"r{rnd}")
        image = live.point("ar", f"r{rnd}")
        first = read_buffered(image)  # right away, as sha256sum or a VM would
        state = live.rpfs.point("ar", f"r{rnd}")["state"]
        for off in range(0, len(data), BS):  # copy-before-write of every block
            os.pwrite(fd, os.urandom(4096), off + 8192)
        again = read_image(image)
        live.wait_complete("ar")
        later = read_buffered(image)
        for what, got in (
            ("right away", first),
            ("after overwriting", again),
            ("after archiving (page cache)", later),
        ):
            bad = differing_blocks(got, expected)
            assert not bad, (
                f"ar@r{rnd} read {what} differs from the disk at the snapshot in "
                f"{len(bad)} blocks (state after the first read: {state})"
            )


@pytest.mark.timeout(120)
def test_rollback_after_sigkill_is_exact(live, tmp_path):
    live.create("k", 4 * MiB)
    fd = live.open("k")
    os.pwrite(fd, b"A" * BS, 0)
    os.fsync(fd)
    live.snapshot("k", name="k1")
    live.wait_complete("k")
    saved = read_image(live.point("k", "k1"))
    os.pwrite(fd, b"B" * 4096, 0)  # not fsynced: the block's persisted state stays PRESENT
    live.kill_daemon()
    live.start()
    live.rpfs("rollback", "k@k1", check=True)
    live.open("k", os.O_RDONLY)
    assert read_image(live.disk("k")) == saved, "the disk after rollback is not k@k1"


@pytest.mark.timeout(120)
def test_refused_group_snapshot_leaves_the_disks_usable(live):
    live.create("a", 4 * MiB)
    live.create("b", 4 * MiB)
    live.snapshot("b", name="dup")
    fd = live.open("a")
    os.pwrite(fd, b"E" * BS, 3 * BS)
    os.fsync(fd)
    res = live.rpfs("snapshot", "a", "b", "--name", "dup")
    assert_one_line_error(res, "b@dup", "already exists")
    assert [p["name"] for p in live.rpfs.points("a")] == []
    os.pwrite(fd, b"F" * BS, 3 * BS)  # EIO on the current rpfs
    os.fsync(fd)
    live.snapshot("a", name="after")
    live.wait_complete("a")
    assert_same_bytes(live.point("a", "after"), live.disk("a"))
