"""The benchmark itself: build the sample, then measure each system in turn.

Each system's part runs in its own try block: a failure there is noted, its metrics are
reported as null, and the bench goes on. Every mount is unmounted and every process the
bench started is stopped when its part ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import mounts, write32m
from .background import Repeat, covered
from .cli_timer import CliTimer
from .measure import (
    MB,
    BenchError,
    FioResult,
    can_open_direct,
    dd_read,
    drop_caches,
    fio,
    peak_rss_mib,
    run,
    seq_reads,
    timed,
    tree_bytes,
    wait_for,
)
from .nbd import NBD_CLONE_METRICS, NBD_METRICS, bench_nbd
from .results import Results
from .s3 import bench_s3
from .sample import CHURN_REGION, MiB, Sample, apply_churn, build_sample

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
BIG_SIZE = 64 * GiB
DISK = "bench"

READ_METRICS = ["seq_read_cold_MBps", "seq_read_warm_MBps", "rand4k_qd1_iops",
                "rand4k_qd1_mean_us", "rand4k_qd1_p99_us", "rand4k_qd16_iops"]
CAPTURE_METRICS = ["capture_full_MBps", "capture_incr_s", "repo_bytes_after_full",
                   "repo_bytes_added_incr"]
CLONE_METRICS = ["clone_create_s", "clone_first_read_MBps", "clone_hydrate_s",
                 "clone_hydrated_read_MBps", "clone_hydrated_rand4k_qd16_iops",
                 "clone_rand4k_write_iops", "rand4k_write_qd16_iops", "write32m_untouched_s",
                 "write32m_touched_s"]
CEILING_METRICS = [*READ_METRICS, "rand4k_write_qd16_iops"]
QEMU_WRITE_METRICS = ["clone_rand4k_write_iops"]
WB = "_wb"  # the suffix of the clone write metrics measured on a `mount --writeback`
WRITEBACK_METRICS = [f"{m}{WB}" for m in ("rand4k_write_qd16_iops", "write32m_untouched_s",
                                           "write32m_touched_s")]
BIG_METRICS = ["clone_create_s_64G", "snapshot_s_64G", "rollback_s_64G",
               "daemon_peak_rss_MiB_64G"]
GC_METRICS = ["gc_compact_MBps", "gc_rand4k_qd1_p99_quiet_us", "gc_rand4k_qd1_p99_us",
              "gc_rand4k_qd1_mean_quiet_us", "gc_rand4k_qd1_mean_us"]
GC_CHURNS = 4  # captures after the first, each rewriting another seeded 5 % of the regions
BASE_PACKAGES = {  # what every run needs (scripts/install-deps installs these too)
    "fio": "fio",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "fusermount3": "fuse3",
    "cmp": "diffutils",
    "dd": "coreutils",
}
PEER_PACKAGES = {  # Debian 12 packages: the command each provides
    "restic": "restic",
    "borg": "borgbackup",
    "qemu-storage-daemon": "qemu-system-common",
}
BORG_CHUNKER = "fixed,65536"  # fixed 64 KiB blocks, like rpfs's default block size
BORG_COMPRESSION = "zstd,3"


@dataclass
class Options:
    size: int
    peers: bool = False
    runs: int = 3
    fio_runtime: float = 5.0
    seed: int = 1
    workdir: Path = Path("/var/tmp")
    big: bool = True
    s3: bool = False
    log: Callable[[str], None] = print


@dataclass
class Bench:
    opts: Options
    results: Results
    work: Path
    sample: Sample | None = None
    rpfs_cmd: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    commands: dict[str, bool] = field(default_factory=dict)
    timer: CliTimer | None = None
    t0: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        self.opts.log(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    def section(self, label: str, metrics: list[str], system: str | None = None):
        """Context: run a part; on failure note why and null its metrics (of `system`)."""
        return _Section(self, label, system or label, metrics)

    def rpfs(self, *args: str | Path, timeout: float = 3600) -> subprocess.CompletedProcess:
        return run([*self.rpfs_cmd, *args], timeout=timeout)

    def rpfs_op_s(self, *args: str | Path) -> float:
        """Seconds an rpfs command takes, without Python's start-up (see cli_startup_s)."""
        if self.timer is not None:
            return self.timer.call(*args)
        return max(0.0, timed([*self.rpfs_cmd, *args], timeout=600) - self.startup_s)

    @property
    def op_note(self) -> str:
        if self.timer is not None:
            return ("time of rpfs.cli.main() in a process that had imported rpfs already "
                    "(Python start-up and imports: cli_startup_s)")
        return f"wall time less the CLI start-up ({self.startup_s:.3f}s, cli_startup_s)"


class _Section:
    def __init__(self, bench: Bench, label: str, system: str, metrics: list[str]) -> None:
        self.bench, self.label, self.system, self.metrics = bench, label, system, metrics

    def __enter__(self) -> _Section:
        self.bench.say(f"{self.label}: start")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.bench.say(f"{self.label}: done")
            return False
        if issubclass(exc_type, (BenchError, OSError, subprocess.SubprocessError, ValueError)):
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BenchError) else str(exc)
            self.bench.results.note(f"{self.label}: stopped early: {reason}")
            self.bench.results.missing(self.system, self.metrics, f"not measured: {reason}")
            self.bench.say(f"{self.label}: FAILED: {reason}")
            return True  # go on with the next system
        return False


# -- set-up ------------------------------------------------------------------------------


def rpfs_command() -> list[str]:
    script = Path(sys.executable).parent / "rpfs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "rpfs.cli"]


def has_subcommand(rpfs_cmd: list[str], name: str) -> bool:
    """True if this rpfs has the subcommand (its --help exits 0)."""
    res = subprocess.run([*rpfs_cmd, name, "--help"], capture_output=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    return res.returncode == 0


def _version(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else None


def machine_info(work: Path) -> dict:
    info: dict = {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],  # others' work, too
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_GiB"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError, ValueError):
        os_release = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
        info["os"] = os_release.get("PRETTY_NAME", "").strip('"')
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "rpfs"],
                               capture_output=True, text=True).stdout.strip()
        info["rpfs_commit"] = commit + ("+dirty" if dirty else "")
    info["workdir"] = str(work)
    info["workdir_fs"] = _fs_of(work)
    tools = {
        "fio": ["fio", "--version"],
        "qemu-img": ["qemu-img", "--version"],
        "restic": ["restic", "version"],
        "borg": ["borg", "--version"],
        "fuse3": ["fusermount3", "--version"],
    }
    info["tools"] = {name: v for name, cmd in tools.items()
                     if shutil.which(cmd[0]) and (v := _version(cmd))}
    info["read_ahead_kb"] = {}
    return info


def _fs_of(path: Path) -> str | None:
    best, fstype = "", None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            if (str(path) == mp or str(path).startswith(mp.rstrip("/") + "/")) \
                    and len(mp) > len(best):
                best, fstype = mp, right.split()[0]
    return fstype


def apt_install(bench: Bench, pkgs: list[str]) -> None:
    if not pkgs:
        return
    bench.say(f"installing Debian packages: {' '.join(pkgs)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update", "-q"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs],
            timeout=1200, env=env)
    except BenchError as exc:
        bench.results.note(f"cannot install {' '.join(pkgs)}: {exc}")


def ensure_tools(bench: Bench) -> None:
    """Install the Debian packages of missing base tools; BenchError if still missing."""
    apt_install(bench, sorted({pkg for cmd, pkg in BASE_PACKAGES.items()
                               if not shutil.which(cmd)}))
    missing = [cmd for cmd in BASE_PACKAGES if not shutil.which(cmd)]
    if missing:
        raise BenchError(f"missing {', '.join(missing)} (apt-get install failed?)")


def ensure_peers(bench: Bench) -> list[str]:
    """Install the peers' Debian packages that are missing; returns the missing commands."""
    need = [cmd for cmd in PEER_PACKAGES if not shutil.which(cmd)]
    pkgs = [PEER_PACKAGES[c] for c in need]
    # borg's `mount` needs a FUSE binding for Debian's python3 (a Recommends of borgbackup)
    if subprocess.run(["/usr/bin/python3", "-c", "import pyfuse3"], capture_output=True
                      ).returncode != 0 and subprocess.run(
            ["/usr/bin/python3", "-c", "import llfuse"], capture_output=True).returncode != 0:
        pkgs.append("python3-pyfuse3")
    apt_install(bench, pkgs)
    return [cmd for cmd in PEER_PACKAGES if not shutil.which(cmd)]


# -- shared measurements -----------------------------------------------------------------


def measure_reads(bench: Bench, system: str, path: Path, expect: Path | None = None) -> None:
    """Sequential cold/warm reads and fio random reads of `path` (the second point)."""
    opts, size = bench.opts, bench.opts.size
    bench.say(f"{system}: sequential reads ({opts.runs} cold, {opts.runs} warm)")
    cold, warm = seq_reads(path, size, opts.runs)
    bench.results.add(system, "seq_read_cold_MBps", cold)
    bench.results.add(system, "seq_read_warm_MBps", warm)
    if expect is not None:  # the file is in the page cache now: a cheap full check
        res = run(["cmp", path, expect], check=False, timeout=600)
        if res.returncode != 0:
            bench.results.note(f"{system}: CONTENT MISMATCH with the second point's image: "
                               f"{res.stdout.strip() or res.stderr.strip()}")
    fio_reads(bench, system, path)


def fio_reads(bench: Bench, system: str, path: Path, prefix: str = "rand4k") -> None:
    opts = bench.opts
    direct = can_open_direct(path)
    note = None if direct else "buffered I/O: the file refuses O_DIRECT (page cache dropped " \
        "before each run)"
    qd1, qd16 = [], []
    bench.say(f"{system}: fio 4k random reads, qd1 and qd16, {opts.runs} × {opts.fio_runtime:g}s"
              + ("" if direct else " (buffered)"))
    for _ in range(opts.runs):
        drop_caches()
        qd1.append(fio(path, "randread", opts.fio_runtime, 1, direct))
    for _ in range(opts.runs):
        drop_caches()
        qd16.append(fio(path, "randread", opts.fio_runtime, 16, direct))
    r = bench.results
    r.add(system, f"{prefix}_qd1_iops", [x.iops for x in qd1], note)
    r.add(system, f"{prefix}_qd1_mean_us", [x.mean_us for x in qd1], note)
    r.add(system, f"{prefix}_qd1_p99_us", [x.p99_us for x in qd1 if x.p99_us is not None], note)
    r.add(system, f"{prefix}_qd16_iops", [x.iops for x in qd16], note)


def record_readahead(bench: Bench, system: str, mountpoint: Path) -> None:
    bench.results.machine.setdefault("read_ahead_kb", {})[system] = \
        mounts.read_ahead_kb(mountpoint)


# -- rpfs --------------------------------------------------------------------------------


def bench_rpfs(bench: Bench) -> None:
    sample, opts, r = bench.sample, bench.opts, bench.results
    assert sample is not None
    fulls, incrs, scans, bytes_full, bytes_incr = [], [], [], [], []
    repo = bench.work / "rpfs-repo"
    for i in range(opts.runs):
        bench.say(f"rpfs: capture run {i + 1}/{opts.runs}: full, then incremental "
                  "(--changed list)")
        _fresh_repo(bench, repo)
        fulls.append(opts.size / 1e6 / timed(
            [*bench.rpfs_cmd, "-r", repo, "capture", DISK, sample.base, "--name", "p1"]))
        bytes_full.append(tree_bytes(repo))
        incrs.append(timed([*bench.rpfs_cmd, "-r", repo, "capture", DISK, sample.churned,
                            "--name", "p2", "--changed", sample.changed]))
        bytes_incr.append(tree_bytes(repo) - bytes_full[-1])
    scan_repo = bench.work / "rpfs-scan-repo"
    for i in range(opts.runs):
        bench.say(f"rpfs: capture run {i + 1}/{opts.runs}: full, then incremental (full scan)")
        _fresh_repo(bench, scan_repo)
        fulls.append(opts.size / 1e6 / timed(
            [*bench.rpfs_cmd, "-r", scan_repo, "capture", DISK, sample.base, "--name", "p1"]))
        scans.append(timed([*bench.rpfs_cmd, "-r", scan_repo, "capture", DISK,
                            sample.churned, "--name", "p2"]))
    shutil.rmtree(scan_repo)
    r.add("rpfs", "capture_full_MBps", fulls)
    r.add("rpfs", "capture_incr_s", incrs,
          "given the changed-extent list (as a hypervisor's changed block tracking gives it)")
    r.add("rpfs", "capture_incr_scan_s", scans, "no changed list: reads and hashes all data")
    r.add("rpfs", "repo_bytes_after_full", bytes_full)
    r.add("rpfs", "repo_bytes_added_incr", bytes_incr)

    mnt = bench.work / "mnt-rpfs"
    with mounts.rpfs_mount(bench.rpfs_cmd, repo, mnt) as pid:
        record_readahead(bench, "rpfs", mnt)
        measure_reads(bench, "rpfs", mnt / "points" / DISK / "p2.img", sample.churned)
        with bench.section("rpfs clones", [*CLONE_METRICS, "snapshot_s", "rollback_s"],
                           "rpfs"):
            bench_clones(bench, repo, mnt, f"{DISK}@p2", "", opts.runs)
        rss = peak_rss_mib(pid)
        r.add("rpfs", "daemon_peak_rss_MiB", rss, None if rss is not None else
              "daemon gone before it could be read")
    if not bench.commands["writeback"]:
        r.missing("rpfs", WRITEBACK_METRICS, "this rpfs has no `mount --writeback`")
        return
    with (bench.section("rpfs writeback", WRITEBACK_METRICS, "rpfs"),
          mounts.rpfs_mount(bench.rpfs_cmd, repo, mnt, options=("--writeback",))):
        bench_clone_writes(bench, repo, mnt, f"{DISK}@p2", WB)


def _fresh_repo(bench: Bench, repo: Path) -> None:
    if repo.exists():
        shutil.rmtree(repo)
    bench.rpfs("-r", repo, "init")


def bench_clones(bench: Bench, repo: Path, mnt: Path, source: str, suffix: str,
                 runs: int, reads: bool = True) -> None:
    """Writable clone metrics, when this rpfs has the commands (null with a note if not)."""
    r = bench.results
    have = bench.commands
    prefix = "clone" if not suffix else "bigclone"
    if not have["clone"]:
        note = "not measured: this rpfs has no 'clone' command yet"
        metrics = [f"clone_create_s{suffix}", f"snapshot_s{suffix}", f"rollback_s{suffix}"]
        if reads:
            metrics += CLONE_METRICS
        r.missing("rpfs", metrics, note)
        return
    creates, first, hydrate_s, hydrated, hydrated_qd16 = [], [], [], [], []
    names = []
    for k in range(runs):
        name = f"{prefix}{k}"
        creates.append(bench.rpfs_op_s("-r", repo, "clone", source, name))
        names.append(name)
        path = mnt / "disks" / f"{name}.img"
        if not wait_for(path.exists, 10):
            raise BenchError(f"rpfs clone made {name} but {path} did not appear")
        if not reads:
            continue
        bench.say(f"rpfs: clone {name}: first (unhydrated) read")
        drop_caches()
        first.append(dd_read(path, bench.opts.size))
        if have["hydrate"]:
            hydrate_s.append(bench.rpfs_op_s("-r", repo, "hydrate", name))
            drop_caches()
            hydrated.append(dd_read(path, bench.opts.size))
            bench.say(f"rpfs: clone {name}: fio 4k random reads, qd16, hydrated, "
                      f"{bench.opts.fio_runtime:g}s")
            drop_caches()
            hydrated_qd16.append(fio(path, "randread", bench.opts.fio_runtime, 16,
                                     can_open_direct(path)))
    r.add("rpfs", f"clone_create_s{suffix}", creates, bench.op_note)
    if reads:
        r.add("rpfs", "clone_first_read_MBps", first)
        no_hydrate = "not measured: this rpfs has no 'hydrate' command yet"
        r.add("rpfs", "clone_hydrate_s", hydrate_s if have["hydrate"] else None,
              bench.op_note if have["hydrate"] else no_hydrate)
        r.add("rpfs", "clone_hydrated_read_MBps", hydrated if have["hydrate"] else None,
              None if have["hydrate"] else no_hydrate)
        if not have["hydrate"]:
            r.add("rpfs", "clone_hydrated_rand4k_qd16_iops", None, no_hydrate)
        else:
            r.add("rpfs", "clone_hydrated_rand4k_qd16_iops", [x.iops for x in hydrated_qd16],
                  None if all(x.direct for x in hydrated_qd16) else
                  "buffered I/O: the clone refuses O_DIRECT (page cache dropped first)")
        path = mnt / "disks" / f"{names[0]}.img"
        res = run(["cmp", path, bench.sample.churned], check=False, timeout=600)
        if res.returncode != 0:
            r.note(f"rpfs: CONTENT MISMATCH between clone {names[0]} and its point: "
                   f"{res.stdout.strip() or res.stderr.strip()}")
        direct = can_open_direct(path, write=True)
        bench.say(f"rpfs: fio 4k random writes on {names[0]} (fsync every 32), "
                  f"{bench.opts.runs} × {bench.opts.fio_runtime:g}s")
        writes = [fio(path, "randwrite", bench.opts.fio_runtime, 1, direct, fsync=32).iops
                  for _ in range(bench.opts.runs)]
        r.add("rpfs", "clone_rand4k_write_iops", writes,
              None if direct else "buffered I/O: the clone refuses O_DIRECT")
    bench_snapshot_rollback(bench, repo, names[0], suffix, runs)
    if reads:  # after the snapshot/rollback runs: its writes do not compete with their archiving
        bench_clone_writes(bench, repo, mnt, source)


def fio_writes_qd16(bench: Bench, system: str, path: Path, how: str, suffix: str = "") -> None:
    """`rand4k_write_qd16_iops`: fio 4 KiB random writes at qd16 with no fsync, O_DIRECT
    (buffered, noted, if `path` refuses it), `runs` × `fio_runtime`; `how` says on what,
    `suffix` ends the metric's name."""
    opts = bench.opts
    direct = can_open_direct(path, write=True)
    bench.say(f"{system}: fio 4k random writes, qd16, {opts.runs} × {opts.fio_runtime:g}s"
              + ("" if direct else " (buffered)"))
    iops = [fio(path, "randwrite", opts.fio_runtime, 16, direct).iops for _ in range(opts.runs)]
    io = "O_DIRECT" if direct else "buffered I/O (the file refuses O_DIRECT)"
    bench.results.add(system, f"rand4k_write_qd16_iops{suffix}", iops,
                      f"fio 4 KiB random writes, qd16, libaio, {io}, no fsync, {how}")


def bench_clone_writes(bench: Bench, repo: Path, mnt: Path, source: str,
                       suffix: str = "") -> None:
    """4 KiB random writes at qd16 and single 32 MiB write()s from untouched and touched
    buffers, on a fresh clone of `source` hydrated first (so they measure the write path,
    not copy-on-write fetches from the point), deleted afterwards. `suffix` ends the
    metrics' names: WB for a `mount --writeback`."""
    name = "wclone"
    bench.rpfs("-r", repo, "clone", source, name)
    path = mnt / "disks" / f"{name}.img"
    if not wait_for(path.exists, 10):
        raise BenchError(f"rpfs clone made {name} but {path} did not appear")
    try:
        hydrated = bench.commands["hydrate"]
        if hydrated:
            bench.rpfs("-r", repo, "hydrate", name)
        state = "hydrated" if hydrated else "not hydrated (no 'hydrate' command)"
        if suffix == WB:
            state += ", mount --writeback"
        fio_writes_qd16(bench, "rpfs", path, f"on a fresh clone, {state}", suffix)
        bench_write32m(bench, path, state, suffix)
    finally:
        with contextlib.suppress(BenchError):  # a stuck daemon: the mount's end stops it
            bench.rpfs("-r", repo, "disk", "delete", name, timeout=120)


def bench_write32m(bench: Bench, path: Path, state: str, suffix: str = "") -> None:
    """`write32m_untouched_s` and `write32m_touched_s` (benchlib/write32m.py, names ending
    in `suffix`) on the clone image `path`: runs interleaved, alternating which goes
    first, each write at its own 32 MiB slot while the disk has enough of them. Once an
    untouched write runs over the limit the others are not tried (each would cost the
    limit again)."""
    opts, r = bench.opts, bench.results
    limit = write32m.WRITE_LIMIT_S
    slots = max(1, opts.size // write32m.WRITE_SIZE)
    untouched: list[float] = []
    touched: list[float] = []
    skews: set[int] = set()
    stopped = False
    j = 0
    bench.say(f"rpfs: 32 MiB write()s from untouched and touched buffers, {opts.runs} runs "
              f"each (at most {limit:g}s a write)")
    for k in range(opts.runs):
        for is_touched in ((False, True) if k % 2 == 0 else (True, False)):
            if stopped and not is_touched:
                continue
            offset = (j % slots) * write32m.WRITE_SIZE
            j += 1
            seconds, skew = write32m.timed_write(path, offset, is_touched, tag=j, limit=limit)
            if skew is not None:
                skews.add(skew)
            if seconds is None and is_touched:
                raise BenchError(f"a 32 MiB write from a touched buffer ran over {limit:g}s")
            if seconds is None:
                bench.say(f"rpfs: a 32 MiB write from an untouched buffer ran over "
                          f"{limit:g}s: stopped; no more of them")
                stopped = True
                continue
            (touched if is_touched else untouched).append(seconds)
    at = " or ".join(str(x) for x in sorted(skews)) or "?"
    how = (f"one os.pwrite of a freshly malloc'ed 32 MiB buffer (starting {at} bytes past a "
           f"page boundary) into a clone ({state}), fsync after, outside the timed part; a "
           "sample of the region read back and compared")
    r.add("rpfs", f"write32m_touched_s{suffix}", touched, f"{how}; every page written before")
    if not stopped:
        r.add("rpfs", f"write32m_untouched_s{suffix}", untouched, f"{how}; no page touched")
    else:
        r.add("rpfs", f"write32m_untouched_s{suffix}", None,
              f"{how}; no page touched; a write ran over {limit:g}s and was stopped"
              + (f" (the ones that finished: {', '.join(f'{x:.1f}' for x in untouched)} s)"
                 if untouched else ""))


def bench_snapshot_rollback(bench: Bench, repo: Path, disk: str, suffix: str,
                            runs: int) -> None:
    r, have = bench.results, bench.commands
    note = bench.op_note
    if not have["snapshot"]:
        r.missing("rpfs", [f"snapshot_s{suffix}", f"rollback_s{suffix}"],
                  "not measured: this rpfs has no 'snapshot' command yet")
        return
    snaps = [bench.rpfs_op_s("-r", repo, "snapshot", disk, "--name", f"s{k}")
             for k in range(runs)]
    r.add("rpfs", f"snapshot_s{suffix}", snaps, note)
    if not have["rollback"]:
        r.missing("rpfs", [f"rollback_s{suffix}"],
                  "not measured: this rpfs has no 'rollback' command yet")
        return
    wait_archived(bench, repo, disk)
    rolls = [bench.rpfs_op_s("-r", repo, "rollback", f"{disk}@s{k}") for k in range(runs)]
    r.add("rpfs", f"rollback_s{suffix}", rolls, f"{note}; after the points' archives finished")


ARCHIVE_TIMEOUT = 600.0  # seconds a bench point may take to archive


def wait_archived(bench: Bench, repo: Path, disk: str) -> None:
    """Until no point of `disk` is still archiving. A rollback waits for that (the clone
    write runs before leave much to archive: 2.5 s of a 2 GiB run's `rollback_s`), and
    `rollback_s` is the rollback's own time."""
    def archived() -> bool:
        points = json.loads(bench.rpfs("-r", repo, "points", disk, "--json").stdout)
        return all(p["state"] == "complete" for p in points)

    if not wait_for(archived, ARCHIVE_TIMEOUT, interval=0.2):
        raise BenchError(f"points of {disk} still archiving after {ARCHIVE_TIMEOUT:g}s")


def bench_rpfs_big(bench: Bench) -> None:
    """A sparse 64 GiB disk: clone/snapshot/rollback times and the daemon's peak RSS."""
    sample, opts = bench.sample, bench.opts
    assert sample is not None
    big = bench.work / "big.img"
    with open(big, "wb") as f, open(sample.base, "rb") as src:
        f.truncate(BIG_SIZE)
        f.write(src.read(64 * MiB))  # a file system's start...
        for k in range(1, 16):  # ...and data scattered over the disk
            f.seek(k * (BIG_SIZE // 16))
            f.write(src.read(MiB) or bytes(MiB))
    repo = bench.work / "rpfs-big-repo"
    _fresh_repo(bench, repo)
    bench.say("rpfs 64G: capture of a sparse 64 GiB disk")
    bench.rpfs("-r", repo, "capture", "big", big, "--name", "p1")
    big.unlink()
    mnt = bench.work / "mnt-rpfs-big"
    with mounts.rpfs_mount(bench.rpfs_cmd, repo, mnt) as pid:
        path = mnt / "points" / "big" / "p1.img"
        # the same amount of sequential reading as the main disk got, and random reads
        bench.say(f"rpfs 64G: read {opts.size // MiB} MiB sequentially, fio random reads")
        drop_caches()
        run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={opts.size // MiB}"],
            timeout=1800)
        fio(path, "randread", opts.fio_runtime, 1, can_open_direct(path))
        bench_clones(bench, repo, mnt, "big@p1", "_64G", opts.runs, reads=False)
        bench.results.add(
            "rpfs", "daemon_peak_rss_MiB_64G", peak_rss_mib(pid),
            f"a daemon serving a sparse 64 GiB disk after {opts.size // MiB} MiB of sequential "
            "reads, fio random reads and the clone/snapshot/rollback runs",
        )


# -- garbage collection ------------------------------------------------------------------


def bench_gc(bench: Bench) -> None:
    """GC throughput on a repository with part-dead packs, and the p99 of 4 KiB reads of a
    clone without and with a GC compacting beside them."""
    r, opts = bench.results, bench.opts
    if not bench.commands["gc"]:
        r.missing("rpfs", GC_METRICS, "not measured: this rpfs has no 'gc' command yet")
        return
    built = bench.work / "rpfs-gc-built"
    point = build_part_dead(bench, built)
    info = json.loads(bench.rpfs("-r", built, "info", "--json").stdout)
    dead = info["dead_bytes"] / info["pack_bytes"] if info["pack_bytes"] else 0.0
    repo = bench.work / "rpfs-gc-repo"
    rates, copied = [], []
    for i in range(opts.runs):
        bench.say(f"rpfs gc: run {i + 1}/{opts.runs}: gc --threshold 1 of a copy, cold")
        if repo.exists():
            shutil.rmtree(repo)
        shutil.copytree(built, repo, symlinks=True)
        drop_caches()
        t = time.perf_counter()
        res = bench.rpfs("-r", repo, "gc", "--threshold", "1", "--json")
        elapsed = max(1e-6, time.perf_counter() - t - bench.startup_s)
        figures = json.loads(res.stdout)
        rates.append(figures["pack_bytes_before"] / MB / elapsed)
        copied.append(figures["bytes_copied"])
    shutil.rmtree(repo)
    r.add("rpfs", "gc_compact_MBps", rates,
          f"`rpfs gc --threshold 1` (no daemon, page cache dropped first) of "
          f"{info['pack_bytes'] / MB:.0f} MB of packs, {100 * dead:.0f} % dead "
          f"({GC_CHURNS + 1} captures with churn, all but the last purged), "
          f"{statistics.median(copied) / MB:.0f} MB copied: pack MB before / wall time "
          "less cli_startup_s")
    bench_gc_reads(bench, built, point)


def build_part_dead(bench: Bench, repo: Path) -> str:
    """A repository whose packs are part dead: the sample's base and GC_CHURNS versions
    of it, each with another seeded 5 % of its regions rewritten, captured in turn, then
    every point but the last purged; the last point's reference."""
    sample, opts = bench.sample, bench.opts
    assert sample is not None
    _fresh_repo(bench, repo)
    bench.say(f"rpfs gc: building a repository with part-dead packs ({GC_CHURNS + 1} "
              "captures, all but the last purged)")
    bench.rpfs("-r", repo, "capture", DISK, sample.base, "--name", "g0")
    image, changed = bench.work / "gc-image.img", bench.work / "gc-changed.json"
    shutil.copyfile(sample.base, image)
    for k in range(1, GC_CHURNS + 1):
        offsets = apply_churn(image, opts.size, 1000 * opts.seed + k)
        changed.write_text(json.dumps([{"start": o, "length": CHURN_REGION} for o in offsets]))
        bench.rpfs("-r", repo, "capture", DISK, image, "--name", f"g{k}", "--changed", changed)
    image.unlink()
    changed.unlink()
    bench.rpfs("-r", repo, "point", "delete", "--purge",
               *[f"{DISK}@g{k}" for k in range(GC_CHURNS)])
    return f"{DISK}@g{GC_CHURNS}"


def bench_gc_reads(bench: Bench, repo: Path, point: str) -> None:
    """fio 4 KiB random reads (qd1) of a fresh clone of `point`, quiet and while `rpfs
    gc --threshold 1` runs back to back through the daemon, runs interleaved."""
    opts, r = bench.opts, bench.results
    mnt = bench.work / "mnt-rpfs-gc"
    quiet, busy, cover = [], [], []
    gc_argv: list[str | Path] = ["-r", repo, "gc", "--threshold", "1"]
    with mounts.rpfs_mount(bench.rpfs_cmd, repo, mnt):
        for k in range(opts.runs):
            bench.say(f"rpfs gc: run {k + 1}/{opts.runs}: fio 4k random reads of a clone, "
                      f"{opts.fio_runtime:g}s quiet, then {opts.fio_runtime:g}s during gc")
            quiet.append(_clone_reads(bench, repo, mnt, point, f"gcq{k}")[0])
            result, share = _clone_reads(bench, repo, mnt, point, f"gcb{k}", gc_argv)
            busy.append(result)
            cover.append(share)
    direct = all(x.direct for x in quiet + busy)
    how = ("fio 4 KiB random reads, qd1, " + ("O_DIRECT" if direct else "buffered")
           + ", of a fresh clone of the surviving point each run (copy-on-read), its packs "
           "in the page cache")
    low, high = f"{100 * min(cover):.0f}", f"{100 * max(cover):.0f}"
    during = (f"{how}, while `rpfs gc --threshold 1` ran back to back through the daemon "
              f"(GC ran during {low if low == high else f'{low}-{high}'} % of each fio run; "
              "the first gc compacts the part-dead packs, the next rewrite them all)")
    r.add("rpfs", "gc_rand4k_qd1_p99_quiet_us",
          [x.p99_us for x in quiet if x.p99_us is not None], how)
    r.add("rpfs", "gc_rand4k_qd1_mean_quiet_us", [x.mean_us for x in quiet], how)
    r.add("rpfs", "gc_rand4k_qd1_p99_us", [x.p99_us for x in busy if x.p99_us is not None],
          during)
    r.add("rpfs", "gc_rand4k_qd1_mean_us", [x.mean_us for x in busy], during)


def _clone_reads(bench: Bench, repo: Path, mnt: Path, point: str, name: str,
                 gc_argv: list[str | Path] | None = None) -> tuple[FioResult, float]:
    """One fio run of 4 KiB random reads on a new clone `name` of `point` (deleted after),
    with `rpfs *gc_argv` repeated beside it if given; fio's figures and the share of the
    run that GC covered."""
    bench.rpfs("-r", repo, "clone", point, name)
    path = mnt / "disks" / f"{name}.img"
    if not wait_for(path.exists, 10):
        raise BenchError(f"rpfs clone made {name} but {path} did not appear")
    for pack in sorted((repo / "packs").rglob("*")):  # into the page cache: GC's do too
        if pack.is_file():
            with open(pack, "rb") as f:
                while f.read(MiB):
                    pass
    loop = Repeat(gc_argv).start() if gc_argv else None
    t0 = time.monotonic()
    try:
        result = fio(path, "randread", bench.opts.fio_runtime, 1, can_open_direct(path))
    finally:
        t1 = time.monotonic()
        intervals = loop.stop() if loop else []
    bench.rpfs("-r", repo, "disk", "delete", name)
    return result, covered(intervals, t0, t1)


# -- ceiling and raw ---------------------------------------------------------------------


def bench_ceiling(bench: Bench) -> None:
    sample = bench.sample
    assert sample is not None
    mnt = bench.work / "mnt-ceiling"
    with mounts.ceiling_mount(sample.churned, mnt):
        record_readahead(bench, "ceiling", mnt)
        measure_reads(bench, "ceiling", mnt / "image.img", sample.churned)
        # writes change the content: after every read
        fio_writes_qd16(bench, "ceiling", mnt / "image.img",
                        "into ceilingfs's in-memory copy of the image")


def bench_raw(bench: Bench) -> None:
    assert bench.sample is not None
    measure_reads(bench, "raw", bench.sample.churned)


# -- peers -------------------------------------------------------------------------------


def _capture_runs(bench: Bench, system: str, repo: Path, init: Callable[[], None],
                  full: Callable[[], None], incr: Callable[[], None],
                  incr_note: str) -> None:
    """Median over runs of fresh-repository full and incremental backups; keeps the last."""
    opts = bench.opts
    fulls, incrs, bytes_full, bytes_incr = [], [], [], []
    for i in range(opts.runs):
        bench.say(f"{system}: backup run {i + 1}/{opts.runs}: full, then incremental")
        if repo.exists():
            shutil.rmtree(repo)
        init()
        t = time.perf_counter()
        full()
        fulls.append(opts.size / 1e6 / (time.perf_counter() - t))
        bytes_full.append(tree_bytes(repo))
        t = time.perf_counter()
        incr()
        incrs.append(time.perf_counter() - t)
        bytes_incr.append(tree_bytes(repo) - bytes_full[-1])
    r = bench.results
    r.add(system, "capture_full_MBps", fulls)
    r.add(system, "capture_incr_s", incrs, incr_note)
    r.add(system, "repo_bytes_after_full", bytes_full)
    r.add(system, "repo_bytes_added_incr", bytes_incr)


def link_source(src: Path, image: Path) -> None:
    """Make src/disk.img a new name of `image` (a new inode: backups must read it again)."""
    target = src / "disk.img"
    target.unlink(missing_ok=True)
    os.link(image, target)


def bench_restic(bench: Bench) -> None:
    sample = bench.sample
    assert sample is not None
    src = bench.work / "peer-src"
    src.mkdir(exist_ok=True)
    repo = bench.work / "restic-repo"
    env = {"RESTIC_PASSWORD": "rpfs-bench", "RESTIC_REPOSITORY": str(repo),
           "RESTIC_CACHE_DIR": str(bench.work / "restic-cache")}
    full_env = {**os.environ, **env}

    def backup(image: Path) -> None:
        link_source(src, image)
        run(["restic", "backup", "-q", "--host", "bench", "disk.img"], env=full_env, cwd=src)

    _capture_runs(bench, "restic", repo,
                  lambda: run(["restic", "init", "-q"], env=full_env),
                  lambda: backup(sample.base), lambda: backup(sample.churned),
                  "reads the whole image again (content-defined chunks, ~1 MiB)")
    mnt = bench.work / "mnt-restic"
    mnt.mkdir(exist_ok=True)
    image = mnt / "snapshots" / "latest" / "disk.img"
    with mounts.foreground_mount(["restic", "mount", mnt], mnt, image, env=env,
                                 log=bench.work / "restic-mount.log"):
        record_readahead(bench, "restic", mnt)
        measure_reads(bench, "restic", image, sample.churned)


def bench_borg(bench: Bench) -> None:
    sample = bench.sample
    assert sample is not None
    src = bench.work / "peer-src"
    src.mkdir(exist_ok=True)
    repo = bench.work / "borg-repo"
    env = {"BORG_REPO": str(repo), "BORG_PASSPHRASE": "",
           "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
           "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
           "BORG_BASE_DIR": str(bench.work / "borg-base")}
    full_env = {**os.environ, **env}

    def create(archive: str, image: Path) -> None:
        link_source(src, image)
        run(["borg", "create", "--compression", BORG_COMPRESSION, "--chunker-params",
             BORG_CHUNKER, f"::{archive}", "disk.img"], env=full_env, cwd=src)

    def init() -> None:
        shutil.rmtree(bench.work / "borg-base", ignore_errors=True)
        run(["borg", "init", "--encryption", "none"], env=full_env)

    _capture_runs(bench, "borg", repo, init, lambda: create("p1", sample.base),
                  lambda: create("p2", sample.churned),
                  f"reads the whole image again (--chunker-params {BORG_CHUNKER})")
    bench.results.note(f"borg: --encryption none --compression {BORG_COMPRESSION} "
                       f"--chunker-params {BORG_CHUNKER}")
    mnt = bench.work / "mnt-borg"
    mnt.mkdir(exist_ok=True)
    with mounts.foreground_mount(["borg", "mount", "-f", "::p2", mnt], mnt, mnt / "disk.img",
                                 env=env, log=bench.work / "borg-mount.log"):
        record_readahead(bench, "borg", mnt)
        measure_reads(bench, "borg", mnt / "disk.img", sample.churned)


def churn_writes(sample: Sample, churn: Path, compressed: bool) -> list[str]:
    """qemu-io arguments writing the churned regions of `sample`, one file each in
    `churn` (what changed block tracking would hand over)."""
    regions = json.loads(sample.changed.read_text())
    churn.mkdir(exist_ok=True)
    writes = []
    with open(sample.churned, "rb") as f:
        for i, ext in enumerate(regions):
            f.seek(ext["start"])
            part = churn / f"{i:06d}.bin"
            part.write_bytes(f.read(ext["length"]))
            flag = "-c " if compressed else ""
            writes += ["-c", f"write {flag}-q -s {part} {ext['start']} {ext['length']}"]
    return writes


def bench_qemu(bench: Bench) -> None:
    sample = bench.sample
    assert sample is not None
    qdir = bench.work / "qemu"
    qdir.mkdir(exist_ok=True)
    base, overlay = qdir / "base.qcow2", qdir / "overlay.qcow2"
    churn = qdir / "churn"
    writes = churn_writes(sample, churn, compressed=True)

    def full() -> None:
        run(["qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
             sample.base, base])

    def incr() -> None:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
        run(["qemu-io", "-f", "qcow2", overlay, *writes])

    opts, r = bench.opts, bench.results
    fulls, incrs, bytes_full, bytes_incr = [], [], [], []
    for i in range(opts.runs):
        bench.say(f"qemu: run {i + 1}/{opts.runs}: qcow2 (zstd) base, then overlay")
        for p in (base, overlay):
            p.unlink(missing_ok=True)
        t = time.perf_counter()
        full()
        fulls.append(opts.size / 1e6 / (time.perf_counter() - t))
        bytes_full.append(base.stat().st_size)
        t = time.perf_counter()
        incr()
        incrs.append(time.perf_counter() - t)
        bytes_incr.append(overlay.stat().st_size)
    shutil.rmtree(churn)
    r.add("qemu", "capture_full_MBps", fulls, "qemu-img convert -O qcow2 -c (zstd)")
    r.add("qemu", "capture_incr_s", incrs,
          "qemu-io compressed writes of the changed regions into an overlay")
    r.add("qemu", "repo_bytes_after_full", bytes_full)
    r.add("qemu", "repo_bytes_added_incr", bytes_incr, "the overlay file's size")
    export = bench.work / "qemu-export.img"
    export.touch()
    cmd = qsd_fuse_export(overlay, export, writable=False)
    with mounts.foreground_mount(cmd, export, export, log=bench.work / "qsd.log",
                                 stop_signal=signal.SIGTERM):
        record_readahead(bench, "qemu", export)
        measure_reads(bench, "qemu", export, sample.churned)
    with bench.section("qemu writes", QEMU_WRITE_METRICS, "qemu"):
        bench_qemu_writes(bench, base)


def qsd_fuse_export(image: Path, export: Path, writable: bool) -> list[str | Path]:
    """qemu-storage-daemon serving qcow2 `image` as the file `export` (its FUSE export)."""
    ro = "" if writable else ",read-only=on"
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}{ro}",
        "--blockdev", f"driver=qcow2,node-name=disk0,file=file0{ro}",
        "--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={export},"
                    f"writable={'on' if writable else 'off'}",
    ]


def bench_qemu_writes(bench: Bench, base: Path) -> None:
    """rpfs's clone write job (fio 4 KiB random writes, qd1, fsync every 32, same runtime
    and runs) on a fresh qcow2 overlay of the qcow2 base, exported writable through
    qemu-storage-daemon's FUSE export: a VM's clone the qemu way."""
    opts = bench.opts
    overlay = bench.work / "qemu" / "clone.qcow2"
    overlay.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
    export = bench.work / "qemu-clone.img"
    export.touch()
    cmd = qsd_fuse_export(overlay, export, writable=True)
    with mounts.foreground_mount(cmd, export, export, log=bench.work / "qsd-clone.log",
                                 stop_signal=signal.SIGTERM):
        direct = can_open_direct(export, write=True)
        bench.say(f"qemu: fio 4k random writes on a qcow2 overlay (fsync every 32), "
                  f"{opts.runs} × {opts.fio_runtime:g}s" + ("" if direct else " (buffered)"))
        writes = [fio(export, "randwrite", opts.fio_runtime, 1, direct, fsync=32).iops
                  for _ in range(opts.runs)]
    io = "O_DIRECT" if direct else "buffered I/O (the export refuses O_DIRECT)"
    bench.results.add(
        "qemu", "clone_rand4k_write_iops", writes,
        f"fio 4 KiB random writes, {io}, fsync every 32, on a fresh qcow2 overlay of the "
        "zstd qcow2 base (a cluster's first write copies it from the base) through "
        "qemu-storage-daemon's FUSE export, writable=on",
    )


# -- the whole run -----------------------------------------------------------------------


def run_bench(opts: Options) -> Results:
    opts.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rpfs-bench-", dir=opts.workdir))
    results = Results(opts.size, machine_info(work))
    bench = Bench(opts, results, work)
    try:
        _run(bench)
    finally:
        results.machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        if bench.timer is not None:
            bench.timer.close()
        leftover = mounts.mounts_under(work)
        for m in sorted(leftover, key=len, reverse=True):
            mounts.fusermount_u(Path(m), lazy=True)
        if leftover:
            results.note(f"had to force-unmount {', '.join(leftover)}")
        shutil.rmtree(work, ignore_errors=True)
        still = mounts.mounts_under(work)
        if still:
            results.note(f"STILL MOUNTED: {', '.join(still)}")
    return results


def _run(bench: Bench) -> None:
    opts, r = bench.opts, bench.results
    r.note(f"medians of {opts.runs} runs; fio runs {opts.fio_runtime:g}s each; MB = 10^6 "
           "bytes; cold = page cache dropped before each run; warm = second of two reads")
    bench.rpfs_cmd = rpfs_command()
    ensure_tools(bench)
    bench.say(f"building the {opts.size / MiB:.0f} MiB sample disk (seed {opts.seed})")
    t = time.perf_counter()
    bench.sample = build_sample(_mkdir(bench.work / "sample"), opts.size, opts.seed)
    s = bench.sample
    r.machine["sample"] = {
        "seed": opts.seed, "files": s.files, "used_bytes": s.used_bytes,
        "used_pct": round(100 * s.used_bytes / s.size, 1),
        "churn_regions": s.churn_regions, "churn_region_bytes": CHURN_REGION,
        "build_s": round(time.perf_counter() - t, 2),
    }
    startups = [timed([*bench.rpfs_cmd, "--version"]) for _ in range(opts.runs)]
    r.add("rpfs", "cli_startup_s", startups, "`rpfs --version`: Python start-up and imports")
    bench.startup_s = r.get("rpfs", "cli_startup_s") or 0.0
    bench.commands = {c: has_subcommand(bench.rpfs_cmd, c)
                      for c in ("clone", "hydrate", "snapshot", "rollback", "gc")}
    bench.commands["writeback"] = "--writeback" in run(
        [*bench.rpfs_cmd, "mount", "--help"], timeout=60).stdout
    r.machine["rpfs_commands"] = bench.commands
    try:
        bench.timer = CliTimer()
    except (BenchError, OSError) as exc:
        r.note(f"cannot time rpfs commands in-process ({exc}): clone/snapshot/rollback "
               "times are wall times less cli_startup_s")
    absent = [c for c, ok in bench.commands.items() if not ok]
    if absent:
        r.note(f"rpfs has no {', '.join(absent)} command yet: their metrics are null")

    with bench.section("rpfs", CAPTURE_METRICS + READ_METRICS + ["daemon_peak_rss_MiB"]):
        bench_rpfs(bench)
    if opts.big:
        with bench.section("rpfs 64G", BIG_METRICS, "rpfs"):
            bench_rpfs_big(bench)
    with bench.section("rpfs gc", GC_METRICS, "rpfs"):
        bench_gc(bench)
    with bench.section("ceiling", CEILING_METRICS):
        bench_ceiling(bench)
    with bench.section("raw", READ_METRICS):
        bench_raw(bench)
    with bench.section("nbd", NBD_METRICS + NBD_CLONE_METRICS, "rpfs"):
        bench_nbd(bench)
    if opts.s3:
        bench_s3(bench)
    if opts.peers:
        missing = ensure_peers(bench)
        for system, cmd, fn, extra in (("restic", "restic", bench_restic, []),
                                       ("borg", "borg", bench_borg, []),
                                       ("qemu", "qemu-storage-daemon", bench_qemu,
                                        QEMU_WRITE_METRICS)):
            metrics = CAPTURE_METRICS + READ_METRICS + extra
            if cmd in missing:
                r.missing(system, metrics, f"not measured: no {cmd}")
                continue
            with bench.section(system, metrics):
                fn(bench)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so every finally (unmounts) runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
