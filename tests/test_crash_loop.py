"""A bounded SIGKILL loop: the daemon dies at seeded random moments and nothing is lost.

Each round mounts the repository, starts the writer (livewriter.py: fsynced 4 KiB
records) on a disk, and kills the daemon with SIGKILL while one of these goes on:

- writes: only the writer;
- archiving: a point of the written disk taken over tens of MiB of fresh data, killed
  while its snapshot command or (mostly) its background archiving runs;
- hydration: `rpfs hydrate` of a fresh clone (in the daemon) while the writer writes to it;
- capture: `rpfs capture` of a raw image file into another disk (its own process, killed
  too in some rounds).

Then it clears the dead mount, mounts again and checks: the disk holds every write whose
fsync returned (and is a prefix of the writer's log: no torn or foreign bytes); a point
taken in the round is one instant of the disk; archiving resumes and completes; a
hydration resumes and the clone reads the right bytes; a capture either made its point
or left none (and the next one succeeds); every point taken so far still reads bit for bit
what it must (the written disk's points against the hash of their instant, captured points
against a saved copy of their source). At the end, after a clean remount, all of them again.

The choices (order, data, delays) come from one seed, named in every failure message;
`RPFS_CRASH_SEED=N` replays them (where each kill lands also depends on timing). The
default run has 20 kills; `scripts/test -m slow -k crash_loop` runs the 100-kill one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import BS, MiB, assert_check_clean, sparse_copy
from livewriter import Live, Write, check_instant, image_matches, prefix_of, read_image

SIZE = 128 * MiB  # every disk and capture source: each activity takes a few tenths of a second
BULK = 48  # MiB written before an archiving round's snapshot (frozen blocks to archive)
CHANGED = 24  # MiB of the capture source changed before each capture
SCENARIOS = ("writes", "archiving", "hydration", "capture")
CHECK_AT_MOST = 16  # points read per round; beyond, the round's own and a seeded sample
WAIT = 60.0  # seconds any step may take before it counts as stuck


def seeded_source(path: Path, rng: random.Random) -> None:
    """A raw image of random data, compressible text and holes, one MiB at a time."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for mib in range(SIZE // MiB):
            kind = rng.random()
            if kind < 0.25:
                continue  # a hole
            f.seek(mib * MiB)
            f.write(text_mib(mib) if kind < 0.4 else rng.randbytes(MiB))


def text_mib(mib: int) -> bytes:
    return (f"MiB {mib} of the crash loop's source\n".encode() * (MiB // 16))[:MiB]


def change_source(path: Path, rng: random.Random) -> None:
    """What a capture finds changed: whole MiB of new data, text or zeros, and a few
    4 KiB pieces across block boundaries."""
    with open(path, "r+b") as f:
        for _ in range(CHANGED):
            mib = rng.randrange(SIZE // MiB)
            kind = rng.random()
            f.seek(mib * MiB)
            f.write(
                bytes(MiB) if kind < 0.2 else text_mib(mib) if kind < 0.3 else rng.randbytes(MiB)
            )
        for _ in range(8):
            f.seek(rng.randrange(1, SIZE // BS) * BS - 2048)
            f.write(rng.randbytes(4096))


def sha256_image(path: Path) -> str:
    """The hash of what the daemon serves now (O_DIRECT, not the page cache)."""
    return hashlib.sha256(read_image(path)).hexdigest()


def wait_connected(proc: subprocess.Popen) -> None:
    """Until a CLI command holds a socket (it talks to the daemon) or has exited.

    Killed before it reads the daemon lock, it would run on the repository itself, next
    to the daemon mounted after the kill.
    """
    deadline = time.monotonic() + WAIT
    while proc.poll() is None:
        with contextlib.suppress(OSError):  # an fd closed while we look
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("socket:") for fd in fds):
                return
        assert time.monotonic() < deadline, f"{proc.args} did not reach the daemon in {WAIT}s"
        time.sleep(0.002)


def sleep_watching(seconds: float, proc: subprocess.Popen) -> int | None:
    """Sleep; returns when (monotonic ns) `proc` was first seen exited meanwhile, if it did."""
    exited = None
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        if exited is None and proc.poll() is not None:
            exited = time.monotonic_ns()
        time.sleep(min(0.002, deadline - now))
    if exited is None and proc.poll() is not None:
        exited = time.monotonic_ns()
    return exited


@dataclass
class Figures:
    kills: Counter = field(default_factory=Counter)  # per scenario
    landed: Counter = field(default_factory=Counter)  # kills while the activity still ran
    acked: int = 0  # acknowledged writes found in their disk after a kill
    points: int = 0  # point images read and compared
    seconds: float = 0.0

    def __str__(self) -> str:
        per = ", ".join(f"{s} {self.kills[s]} ({self.landed[s]} during it)" for s in SCENARIOS)
        return (
            f"{sum(self.kills.values())} kills ({per}); {self.acked} acknowledged writes "
            f"checked; {self.points} point reads checked; {self.seconds:.0f} s"
        )


class CrashLoop:
    """The loop's state: the model of the written disk and what every point must read."""

    def __init__(self, live: Live, seed: int) -> None:
        self.live = live
        self.rpfs = live.rpfs
        self.seed = seed
        self.rng = random.Random(seed)
        self.sampler = random.Random(f"{seed}:sample")  # point sets vary with timing
        self.saved = live.tmp / "saved"  # sources of captured points, as they were
        self.saved.mkdir()
        self.golden = self.saved / "golden@base.img"
        self.cap_src = live.tmp / "cap.img"
        self.vm = bytearray(SIZE)  # the written disk "vm", as last checked
        self.next_seq = 1
        self.sums: dict[str, str] = {}  # "vm@point": sha256 of the instant it must be
        self.copies: dict[str, Path] = {}  # "disk@point": a copy of its captured source
        self.window: dict[str, float] = {}  # seconds: when a round's kill may land (see run)
        self.figures = Figures()

    @contextlib.contextmanager
    def replayable(self, what: str) -> Iterator[None]:
        """Every failure names the seed, the round and the kill."""
        try:
            yield
        except (Exception, pytest.fail.Exception) as exc:  # a timeout is a pytest.fail
            raise AssertionError(f"RPFS_CRASH_SEED={self.seed}, {what}: {exc}") from exc

    # -- setup: the sources, the disks, and how long each activity takes -------------------

    def setup(self) -> None:
        """First points, and how long each activity takes when not killed (with the
        writer on, from the moment a command reaches the daemon)."""
        seeded_source(self.golden, self.rng)
        self.rpfs.capture("golden", self.golden, "base")
        self.copies["golden@base"] = self.golden
        seeded_source(self.cap_src, self.rng)
        self.live.create("vm", SIZE)
        self.bulk_write()
        base = bytes(self.vm)
        writer = self.start_writer("vm")
        self.rpfs("clone", "golden@base", "h0", check=True)
        for scenario, disk, name in (
            ("capture", "cap", "c0"),
            ("hydration", "h0", None),
            ("archiving", "vm", "a0"),
        ):
            t0 = time.monotonic_ns()  # the snapshot's, the last one
            proc = self.launch(scenario, disk, name)
            started = time.monotonic()
            assert proc.wait(WAIT) == 0, f"{proc.args} failed: {proc.communicate()[1]}"
            t1 = time.monotonic_ns()
            while (
                scenario == "archiving"
                and self.rpfs.point_record(disk, name)["state"] != "complete"
            ):
                assert time.monotonic() < started + WAIT, f"{disk}@{name} still archiving"
                time.sleep(0.01)
            self.window[scenario] = time.monotonic() - started
        print("untimed:", ", ".join(f"{s} {t:.3f} s" for s, t in self.window.items()))
        self.copies["cap@c0"] = self.saved / "cap@c0.img"
        self.rpfs("disk", "delete", "h0", check=True)
        writes = writer.stop()
        self.check_disk("vm", base, writes, "after setup")
        self.sums["vm@a0"] = self.instant("a0", base, writes, t0, t1)

    def launch(self, scenario: str, disk: str, name: str | None) -> subprocess.Popen:
        """Start the command of a round's activity; returns once it reached the daemon
        (a capture does not use the daemon: at once, after saving its source)."""
        if scenario == "capture":
            sparse_copy(self.cap_src, self.saved / f"cap@{name}.img")
            args = ("capture", disk, self.cap_src, "--name", name)
        elif scenario == "hydration":
            args = ("hydrate", disk)
        else:
            args = ("snapshot", disk, "--name", name)
        proc = self.rpfs.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if scenario != "capture":
            wait_connected(proc)
        return proc

    def start_writer(self, disk: str):
        writer = self.live.writer(disk, first_seq=self.next_seq, seed=self.rng.randrange(2**32))
        writer.wait_writes(20)
        return writer

    def bulk_write(self) -> None:
        """BULK MiB of new data at seeded places of vm, fsynced: blocks for a point to archive."""
        fd = self.live.open("vm")
        for _ in range(BULK):
            off = self.rng.randrange(SIZE // MiB) * MiB
            data = self.rng.randbytes(MiB)
            os.pwrite(fd, data, off)
            self.vm[off : off + MiB] = data
        os.fsync(fd)
        self.live.close("vm")

    # -- checks ------------------------------------------------------------------------------

    def check_disk(self, disk: str, base: bytes, writes: list[Write], when: str) -> None:
        """The disk is its base plus a prefix of the writes holding every acknowledged one;
        the model of vm follows it."""
        image = read_image(self.live.disk(disk))
        m = prefix_of(image, base, writes, f"disk {disk} {when}")
        acked = [w.seq for w in writes if w.acked is not None]
        assert m >= max(acked, default=0), (
            f"disk {disk} {when} lost acknowledged writes: it holds writes up to {m}, "
            f"writes up to {max(acked)} were acknowledged"
        )
        self.figures.acked += len(acked)
        if writes:
            self.next_seq = max(w.seq for w in writes) + 1
        if disk == "vm":
            self.vm[:] = image

    def instant(self, name: str, base: bytes, writes: list[Write], t0: int, t1: int) -> str:
        """Check vm@name as one instant of vm between t0 and t1; returns its hash."""
        image = read_image(self.live.point("vm", name))
        check_instant(image, base, writes, t0, t1, f"vm@{name}")
        self.figures.points += 1
        return hashlib.sha256(image).hexdigest()

    def check_points(self, own: set[str], every: bool = False) -> None:
        """The round's points and the others (a seeded sample if there are many) read what
        they must; no point appeared or vanished."""
        listed = {f"{p['disk']}@{p['name']}" for p in self.rpfs.points()}
        known = set(self.sums) | set(self.copies)
        assert listed == known, (
            f"points {sorted(listed - known)} appeared, {sorted(known - listed)} vanished"
        )
        others = sorted(known - own)
        if not every and len(known) > CHECK_AT_MOST:
            others = self.sampler.sample(others, CHECK_AT_MOST - len(own))
        for ref in sorted(own & known) + others:
            disk, name = ref.split("@")
            image = self.live.point(disk, name)
            if ref in self.copies:
                assert image_matches(image, self.copies[ref]), f"{ref} differs from its source"
            else:
                assert sha256_image(image) == self.sums[ref], f"{ref} no longer reads its instant"
            self.figures.points += 1

    def archived(self) -> None:
        """Archiving resumed after the remount and completes."""
        points = self.live.wait_complete(timeout=WAIT)
        assert all(p["state"] == "complete" for p in points), points

    # -- one round -----------------------------------------------------------------------------

    def round(self, r: int, scenario: str, delay: float) -> tuple[bool, float | None]:
        """One round; returns whether the kill landed during its activity, and how long
        its command took if it was seen to end before the kill."""
        live = self.live
        disk = f"h{r}" if scenario == "hydration" else "vm"
        name = {"archiving": f"a{r}", "capture": f"c{r}"}.get(scenario)
        if scenario == "hydration":
            self.rpfs("clone", "golden@base", disk, check=True)
            base = self.golden.read_bytes()
        else:
            if scenario == "archiving":
                self.bulk_write()
            base = bytes(self.vm)
        if scenario == "capture":
            change_source(self.cap_src, self.rng)
        kill_capture = scenario == "capture" and self.rng.random() < 0.5
        writer = self.start_writer(disk)

        t0 = time.monotonic_ns()
        proc = None
        exited = None  # when the command was seen done, if before the kill
        if scenario == "writes":
            time.sleep(delay)
        else:
            proc = self.launch(scenario, "cap" if scenario == "capture" else disk, name)
            launched = time.monotonic_ns()
            exited = sleep_watching(delay, proc)
        running = proc is not None and exited is None
        live.kill_daemon()
        t_kill = time.monotonic_ns()
        if kill_capture:
            sleep_watching(self.rng.uniform(0, 0.2), proc)
            proc.kill()  # our own child, by pid
        err = proc.communicate(timeout=WAIT)[1].decode() if proc else ""
        assert exited is None or proc.returncode == 0, f"{proc.args} failed unkilled: {err}"
        writer.proc.wait(WAIT)  # its next write fails: the daemon is gone
        writes = writer.stop()
        assert writes[-1].acked is None, "the writer did not see the daemon die"
        # Where the kill landed, from the repository as the daemon left it.
        if scenario == "archiving" and not running:
            with contextlib.suppress(AssertionError):  # no such point
                running = self.rpfs.point_record(disk, name)["state"] == "archiving"
        if scenario == "hydration":
            running = self.disk_record(disk)["hydrated_pct"] < 100
        if scenario == "writes":
            running = True  # the writer saw the daemon die (asserted above)

        live.start()
        own = set()
        if scenario == "hydration":
            # Resume first: reading the clone would copy every missing block on the way.
            self.rpfs("hydrate", disk, check=True, timeout=WAIT)
            assert self.disk_record(disk)["hydrated_pct"] == 100, self.disk_record(disk)
        self.check_disk(disk, base, writes, "after the kill")
        if scenario == "archiving":
            returned = exited if proc.returncode == 0 else None
            if name in {p["name"] for p in self.rpfs.points(disk)}:  # read while it archives
                self.sums[f"vm@{name}"] = self.instant(name, base, writes, t0, returned or t_kill)
                own.add(f"vm@{name}")
            else:
                assert returned is None, f"vm@{name}: the snapshot returned, but no point"
        self.archived()
        if scenario == "capture":
            ref, copy = f"cap@{name}", self.saved / f"cap@{name}.img"
            if proc.returncode != 0 and name not in {p["name"] for p in self.rpfs.points("cap")}:
                assert proc.returncode == -signal.SIGKILL, f"capture {name} failed: {err}"
                self.rpfs.capture("cap", self.cap_src, name)  # the dead one's rows are reaped
            self.copies[ref] = copy
            own.add(ref)
        if scenario == "hydration":
            self.rpfs("disk", "delete", disk, check=True)
        self.check_points(own)
        if exited is None or scenario == "archiving":  # archiving goes on after its command
            return running, None
        return running, (exited - launched) / 1e9

    def disk_record(self, disk: str) -> dict:
        disks = json.loads(self.rpfs("disks", "--json", check=True).stdout)
        return next(d for d in disks if d["name"] == disk)

    def run(self, kills: int) -> None:
        """Setup, `kills` rounds (each scenario once in every four), the final check.

        A round's kill lands at a uniform moment of a window that starts as the activity's
        duration in setup and follows it: 0.8 of the duration seen when the command ended
        before the kill; else a tenth longer after a kill during the activity, a fifth shorter
        after one that came too late.
        """
        start = time.monotonic()
        with self.replayable("setup"):
            self.setup()
        order: list[str] = []
        while len(order) < kills:
            order += self.rng.sample(SCENARIOS, len(SCENARIOS))
        for r, scenario in enumerate(order[:kills], start=1):
            delay = self.rng.uniform(0.02, self.window.get(scenario, 1.0))
            with self.replayable(f"round {r}/{kills} ({scenario}, kill after {delay:.3f} s)"):
                during, took = self.round(r, scenario, delay)
            when = "during" if during else "after"
            print(f"round {r} {scenario}: killed {delay:.3f} s in, {when} it")
            self.figures.kills[scenario] += 1
            self.figures.landed[scenario] += during
            if took is not None:  # the command's exit comes a little after its work
                self.window[scenario] = 0.8 * took
            elif scenario != "writes":
                self.window[scenario] *= 1.1 if during else 0.8
        with self.replayable("after the last kill"):
            self.finish()
        self.figures.seconds = time.monotonic() - start

    def finish(self) -> None:
        """A clean remount: every point and the written disk read what they must."""
        self.live.unmount()
        self.live.start()
        assert sha256_image(self.live.disk("vm")) == hashlib.sha256(self.vm).hexdigest(), "vm"
        self.check_points(set(), every=True)
        assert_check_clean(self.rpfs)


def crash_seed() -> int:
    return int(os.environ.get("RPFS_CRASH_SEED") or random.SystemRandom().randrange(2**32))


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(20, marks=pytest.mark.timeout(600)),
        pytest.param(100, marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
    ],
)
def test_sigkill_loop_keeps_acknowledged_writes_and_points(live, kills):
    loop = CrashLoop(live, crash_seed())
    print(f"RPFS_CRASH_SEED={loop.seed}")
    loop.run(kills)
    print(loop.figures)
    for copy in loop.saved.iterdir():  # kept when the test fails, for a look
        copy.unlink()
