"""FUSE mounts the bench makes, each a context manager that always unmounts and stops the
process it started (by its pid, never by name)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .measure import BenchError, run, wait_for

MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 20.0
CEILINGFS = Path(__file__).resolve().parent.parent / "ceilingfs.py"


def mounted(path: Path) -> bool:
    """True if `path` is a mount point (read from /proc/self/mountinfo, never stat)."""
    target = str(Path(path).absolute())
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below `prefix`."""
    p = str(Path(prefix).absolute())
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [m for m in points if m == p or m.startswith(p + "/")]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def mount_device(path: Path) -> str | None:
    target = str(Path(path).absolute())
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                dev = fields[2]
    return dev


def read_ahead_kb(path: Path) -> int | None:
    """The effective readahead of the mount at `path` (its bdi's read_ahead_kb)."""
    dev = mount_device(path)
    try:
        return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def fusermount_u(path: Path, lazy: bool = False) -> bool:
    if not mounted(path):
        return True
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    res = subprocess.run(args, capture_output=True, text=True)
    return res.returncode == 0 or not mounted(path)


def stop_pid(pid: int, proc: subprocess.Popen | None = None,
             timeout: float = EXIT_TIMEOUT) -> None:
    """Wait for `pid` to exit; SIGTERM, then SIGKILL it if it does not."""

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return _is_zombie(pid)

    if wait_for(gone, timeout):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_for(gone, timeout / 2):
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def unmount(path: Path, pid: int | None, proc: subprocess.Popen | None = None) -> None:
    """Unmount `path`, then make sure the process serving it (started by us) is gone."""
    ok = fusermount_u(path)
    if not ok:  # busy: give readers a moment, then detach it lazily
        time.sleep(1)
        ok = fusermount_u(path) or fusermount_u(path, lazy=True)
    if pid is not None:
        stop_pid(pid, proc)
    if mounted(path):  # the server died without unmounting: drop the dead mount
        fusermount_u(path, lazy=True)
    if mounted(path):
        print(f"bench: WARNING: {path} is still mounted", file=sys.stderr)


@contextlib.contextmanager
def rpfs_mount(rpfs_cmd: list[str], repo: Path, mountpoint: Path,
               env: dict[str, str] | None = None, options: tuple[str, ...] = ()
               ) -> Iterator[int]:
    """`rpfs mount` with `options` (in `env`: a store's credentials); yields the daemon's
    pid (from REPO/locks/daemon.lock)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    pid = None
    try:
        run([*rpfs_cmd, "-r", repo, "mount", *options, mountpoint],
            timeout=MOUNT_TIMEOUT + 10, env=env)
        try:
            info = json.loads((repo / "locks" / "daemon.lock").read_text() or "{}")
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
        if pid is None:
            raise BenchError(f"rpfs mounted {mountpoint} but left no daemon pid in daemon.lock")
        yield pid
    finally:
        if mounted(mountpoint):
            res = subprocess.run([*rpfs_cmd, "-r", str(repo), "umount", str(mountpoint)],
                                 capture_output=True, text=True, timeout=120, env=env)
            if res.returncode != 0:
                unmount(mountpoint, pid)
        if pid is not None:
            stop_pid(pid)


@contextlib.contextmanager
def ceiling_mount(source: Path | str, mountpoint: Path) -> Iterator[int]:
    """scripts/ceilingfs.py serving `source`; yields its pid once it reports ready."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(CEILINGFS), str(source), str(mountpoint)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        line = _read_line(proc, MOUNT_TIMEOUT)
        if line != "ready":
            err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
            raise BenchError(f"ceilingfs did not get ready: {line or err.strip() or 'timeout'}")
        yield proc.pid
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        stop_pid(proc.pid, proc)
        if mounted(mountpoint):
            fusermount_u(mountpoint, lazy=True)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints, or '' if it exits or stays silent for `timeout`."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk:
            data += chunk
            if b"\n" in data:
                return data.split(b"\n", 1)[0].decode(errors="replace").strip()
        elif chunk == b"" or proc.poll() is not None:
            return data.decode(errors="replace").strip()
        time.sleep(0.02)
    return ""


@contextlib.contextmanager
def foreground_mount(cmd: list[str | Path], mountpoint: Path, ready: Path,
                     env: dict[str, str] | None = None, cwd: Path | None = None,
                     log: Path | None = None, stop_signal: int | None = None) -> Iterator[int]:
    """A peer's FUSE server run in the foreground by us; ready when `ready` exists.

    Ends with fusermount3 -u (or `stop_signal` to the pid first, for servers that unmount
    themselves on it), then waits for, and if need be kills, the pid.
    """
    logf = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
        env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
    )
    try:
        ok = wait_for(lambda: proc.poll() is not None or (mounted(mountpoint) and ready.exists()),
                      MOUNT_TIMEOUT, 0.1)
        if proc.poll() is not None or not ok:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
            raise BenchError(
                f"{Path(str(cmd[0])).name} mount did not come up: "
                f"{tail[0] if tail else 'timeout'}"
            )
        yield proc.pid
    finally:
        if stop_signal is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, stop_signal)
            wait_for(lambda: proc.poll() is not None, EXIT_TIMEOUT / 2)
        unmount(mountpoint, proc.pid, proc)
        if log:
            logf.close()
