"""The repository on disk: its layout, configuration, locks, index and chunk store.

    REPO/rpfs.json     format version, block size, hash and codec (written last by init)
    REPO/index/        LMDB environment (rpfs.index)
    REPO/packs/        NNNNNNNN.pack files (rpfs.store)
    REPO/locks/        fcntl locks: daemon.lock, disk-NAME.lock
    REPO/rpfs.log      the daemon's log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import perms
from .errors import RpfsError
from .index import Index
from .store import PackStore

FORMAT = 1
DEFAULT_REPO = "/var/lib/rpfs"
MIN_BLOCK, MAX_BLOCK = 4 << 10, 4 << 20


def repo_path(arg: str | None) -> Path:
    """The repository named by -r/--repo, else $RPFS_REPO, else /var/lib/rpfs."""
    return Path(arg or os.environ.get("RPFS_REPO") or DEFAULT_REPO).absolute()


@dataclass(frozen=True)
class Config:
    block_size: int
    format: int = FORMAT
    hash: str = "blake3"
    codec: str = "zstd"


class Repository:
    """An open repository. Cheap to open; safe to use from several threads."""

    def __init__(self, root: Path) -> None:
        cfg_path = root / "rpfs.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise RpfsError(
                f"no rpfs repository at {root}: run 'rpfs init' or pass -r/--repo "
                "(or set RPFS_REPO)"
            ) from None
        except (OSError, ValueError) as exc:
            raise RpfsError(f"cannot read {cfg_path}: {exc}") from None
        perms.check_owner(root)
        if raw.get("format") != FORMAT:
            raise RpfsError(
                f"{root} has repository format {raw.get('format')}, this rpfs reads {FORMAT}"
            )
        self.root = root
        self.config = Config(**raw)
        self.block_size = self.config.block_size
        self.index = Index(root / "index")
        self.store = PackStore(root / "packs", self.block_size)

    @classmethod
    def init(cls, root: Path, block_size: int) -> Repository:
        """Create a repository at `root`, which must be missing or an empty directory."""
        if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
            raise RpfsError(
                f"invalid block size {block_size}: use a power of two from 4K to 4M"
            )
        if (root / "rpfs.json").exists():
            raise RpfsError(f"{root} is already an rpfs repository; nothing was changed")
        if root.is_dir():
            perms.check_owner(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RpfsError(
                f"{root} exists and is not an empty directory; choose another path"
            )
        root.mkdir(mode=perms.DIR_MODE, parents=True, exist_ok=True)
        for sub in ("index", "packs", "locks"):
            (root / sub).mkdir(mode=perms.DIR_MODE, exist_ok=True)
        Index(root / "index").close()
        tmp = root / "rpfs.json.tmp"
        tmp.touch(mode=perms.FILE_MODE)
        tmp.write_text(json.dumps(Config(block_size=block_size).__dict__, indent=1) + "\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        tmp.rename(root / "rpfs.json")
        perms.enforce(root)  # an existing directory, or a umask that took bits away
        return cls(root)

    def close(self) -> None:
        self.store.close()
        self.index.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocate_pack(self) -> int:
        """A fresh pack id, committed at once so no other writer can take it."""
        with self.index.write() as txn:
            return self.index.next_id(txn, "pack")

    # -- locks ----------------------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def lock_disk(
        self, disk: str, holder: str = "a capture of it runs, or a daemon has it open"
    ) -> int:
        """Take a disk's exclusive lock; returns the fd that holds it (close to release)."""
        fd = os.open(self._lock_path(f"disk-{disk}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RpfsError(f"disk {disk} is busy: {holder}; wait for it to finish") from None
        return fd

    @contextlib.contextmanager
    def disk_lock(self, disk: str) -> Iterator[None]:
        """Exclusive right to change a disk (capture, snapshot, rollback, open for writing)."""
        fd = self.lock_disk(disk)
        try:
            yield
        finally:
            os.close(fd)

    def disk_lock_free(self, disk: str) -> bool:
        """True if nobody holds the disk's lock (so a capture record of it is dead)."""
        try:
            with self.disk_lock(disk):
                return True
        except RpfsError:
            return False

    def daemon_lock(self) -> int:
        """Take the one-daemon-per-repository lock; returns the fd to keep open.

        The lock keeps the record of the last daemon until `record_daemon`: a daemon that
        fails to start leaves it alone, and with it what `rpfs umount` needs to clean up
        the mount that daemon left behind.
        """
        path = self._lock_path("daemon")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_daemon_info(self.root) or {}
            raise RpfsError(
                f"repository {self.root} is already served by rpfs daemon pid "
                f"{other.get('pid', '?')} at {other.get('mountpoint', '?')}; "
                "run 'rpfs umount' there first"
            ) from None
        return fd

    @staticmethod
    def record_daemon(lock_fd: int, info: dict) -> None:
        """Write the running daemon's pid and mountpoint into its lock (see daemon_lock)."""
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, json.dumps(info).encode(), 0)


def read_daemon_info(root: Path) -> dict | None:
    """Pid and mountpoint of the daemon serving the repository at `root`, if one runs."""
    try:
        fd = os.open(root / "locks" / "daemon.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a daemon runs
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
        return None
    finally:
        os.close(fd)


def last_daemon_info(root: Path) -> dict:
    """What the last daemon of `root` wrote in its lock (pid, mountpoint), running or not:
    a daemon that was killed leaves it behind, and with it the mount it left dead."""
    try:
        return json.loads((root / "locks" / "daemon.lock").read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
