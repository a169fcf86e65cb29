"""Fixtures: the `rpfs` command against a per-test repository, mounts that are always
cleaned up, the live-disk tests' state, deterministic ext4 source images, and an S3
server on loopback."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import MiB, build_tree, is_fuse_mounted, make_ext4, wait_pid_exit
from livewriter import Live
from s3server import S3Server

from rpfs.index import Index

_SCRIPT = Path(sys.executable).parent / "rpfs"
RPFS_CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rpfs.cli"]

DAEMON_EXIT_TIMEOUT = 20.0


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        skip = pytest.mark.skip(reason="needs root and /dev/fuse")
        for item in items:
            if "mount" in item.fixturenames or "mounted" in item.fixturenames:
                item.add_marker(skip)


@dataclass
class Rpfs:
    """Runs the `rpfs` console script with RPFS_REPO set to this test's repository."""

    repo: Path
    env: dict[str, str] = field(default_factory=dict)

    def __call__(
        self, *args: str | Path, check: bool = False, timeout: float = 300, **kw
    ) -> subprocess.CompletedProcess:
        env = {**os.environ, "RPFS_REPO": str(self.repo), **self.env}
        res = subprocess.run(
            [*RPFS_CMD, *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"rpfs {' '.join(map(str, args))} exited {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def popen(self, *args: str | Path, **kw) -> subprocess.Popen:
        env = {**os.environ, "RPFS_REPO": str(self.repo), **self.env}
        return subprocess.Popen([*RPFS_CMD, *map(str, args)], env=env, **kw)

    def points(self, disk: str | None = None) -> list[dict]:
        args = ["points", "--json"] + ([disk] if disk else [])
        return json.loads(self(*args, check=True).stdout)

    def point(self, disk: str, name: str) -> dict:
        found = [p for p in self.points(disk) if p["name"] == name]
        assert len(found) == 1, f"no single point {disk}@{name} in {self.points()}"
        return found[0]

    def capture(self, disk: str, source: Path, name: str, *extra: str) -> dict:
        """`rpfs capture`; returns the new point's record, read from the index in-process
        (the same fields as `rpfs points --json`, without another process start)."""
        self("capture", disk, source, "--name", name, *extra, check=True)
        return self.point_record(disk, name)

    def point_record(self, disk: str, name: str) -> dict:
        from rpfs.lifecycle.cost import costs
        from rpfs.repo import Repository

        with Repository(self.repo) as repo, repo.index.read() as txn:
            point = repo.index.get_point(txn, disk, name)
            bs = repo.block_size
            assert point is not None, f"no point {disk}@{name}"
            cost = costs(repo.index, txn, [point]).points[(disk, name)]
        return {
            **dataclasses.asdict(point),
            "allocated_bytes": point.allocated_blocks * bs,
            "block_size": bs,
            **dataclasses.asdict(cost),
        }


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """An empty index of its own (no repository around it), for unit tests."""
    idx = Index(tmp_path / "index", map_size=64 << 20, create={})
    try:
        yield idx
    finally:
        idx.close()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """Where this test's repository lives (not created)."""
    return tmp_path / "repo"


@pytest.fixture
def rpfs(repo_dir: Path) -> Rpfs:
    return Rpfs(repo_dir)


@pytest.fixture
def repo(rpfs: Rpfs, repo_dir: Path) -> Path:
    """An initialised repository (64 KiB blocks)."""
    rpfs("init", check=True)
    return repo_dir


def _daemon_info(repo: Path) -> dict:
    try:
        return json.loads((repo / "locks" / "daemon.lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _is_rpfs_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"rpfs" in part for part in cmdline)


class Mounter:
    """Mounts the repository with `rpfs mount` and remembers what to clean up; as a
    context manager it cleans up on leaving, also on an error."""

    def __init__(self, rpfs: Rpfs, tmp_path: Path) -> None:
        self.rpfs = rpfs
        self.tmp_path = tmp_path
        self.mountpoints: list[Path] = []
        self.pids: list[int] = []

    def __call__(self, mountpoint: Path | None = None, *options: str, check: bool = True):
        """Mount at `mountpoint` (default tmp/mnt) with `rpfs mount` options; returns
        (mountpoint, CompletedProcess)."""
        mnt = (mountpoint or self.tmp_path / "mnt").absolute()
        mnt.mkdir(parents=True, exist_ok=True)
        if mnt not in self.mountpoints:
            self.mountpoints.append(mnt)
        res = self.rpfs("mount", *options, mnt, timeout=120)
        if res.returncode == 0:
            info = _daemon_info(self.rpfs.repo)
            if info.get("mountpoint") == str(mnt) and isinstance(info.get("pid"), int):
                self.pids.append(info["pid"])
        if check:
            assert res.returncode == 0, f"rpfs mount failed: {res.stderr}"
            assert is_fuse_mounted(mnt), f"{mnt} is not a FUSE mount after rpfs mount"
        return mnt, res

    def __enter__(self) -> Mounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def daemon_pid(self) -> int:
        return _daemon_info(self.rpfs.repo)["pid"]

    def cleanup(self) -> None:
        errors = []
        lazy = False
        for mnt in reversed(self.mountpoints):
            if not os.path.ismount(mnt):
                continue
            res = self.rpfs("umount", mnt, timeout=90)
            if res.returncode != 0 or os.path.ismount(mnt):
                errors.append(f"rpfs umount {mnt}: {res.stderr.strip()}")
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
                lazy = True  # the daemon serves on until the last open file is closed
        for pid in self.pids:
            if wait_pid_exit(pid, 5 if lazy else DAEMON_EXIT_TIMEOUT):
                continue
            if _is_rpfs_process(pid):  # only the daemon this test started
                errors.append(f"daemon {pid} still alive after unmount: SIGKILL")
                os.kill(pid, signal.SIGKILL)
                wait_pid_exit(pid, 10)
        for mnt in self.mountpoints:  # a killed daemon leaves a dead FUSE connection
            if is_fuse_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if errors:
            print("mount cleanup:", *errors, sep="\n  ", file=sys.stderr)


@pytest.fixture
def mount(rpfs: Rpfs, tmp_path: Path) -> Iterator[Mounter]:
    """A factory: `mount(path=None, check=True)`; every mount is undone at teardown."""
    with Mounter(rpfs, tmp_path) as mounter:
        yield mounter


@pytest.fixture
def mounted(repo: Path, mount: Mounter) -> Path:
    """The initialised repository mounted at tmp/mnt; returns the mountpoint."""
    mnt, _ = mount()
    return mnt


@dataclass(frozen=True)
class User:
    """A real unprivileged user, and a group it is a member of (not its primary group)."""

    name: str
    uid: int
    group: str
    gid: int  # of `group`

    def run(self, *cmd: str | Path, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        """Run `cmd` as this user with its own groups only (`setpriv --init-groups`)."""
        return subprocess.run(
            ["setpriv", f"--reuid={self.name}", f"--regid={self.name}", "--init-groups", "--",
             *map(str, cmd)],
            stdout=stdout, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
            timeout=60,
        )


@pytest.fixture
def other_user() -> Iterator[User]:
    """A system user created for this test (`useradd -M -r`) and removed afterwards, also
    when the test fails; it is a member of a group of its own, also removed."""
    if os.geteuid() != 0 or not all(map(shutil.which, ("useradd", "userdel", "setpriv"))):
        pytest.skip("needs root, useradd, userdel and setpriv")
    name = f"rpfst{os.getpid()}{secrets.token_hex(2)}"
    group = f"{name}g"
    subprocess.run(["groupadd", "-r", group], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "-M", "-r", "-U", "-G", group, "-s", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)
        try:
            yield User(name, pwd.getpwnam(name).pw_uid, group, grp.getgrnam(group).gr_gid)
        finally:
            subprocess.run(["userdel", name], check=True, capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)  # if userdel left it
    finally:
        subprocess.run(["groupdel", group], check=True, capture_output=True)


@pytest.fixture
def live(
    rpfs: Rpfs, repo: Path, mount: Mounter, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Live]:
    """A mounted repository and helpers; set up after `mount`, so torn down before it.
    Parametrized indirectly, its parameter is the `rpfs mount` options (e.g. --writeback)."""
    state = Live(rpfs, mount, tmp_path, getattr(request, "param", ()))
    state.start()
    try:
        yield state
    finally:
        state.teardown()


@pytest.fixture
def ext4_builder(tmp_path: Path) -> Callable[..., tuple[Path, Path, dict[str, str]]]:
    """`build(name, seed, size=64 MiB)` -> (image, tree, {path: sha256}), deterministic."""

    def build(name: str = "disk", seed: int = 1, size: int = 64 * MiB):
        tree = tmp_path / f"{name}-tree"
        sums = build_tree(tree, seed)
        image = tmp_path / f"{name}.img"
        make_ext4(tree, image, size)
        return image, tree, sums

    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"missing {tool}")
    return build


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """SeaweedFS answering S3 on 127.0.0.1 with its bucket made (tests/s3server.py);
    `stop()`/`start()` take it away and bring it back with its objects, `pause()`/
    `resume()` freeze it. Stopped at teardown, also when the test fails."""
    root = tmp_path / "s3"
    root.mkdir()
    with S3Server(root) as server:
        yield server


@pytest.fixture
def s3_repo(rpfs: Rpfs, repo_dir: Path, s3_server: S3Server) -> Path:
    """A repository whose packs go to `s3_server` (s3://BUCKET/repo): a 64 MiB read cache,
    requests retried for 5 s. `rpfs` carries the server's credentials from here on."""
    rpfs.env.update(s3_server.env())
    rpfs("init", "--store", f"s3://{s3_server.bucket}/repo", "--s3-endpoint",
         s3_server.endpoint, "--cache-size", "64M", "--s3-retry", "5s", check=True)
    return repo_dir


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_mounts(tmp_path_factory) -> Iterator[None]:
    """Fail the run if a mount under this session's temporary directory survived it."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    with open("/proc/mounts") as f:
        leaked = [line for line in f if line.split()[1].startswith(base + "/")]
    assert not leaked, f"tests left mounts behind: {leaked}"
