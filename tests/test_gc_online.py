"""`rpfs gc` through the daemon, compacting every pack (`--threshold 1`), under load and
under SIGKILL.

Under load: while GC rounds rewrite every pack, a reader loops `cmp` over every point
image (read with O_DIRECT, so every pass reads through the daemon) against saved
copies, `fio` writes and crc32c-verifies a clone, and a capture of a new point runs in
its own process. The daemon holds every chunk fetch that starts during a gc until that
gc has ended (a fault hook), so readers do meet packs GC deleted under them. No read
fails or differs, fio finds no error, the new point is exact, `check` is clean, and the
packs there before are all gone.

Under SIGKILL: the daemon is killed at seeded random moments of a `gc --threshold 1` and
at chosen ones (fault hooks, tests/faults/sitecustomize.py: at the K-th chunk moved to
its copy, just after the compaction note is written, after a retired pack's deletion),
until 20 kills landed during a gc; after each restart `check` is clean and every point
and the clone read exactly; a last gc completes, leaving pack bytes within 10 % of the
live stored bytes. RPFS_GC_KILL_SEED=N replays the choices (where a timed kill lands
depends on timing).

Two races found here have in-process tests of their own: a reader whose relocated
chunk moved again, and a capture that started while gc swept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    MiB,
    armed,
    assert_check_clean,
    churn,
    fio_errors,
    point_image,
    read_at,
    sha256_file,
    wait_pid_exit,
    write_random,
)

from rpfs import capture as capture_module
from rpfs.capture import capture
from rpfs.disks.point import open_point
from rpfs.lineage import reads
from rpfs.maintenance import gc
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache

WAIT = 120.0  # seconds a command may take before it counts as stuck


def _pack_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "packs").glob("*.pack")}


def _history(rpfs, tmp: Path, size: int, points: int, pieces: int, piece: int, seed: int
             ) -> dict[str, Path]:
    """Captures vm@p1..pN of a random source, each after `pieces` of `piece` bytes were
    rewritten; {point name: a saved copy of what it must read}."""
    rng = random.Random(seed)
    source = tmp / "vm.img"
    write_random(source, size, seed=seed)
    (tmp / "saved").mkdir()
    saved = {}
    for i in range(1, points + 1):
        if i > 1:
            churn(source, rng, pieces, piece)
        rpfs("capture", "vm", source, "--name", f"p{i}", check=True)
        saved[f"p{i}"] = shutil.copyfile(source, tmp / "saved" / f"p{i}.img")
    return saved


def _gc(rpfs, *extra: str) -> dict:
    res = rpfs("gc", "--threshold", "1", "--json", *extra, timeout=WAIT)
    assert res.returncode == 0, f"rpfs gc: {res.returncode} {res.stdout} {res.stderr}"
    return json.loads(res.stdout)


def _cmp_direct(image: Path, copy: Path) -> subprocess.CompletedProcess:
    """`cmp` of an image read with O_DIRECT (dd) against a saved copy. Direct reads go to
    the daemon every time (point images keep the page cache) and show its every EIO (the
    kernel retries a failed readahead page with a read of its own, which can hide one)."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         'dd if="$1" iflag=direct bs=1M status=none | cmp - "$2"', "cmp", image, copy],
        capture_output=True, text=True, timeout=WAIT)


def test_a_reader_whose_relocated_chunk_moves_again_reads_the_newest_copy(tmp_path):
    """A reader finds its chunk's pack gone and looks the chunk up again (relocate); a
    second gc moves the chunk on and deletes that pack too before the reader gets there:
    the reader looks it up once more and reads the newest copy, not EIO."""
    Repository.init(tmp_path / "repo", 4096).close()
    source = tmp_path / "vm.img"
    write_random(source, 64 * 4096, seed=3)
    with Repository(tmp_path / "repo") as repo:
        capture(repo, "vm", source, point="p1")
        with repo.index.read() as txn:
            digest, first = next(iter(repo.index.iter_chunks(txn)))
        gc.run(repo, threshold=1.0)  # moved, its first pack deleted
        lookups = []

        def relocate(d: bytes):
            lookups.append(repo.locate(d))
            if len(lookups) == 1:
                gc.run(repo, threshold=1.0)  # moved again before the reader reads
            return lookups[-1]

        block = repo.store.get_many([(first, digest)], relocate=relocate)[0]
        assert isinstance(block, bytes), block
        assert block == read_at(source, _offset_of(repo, digest), 4096)
        assert len({(loc.pack, loc.offset) for loc in [first, *lookups]}) == 3, lookups


def _offset_of(repo: Repository, digest: bytes) -> int:
    """Where in disk vm the block that reads chunk `digest` is."""
    with repo.index.read() as txn:
        point = repo.index.get_point(txn, "vm", "p1")
        chain = repo.index.chain(txn, point.lineage, point.gen)
        return 4096 * next(b for b, v in reads(repo.index, txn, chain).items() if v == digest)


def test_a_capture_that_starts_while_gc_sweeps_keeps_its_pack(tmp_path, monkeypatch):
    """A capture starts after gc took its fence (while it sweeps: that can take a while)
    and has appended its records, not yet registered them, when gc lists the packs: its
    new pack is not sealed, gc leaves it alone, and the point reads exactly."""
    Repository.init(tmp_path / "repo", 4096).close()
    source = tmp_path / "vm.img"
    write_random(source, 64 * 4096, seed=4)
    with Repository(tmp_path / "repo") as repo:
        appended, go = threading.Event(), threading.Event()
        flush = capture_module._Capture._flush

        def flush_later(self, capture_id):  # all appended, nothing registered yet
            appended.set()
            assert go.wait(30)
            return flush(self, capture_id)

        monkeypatch.setattr(capture_module._Capture, "_flush", flush_later)
        writer = threading.Thread(target=capture, args=(repo, "vm", source, "p1"))
        sweep = gc._sweep

        def capture_starts_meanwhile(*args):
            writer.start()
            assert appended.wait(30)
            return sweep(*args)

        monkeypatch.setattr(gc, "_sweep", capture_starts_meanwhile)
        try:
            done = gc.run(repo, threshold=1.0)
        finally:
            go.set()
            writer.join(30)
        assert done["packs_deleted"] == 0, done
        with ChunkCache(repo) as cache:
            image = open_point(repo, cache, "vm", "p1")
            assert image.read(0, image.size) == source.read_bytes()


class _Loop(threading.Thread):
    """Runs `step()` until told to stop and it has run at least `least` times; an
    exception in a step is kept (and ends the loop) for the test to raise."""

    def __init__(self, step, least: int) -> None:
        super().__init__(daemon=True)
        self.step, self.least = step, least
        self.stop = threading.Event()
        self.runs = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() or self.runs < self.least:
                self.step()
                self.runs += 1
        except BaseException as exc:  # re-raised by the test (finish)
            self.error = exc

    def finish(self, timeout: float) -> int:
        self.stop.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.step.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.runs


FIO_SIZE = 24 * MiB


def test_gc_compacts_every_pack_while_reads_fio_and_a_capture_run(rpfs, repo, mount,
                                                                   tmp_path):
    saved = _history(rpfs, tmp_path, 128 * MiB, points=4, pieces=6, piece=4 * MiB, seed=21)
    with armed(rpfs, reads_wait_for_gc=1):  # reads that cross a gc, forced (see faults)
        mnt, _ = mount()
    rpfs("clone", "vm@p2", "c", check=True)
    rpfs("point", "delete", "vm@p1", "vm@p3", "--purge", check=True)  # packs part dead
    kept = {name: saved[name] for name in ("p2", "p4")}
    # The new point: p4 with p1's pieces back (chunks unreferenced now: GC frees them
    # meanwhile, or the capture protects them) and some new data.
    source = shutil.copyfile(saved["p4"], tmp_path / "p5.img")
    with open(saved["p1"], "rb") as old, open(source, "r+b") as f:
        for at in range(0, 128 * MiB, 16 * MiB):
            old.seek(at)
            f.seek(at)
            f.write(old.read(2 * MiB))
    churn(source, random.Random(5), 4, 2 * MiB)
    before = _pack_files(repo)
    assert len(before) >= 4, before

    mismatches: list[str] = []

    def read_points() -> None:
        for name, copy in kept.items():
            res = _cmp_direct(point_image(mnt, "vm", name), copy)
            if res.returncode != 0:
                mismatches.append(f"{name}: {res.stdout}{res.stderr}")

    rounds: list[dict] = []

    def gc_round() -> None:
        rounds.append(_gc(rpfs))

    # GC runs on after fio and the capture are done, and the reader after GC.
    reader, collector = _Loop(read_points, least=2), _Loop(gc_round, least=4)
    fio = subprocess.Popen(
        ["fio", "--name=v", f"--filename={mnt / 'disks' / 'c.img'}", "--rw=randwrite",
         "--bs=4k", f"--size={FIO_SIZE}", "--verify=crc32c", "--do_verify=1",
         "--verify_state_save=0", "--direct=0", "--ioengine=psync", "--randseed=21",
         "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reader.start()
        collector.start()
        time.sleep(0.5)  # the first GC round is under way
        capture = rpfs.popen("capture", "vm", source, "--name", "p5",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        captured = capture.communicate(timeout=WAIT)
        assert capture.returncode == 0, f"capture p5: {captured}"
        out, err = fio.communicate(timeout=WAIT)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        gcs = collector.finish(WAIT)
        passes = reader.finish(WAIT)
    print(f"{gcs} gc rounds, {passes} read passes over {sorted(kept)}; "
          f"{[r['packs_compacted'] for r in rounds]} packs compacted per round")
    assert mismatches == []
    assert fio.returncode == 0, f"fio failed: {out[-2000:]}{err}"
    report = json.loads(out[out.index("{"):])
    assert fio_errors(report) == []
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == FIO_SIZE
    assert all(r["stopped"] is None for r in rounds), rounds
    assert sum(r["packs_compacted"] for r in rounds) >= len(before), rounds

    _gc(rpfs)  # once more, the capture's packs too, nothing running
    assert not before & _pack_files(repo), "every pack there before GC was rewritten"
    assert_check_clean(rpfs)
    for name, copy in {**kept, "p5": source}.items():
        res = _cmp_direct(point_image(mnt, "vm", name), copy)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"

    with open(mnt / "disks" / "c.img", "rb") as clone, open(saved["p2"], "rb") as origin:
        clone.seek(FIO_SIZE)
        origin.seek(FIO_SIZE)
        while chunk := origin.read(8 * MiB):
            assert clone.read(len(chunk)) == chunk, "the clone beyond fio's range is p2's"


# -- SIGKILL during gc ----------------------------------------------------------------------


def gc_kill_seed(default: int) -> int:
    return int(os.environ.get("RPFS_GC_KILL_SEED") or default)


class KillLoop:
    """A history worth compacting, then rounds of `gc --threshold 1` through a daemon
    that is SIGKILLed during it, each followed by the checks."""

    def __init__(self, rpfs, mount, tmp: Path, seed: int) -> None:
        self.rpfs, self.mount, self.tmp = rpfs, mount, tmp
        self.mnt = tmp / "mnt"
        self.seed = seed
        self.rng = random.Random(seed)
        self.window = 0.3  # seconds: a timed kill lands this long after gc is seen copying
        self.log: list[str] = []

    def build(self) -> None:
        self.rpfs("init", check=True)
        self.saved = _history(self.rpfs, self.tmp, 32 * MiB, points=6, pieces=3,
                              piece=2 * MiB, seed=self.seed)
        self.mount(self.mnt)
        self.rpfs("clone", "vm@p2", "c", check=True)
        self.rpfs("point", "delete", "vm@p1", "vm@p3", "vm@p4", "--purge", check=True)
        for name in ("p1", "p3", "p4"):
            del self.saved[name]
        self.sums = {name: sha256_file(copy) for name, copy in self.saved.items()}
        self.sums["c"] = self.sums["p2"]
        self.rpfs("umount", self.mnt, check=True, timeout=WAIT)

    def hooks(self, r: int) -> dict[str, int]:
        """Every third round a fault hook's chosen moment; the others a timed kill."""
        kind = r % 9
        if kind == 0:
            return {"kill_at_gc_move": self.rng.randint(1, 600)}
        if kind == 3:
            return {"kill_after_gc_note": self.rng.randint(1, 3)}
        if kind == 6:
            return {"kill_after_pack_deletes": self.rng.randint(1, 2)}
        return {}

    def round(self, r: int) -> bool:
        """One gc, killed; whether the kill landed during it."""
        hooks = self.hooks(r)
        with armed(self.rpfs, **hooks):
            self.mount(self.mnt)
        victim = self.mount.daemon_pid()
        delay = self.rng.uniform(0, self.window)
        packs = _pack_files(self.rpfs.repo)
        start = time.monotonic()
        proc = self.rpfs.popen("gc", "--threshold", "1", "--json", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            if not hooks:
                # From when the daemon's gc is seen copying (its first new pack): a kill
                # before its client connects would leave the command to run gc itself.
                while proc.poll() is None and _pack_files(self.rpfs.repo) <= packs:
                    assert time.monotonic() < start + WAIT, f"{self.what(r)}: gc stuck"
                    time.sleep(0.001)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(delay)
                os.kill(victim, signal.SIGKILL)  # the daemon this test mounted
            _, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        took = time.monotonic() - start
        if hooks:
            os.kill(victim, signal.SIGKILL)  # if the hook's moment never came
        assert wait_pid_exit(victim, WAIT), f"daemon {victim} survived SIGKILL"
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        landed = proc.returncode != 0
        if not landed:  # gc was done before the kill
            self.log.append(f"round {r} {hooks or f'{delay:.3f} s'}: gc ended first "
                            f"({took:.3f} s)")
            if not hooks:
                self.window *= 0.7
        else:
            assert "daemon" in err, f"{self.what(r)}: rpfs gc: {err}"
            self.log.append(f"round {r} {hooks or f'{delay:.3f} s'}: killed {took:.3f} s in")
        self.check(r)
        return landed

    def what(self, r: int) -> str:
        return f"RPFS_GC_KILL_SEED={self.seed}, round {r}"

    def check(self, r: int | str) -> None:
        """Restarted: check is clean, every point and the clone read exactly."""
        self.mount(self.mnt)
        try:
            for name, want in self.sums.items():
                image = self.mnt / "disks" / "c.img" if name == "c" else point_image(
                    self.mnt, "vm", name)
                assert sha256_file(image) == want, f"{self.what(r)}: {name} differs"
            assert_check_clean(self.rpfs)
        finally:
            self.rpfs("umount", self.mnt, check=True, timeout=WAIT)

    def finish(self) -> dict:
        """A last gc, not killed: it completes the work."""
        self.mount(self.mnt)
        try:
            done = _gc(self.rpfs)
            info = json.loads(self.rpfs("info", "--json", check=True).stdout)
        finally:
            self.rpfs("umount", self.mnt, check=True, timeout=WAIT)
        assert done["stopped"] is None, done
        with Repository(self.rpfs.repo) as repo, repo.index.read() as txn:
            assert repo.index.get_note(txn, gc.STATE) is None, "no compaction left undone"
            assert repo.index.get_note(txn, gc.RETIRED) is None, "no retired pack left"
        du = sum(p.stat().st_size for p in (self.rpfs.repo / "packs").glob("*.pack"))
        assert du == info["pack_bytes"] <= 1.1 * info["stored_bytes"], (du, info)
        self.check("final")
        return done


def _kill_loop(rpfs, mount, tmp_path: Path, seed: int, kills: int) -> None:
    """Rounds until `kills` kills landed during a gc (at most twice as many rounds)."""
    print(f"RPFS_GC_KILL_SEED={seed}")
    loop = KillLoop(rpfs, mount, tmp_path, seed)
    loop.build()
    landed = rounds = 0
    try:
        while landed < kills:
            assert rounds < 2 * kills, f"RPFS_GC_KILL_SEED={seed}: few kills landed in gc"
            landed += loop.round(rounds)
            rounds += 1
        loop.finish()
    finally:
        print(*loop.log, sep="\n")


def test_sigkill_during_gc_leaves_check_clean_and_points_exact(rpfs, mount, tmp_path):
    _kill_loop(rpfs, mount, tmp_path, gc_kill_seed(12), kills=20)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_during_gc_stress(rpfs, mount, tmp_path):
    _kill_loop(rpfs, mount, tmp_path, gc_kill_seed(random.SystemRandom().randrange(2**32)),
               kills=80)
