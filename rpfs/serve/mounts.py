"""The mount table, and unmounting only what belongs to this repository.

`rpfs umount` runs as root, and `fusermount3 -u` unmounts whatever is mounted at a path
(the host's /proc, another repository's disks). So `unmount` first finds the mount at the
path in /proc/self/mountinfo and acts only on a `fuse.rpfs` mount that this repository's
daemon serves (its lock names the mount point), or served when it died (its lock is free
and still names the mount point, and the mount answers "not connected"). A bind mount of
that mount is the same FUSE connection (the same device in the table): `unmount` removes
it, and refuses to unmount the daemon's own mount while one is left, since the daemon
would go on serving there.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RpfsError
from ..repo import last_daemon_info, read_daemon_info

FSTYPE, SOURCE = "fuse.rpfs", "rpfs"  # what the daemon's fsname and subtype make
UMOUNT_TIMEOUT = 60.0  # seconds to wait for the daemon to exit after the unmount


@dataclass(frozen=True)
class Mount:
    path: str
    fstype: str
    source: str
    device: str  # major:minor: one FUSE connection, wherever it is mounted (bind mounts)
    id: int
    parent: int
    root: str  # the directory of the filesystem mounted here
    peers: str  # its peer group ("shared:N"), if its mounts propagate

    @property
    def is_rpfs(self) -> bool:
        return self.fstype == FSTYPE and self.source == SOURCE


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _table() -> list[Mount]:
    """Every mount in /proc/self/mountinfo, in its order."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            ours, _, theirs = line.partition(" - ")
            fields = ours.split()
            fstype, source = theirs.split()[:2]
            peers = next((f for f in fields[6:] if f.startswith("shared:")), "")
            mounts.append(Mount(_unescape(fields[4]), _unescape(fstype), _unescape(source),
                                fields[2], int(fields[0]), int(fields[1]),
                                _unescape(fields[3]), peers))
    return mounts


def _bind_mounts(mount: Mount) -> list[str]:
    """Where else `mount`'s filesystem is mounted and stays so when `mount` is unmounted.

    Not the copies that propagation made (a mount under a shared mount appears under its
    peers too, e.g. on systemd hosts): unmounting `mount` removes those with it. A copy
    sits at the same place of a filesystem whose mount is the same or a peer.
    """
    table = _table()
    by_id = {m.id: m for m in table}

    def place(m: Mount) -> tuple[str, str] | None:
        up = by_id.get(m.parent)
        if up is None:
            return None
        where = os.path.join(up.root, os.path.relpath(m.path, up.path))
        return (up.peers or str(up.id), os.path.normpath(where))

    here = place(mount)
    return [m.path for m in table if m.device == mount.device and m.id != mount.id
            and (here is None or place(m) != here)]


def mount_at(path: str) -> Mount | None:
    """The mount on top at `path` (the last one the table lists there), if any."""
    found = [m for m in _table() if m.path == path]
    return found[-1] if found else None


def table_path(path: Path) -> str:
    """`path` as the mount table writes it: absolute, with symlinks resolved.

    Only the parent is resolved at first: resolving the last component would stat the
    mount itself, which hangs if its daemon hangs. A symlink to a mount point is
    followed only when no mount sits at its own name.
    """
    path = Path(os.path.abspath(path))
    at = str(Path(os.path.realpath(path.parent)) / path.name) if path.name else str(path)
    if mount_at(at) is None and os.path.islink(at):
        return os.path.realpath(at)
    return at


def is_dead(path: str) -> bool:
    """True if the FUSE mount at `path` has lost its daemon ("not connected").

    statfs, because the kernel always asks the daemon for it: a stat may be answered from
    the attribute cache for a while after the daemon died.
    """
    try:
        os.statvfs(path)
    except OSError as exc:  # ECONNABORTED: a request was in flight when it died
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def serving_repository(path: str) -> tuple[Path, int] | None:
    """(repository, daemon pid) of the running rpfs daemon whose lock names mount `path`.

    Found through /proc/locks: a daemon holds an exclusive flock on REPO/locks/daemon.lock,
    so the holders' open files lead to the repositories. Only for messages: best effort.
    """
    try:
        with open("/proc/locks") as f:
            pids = {int(fields[4]) for fields in map(str.split, f)
                    if fields[1:2] == ["FLOCK"] and fields[3] == "WRITE"}
    except (OSError, ValueError, IndexError):
        return None
    for pid in sorted(pids):
        try:
            links = [os.readlink(e.path) for e in os.scandir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.endswith("/locks/daemon.lock"):
                root = Path(link).parent.parent
                if (read_daemon_info(root) or {}).get("mountpoint") == path:
                    return root, pid
    return None


def _fusermount(path: str, *flags: str) -> str | None:
    """Run `fusermount3 -u`; returns None on success, else its last line of complaint."""
    res = subprocess.run(["fusermount3", "-u", *flags, path], capture_output=True, text=True)
    if res.returncode == 0:
        return None
    return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"


def unmount(root: Path, mountpoint: Path) -> str:
    """Unmount this repository's mount at `mountpoint`; returns what was done, in words.

    Refuses anything else with an RpfsError that says what is mounted there. A mount whose
    daemon died is unmounted too (lazily if files are still open on it: they only get
    errors anyway), so that the repository can be mounted again.
    """
    path = table_path(mountpoint)
    mount = mount_at(path)
    if mount is None:
        raise RpfsError(f"{path} is not mounted")
    if not mount.is_rpfs:
        raise RpfsError(
            f"{path} is not an rpfs mount (it is a {mount.fstype} mount of {mount.source}); "
            "nothing was unmounted"
        )
    running = read_daemon_info(root)
    if running is not None and running.get("mountpoint") == path:
        # The daemon serves until its last mount is gone: with a bind mount left it would
        # go on serving there, and the lock with it, after "unmounted".
        others = _bind_mounts(mount)
        if others:
            raise RpfsError(
                f"{path} is also mounted at {', '.join(others)} (bind mounts); unmount "
                f"those first ('rpfs umount PATH' does); nothing was unmounted"
            )
        detail = _fusermount(path)
        if detail is not None:
            if "busy" in detail.lower():
                detail += "; close the files using it (see 'fuser -vm MOUNT') and try again"
            raise RpfsError(f"cannot unmount {path}: {detail}")
        # The daemon releases its lock when it exits (even before anyone reaps it).
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while read_daemon_info(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        if read_daemon_info(root):  # e.g. a bind mount in another mount namespace
            raise RpfsError(
                f"unmounted {path}, but its daemon (pid {running.get('pid', '?')}) still runs "
                f"after {UMOUNT_TIMEOUT:.0f}s: is it mounted elsewhere too? see {root / 'rpfs.log'}"
            )
        return f"unmounted {path}"
    served = mount_at(running.get("mountpoint", "")) if running is not None else None
    if served is not None and served.device == mount.device:  # a bind mount of ours
        detail = _fusermount(path)
        if detail is not None:
            raise RpfsError(f"cannot unmount {path}: {detail}")
        return f"unmounted {path} (a bind mount of {served.path}, which stays mounted)"
    last = last_daemon_info(root)  # (if a daemon runs, that is `running`: not at `path`)
    if last.get("mountpoint") == path and is_dead(path):
        if _fusermount(path) is None:
            return f"unmounted {path} (its daemon, pid {last.get('pid', '?')}, had died)"
        detail = _fusermount(path, "-z")
        if detail is not None:
            raise RpfsError(f"cannot unmount {path}: {detail}")
        return (f"detached {path} (its daemon, pid {last.get('pid', '?')}, had died; files "
                "still open on it fail until closed: see 'fuser -vm MOUNT')")
    raise RpfsError(f"{path} is an rpfs mount {_whose(path, root, running)}; nothing was unmounted")


def _whose(path: str, root: Path, running: dict | None) -> str:
    """Who serves the rpfs mount at `path`, which `root`'s daemon does not serve."""
    ours = (f"the daemon of {root} (pid {running.get('pid', '?')}) serves "
            f"{running.get('mountpoint', '?')}" if running is not None
            else f"no rpfs daemon serves {root}")
    other = serving_repository(path)
    if other is not None:
        return (f"of repository {other[0]} (daemon pid {other[1]}), not of {root} ({ours}); "
                f"run 'rpfs -r {other[0]} umount {path}'")
    if is_dead(path):
        return (f"whose daemon is gone, not the last mount of {root} ({ours}); unmount it with "
                f"'rpfs -r REPO umount' of its repository, or 'fusermount3 -u -z {path}'")
    return f"not served by {root} ({ours}); unmount it with 'rpfs -r REPO umount' of its repository"
