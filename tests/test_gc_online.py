"""`rpfs gc` through the daemon, compacting every pack (`--threshold 1`), under load and
under SIGKILL.

Under load: while GC rounds rewrite every pack, a reader loops `cmp` over every point
image against saved copies (the kernel's page cache dropped before each pass, so each
pass reads through the daemon), `fio` writes and crc32c-verifies a clone, and a capture
of a new point runs in its own process. No read fails or differs, fio finds no error,
the new point is exact, `check` is clean, and the packs there before are all gone.

Under SIGKILL: the daemon is killed at seeded random moments of a `gc --threshold 1` and
at chosen ones (fault hooks, tests/faults/sitecustomize.py: at the K-th chunk moved to
its copy, just after the compaction note is written, at a retired pack's deletion);
after each restart `check` is clean and every point and the clone read exactly; a last
gc completes, leaving pack bytes within 10 % of the live stored bytes.
RPFS_GC_KILL_SEED=N replays the choices (where a timed kill lands depends on timing).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

from helpers import (
    MiB,
    armed,
    assert_check_clean,
    fio_errors,
    point_image,
    write_random,
)

WAIT = 120.0  # seconds a command may take before it counts as stuck


def _pack_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "packs").glob("*.pack")}


def _churn(path: Path, rng: random.Random, pieces: int, size: int) -> None:
    """Overwrite `pieces` block-aligned pieces of `size` bytes with fresh random data."""
    with open(path, "r+b") as f:
        total = f.seek(0, 2)
        for _ in range(pieces):
            f.seek(rng.randrange(0, total - size) // 65536 * 65536)
            f.write(rng.randbytes(size))


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
            _churn(source, rng, pieces, piece)
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
    _churn(source, random.Random(5), 4, 2 * MiB)
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
