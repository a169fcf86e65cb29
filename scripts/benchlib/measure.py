"""Measuring: commands with timeouts, page cache drops, dd reads, fio runs, process memory."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000  # throughput is in MB/s, as dd prints it


class BenchError(Exception):
    """A step failed; the message says which and why (the bench notes it and goes on)."""


def run(cmd: list[str | Path], timeout: float = 3600, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    """Run `cmd` capturing its output; BenchError with its last words if it fails."""
    args = [str(c) for c in cmd]
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                             stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(args[:3])} did not finish in {timeout:.0f}s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {args[0]}: {exc.strerror}") from None
    if check and res.returncode != 0:
        raise BenchError(f"{' '.join(args[:3])} exited {res.returncode}: {last_words(res)}")
    return res


def last_words(res: subprocess.CompletedProcess) -> str:
    text = (res.stderr or "").strip() or (res.stdout or "").strip()
    return text.splitlines()[-1][:300] if text else "no output"


def timed(cmd: list[str | Path], timeout: float = 3600, **kw) -> float:
    """Wall-clock seconds `cmd` took (BenchError if it failed)."""
    t0 = time.perf_counter()
    run(cmd, timeout=timeout, **kw)
    return time.perf_counter() - t0


def drop_caches() -> None:
    """Write back and drop the page cache (FUSE files' pages go too); needs root."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd_read(path: Path, size: int, timeout: float = 1800) -> float:
    """MB/s of reading `path` to the end with dd bs=1M."""
    t0 = time.perf_counter()
    res = run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], timeout=timeout)
    elapsed = time.perf_counter() - t0
    copied = _dd_bytes(res.stderr)
    if copied is not None and copied != size:
        raise BenchError(f"dd read {copied} bytes of {path}, expected {size}")
    return size / MB / elapsed


def _dd_bytes(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if " bytes" in line and "copied" in line:
            try:
                return int(line.split()[0])
            except ValueError:
                return None
    return None


def seq_reads(path: Path, size: int, runs: int) -> tuple[list[float], list[float]]:
    """Cold (cache dropped before each) and warm (second of two back-to-back) MB/s."""
    cold, warm = [], []
    for _ in range(runs):
        drop_caches()
        cold.append(dd_read(path, size))
    for _ in range(runs):
        dd_read(path, size)
        warm.append(dd_read(path, size))
    return cold, warm


@dataclass
class FioResult:
    iops: float
    mean_us: float
    p99_us: float | None
    direct: bool


def fio(path: Path | str, rw: str, runtime: float, qd: int = 1, direct: bool = True,
        fsync: int = 0, size: int | None = None) -> FioResult:
    """One fio job of 4 KiB random I/O on an existing file, or on an NBD export (`path`
    an nbd:// or nbd+unix:// URI: fio's nbd engine, libnbd); clat mean and p99 from JSON."""
    if str(path).startswith(("nbd://", "nbd+unix://")):
        target = ["--ioengine=nbd", f"--uri={path}"]
    else:
        target = [f"--filename={path}", f"--direct={int(direct)}",
                  "--ioengine=" + ("psync" if qd == 1 else "libaio"), "--invalidate=1"]
    cmd = [
        "fio", "--name=r", *target, f"--rw={rw}", "--bs=4k", f"--iodepth={qd}",
        f"--runtime={runtime:g}", "--time_based", "--output-format=json",
        "--randrepeat=1", "--norandommap",
    ]
    if rw.endswith("read"):
        cmd.append("--readonly")
    if fsync:
        cmd.append(f"--fsync={fsync}")
    if size is not None:
        cmd.append(f"--size={size}")
    res = run(cmd, timeout=runtime + 120, check=False)
    if res.returncode != 0:
        raise BenchError(f"fio {rw} qd{qd} on {path} exited {res.returncode}: {last_words(res)}")
    try:
        start = res.stdout.index("{")  # fio may print notes before the JSON
        job = json.loads(res.stdout[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"fio output not understood: {exc}") from None
    if job.get("error"):
        raise BenchError(f"fio {rw} on {path}: error {job['error']}")
    part = job["read" if rw.endswith("read") else "write"]
    clat = part["clat_ns"]
    p99 = (clat.get("percentile") or {}).get("99.000000")
    return FioResult(part["iops"], clat["mean"] / 1000, None if p99 is None else p99 / 1000,
                     direct)


def fio_direct_or_buffered(path: Path, rw: str, runtime: float, qd: int = 1,
                           **kw) -> FioResult:
    """fio with O_DIRECT, or buffered (page cache dropped first) if the file refuses it."""
    try:
        return fio(path, rw, runtime, qd, direct=True, **kw)
    except BenchError as exc:
        if "Invalid argument" not in str(exc) and "error 22" not in str(exc) \
                and "EINVAL" not in str(exc):
            raise
    drop_caches()
    return fio(path, rw, runtime, qd, direct=False, **kw)


def can_open_direct(path: Path, write: bool = False) -> bool:
    try:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of `pid` in MiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (what a copy of the repository would take)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
