"""What `rpfs mount` and `rpfs umount` refuse: mount points the daemon cannot serve, and
mounts that are not this repository's (a tmpfs, another repository's disks)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mounter, Rpfs
from helpers import (
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    is_fuse_mounted,
    pid_alive,
    point_image,
    wait_pid_exit,
    write_random,
)

from rpfs.repo import read_daemon_info
from rpfs.serve.mounts import mount_at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


@pytest.fixture
def source(rpfs: Rpfs, repo: Path, tmp_path: Path) -> Path:
    """The repository holds vm@p of this 1 MiB source."""
    src = tmp_path / "vm.img"
    write_random(src, MiB, seed=31)
    rpfs.capture("vm", src, "p")
    return src


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for the test (a harmless stand-in for /proc), holding one file."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rpfs-test", str(where)],
                   check=True, capture_output=True)
    try:
        (where / "keep").write_text("still here")
        yield where
    finally:
        if os.path.ismount(where):
            subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def second(tmp_path: Path) -> Iterator[tuple[Rpfs, Mounter, Path]]:
    """Another repository with its own vm@p (of other bytes) and its mounter."""
    other = Rpfs(tmp_path / "repo-b")
    other("init", check=True)
    src = tmp_path / "vm-b.img"
    write_random(src, MiB, seed=32)
    other.capture("vm", src, "p")
    with Mounter(other, tmp_path) as mounter:
        yield other, mounter, src


def test_umount_refuses_what_is_not_an_rpfs_mount(rpfs, repo, tmpfs, tmp_path):
    link = tmp_path / "link-to-tmpfs"
    link.symlink_to(tmpfs)
    for args in (["umount", tmpfs], ["-r", tmp_path / "nonexistent", "umount", tmpfs],
                 ["umount", link]):
        res = rpfs(*args)
        assert_one_line_error(res, str(tmpfs), "not an rpfs mount", "tmpfs")
        assert os.path.ismount(tmpfs), args
        assert (tmpfs / "keep").read_text() == "still here"


def test_umount_refuses_another_repositorys_mount(rpfs, source, mount, second, tmp_path):
    other, other_mount, other_src = second
    mnt, _ = mount()
    mnt_b, _ = other_mount(tmp_path / "mnt-b")
    pid, pid_b = mount.daemon_pid(), other_mount.daemon_pid()
    res = rpfs("umount", mnt_b)
    assert_one_line_error(res, str(mnt_b), f"repository {other.repo}", f"pid {pid_b}",
                          f"rpfs -r {other.repo} umount")
    res = rpfs("-r", tmp_path / "nonexistent", "umount", mnt_b)
    assert_one_line_error(res, str(mnt_b), f"repository {other.repo}", "no rpfs daemon serves")
    res = other("umount", mnt)
    assert_one_line_error(res, str(mnt), f"repository {rpfs.repo}", f"pid {pid}")
    # Both still serve their own bytes.
    assert pid_alive(pid) and pid_alive(pid_b)
    assert_same_bytes(point_image(mnt_b, "vm", "p"), other_src)
    assert_same_bytes(point_image(mnt, "vm", "p"), source)
    # Each repository unmounts its own.
    other("umount", mnt_b, check=True)
    assert wait_pid_exit(pid_b, 20) and not is_fuse_mounted(mnt_b)
    assert pid_alive(pid) and is_fuse_mounted(mnt)
    rpfs("umount", mnt, check=True)
    assert wait_pid_exit(pid, 20) and not is_fuse_mounted(mnt)


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """`bind(path)` bind-mounts `path` at tmp/bind; undone at teardown if still there."""
    where = tmp_path / "bind"

    def make(path: Path) -> Path:
        where.mkdir()
        subprocess.run(["mount", "--bind", str(path), str(where)], check=True)
        return where

    try:
        yield make
    finally:  # (os.path.ismount misses a bind mount of a directory of the same filesystem)
        if mount_at(str(where)) is not None:
            subprocess.run(["umount", "-l", str(where)], check=True)


def test_umount_with_a_bind_mount_of_the_mount(rpfs, source, mount, bind):
    mnt, _ = mount()
    pid = mount.daemon_pid()
    other = bind(mnt)
    # The daemon serves on while any mount of its connection is left: refused, at once
    # (it waited 60 s, then said "unmounted" with the daemon still serving the bind).
    res = rpfs("umount", mnt, timeout=30)
    assert_one_line_error(res, f"{mnt} is also mounted at {other}", "nothing was unmounted")
    assert is_fuse_mounted(mnt) and pid_alive(pid)
    assert_same_bytes(point_image(mnt, "vm", "p"), source)
    res = rpfs("umount", other, check=True)
    assert res.stdout == f"unmounted {other} (a bind mount of {mnt}, which stays mounted)\n"
    assert not os.path.ismount(other) and pid_alive(pid)
    assert_same_bytes(point_image(mnt, "vm", "p"), source)
    rpfs("umount", mnt, check=True)
    assert wait_pid_exit(pid, 20) and not is_fuse_mounted(mnt)


def _kill_daemon(mount: Mounter, mnt: Path) -> int:
    pid = mount.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_pid_exit(pid, 10)
    with pytest.raises(OSError) as err:
        os.listdir(mnt)
    # "Transport endpoint is not connected" (or "connection abort", if a request was out)
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return pid


def test_umount_cleans_up_after_a_killed_daemon(rpfs, source, mount, tmp_path):
    mnt, _ = mount()
    held = open(point_image(mnt, "vm", "p"), "rb")  # noqa: SIM115 (a VM still has it open)
    try:
        pid = _kill_daemon(mount, mnt)
        _, res = mount(mnt, check=False)  # what the operator tries first
        assert_one_line_error(res, f"{mnt} is already a mount point (rpfs, its daemon is gone)",
                              "rpfs umount")
        # Not this repository's mount: refused, with the way out.
        stranger = Rpfs(tmp_path / "stranger")
        stranger("init", check=True)
        res = stranger("umount", mnt)
        assert_one_line_error(res, str(mnt), "daemon is gone", f"fusermount3 -u -z {mnt}")
        assert is_fuse_mounted(mnt)
        res = rpfs("umount", mnt, check=True)
        assert f"detached {mnt} (its daemon, pid {pid}, had died" in res.stdout
        assert not is_fuse_mounted(mnt)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the flush at close has nowhere to go
            held.close()
    mount(mnt)
    assert_same_bytes(point_image(mnt, "vm", "p"), source)
    pid = _kill_daemon(mount, mnt)
    res = rpfs("umount", mnt, check=True)
    assert res.stdout == f"unmounted {mnt} (its daemon, pid {pid}, had died)\n"
    assert not is_fuse_mounted(mnt)
    mount(mnt)  # the repository serves again
    assert_same_bytes(point_image(mnt, "vm", "p"), source)


def test_mount_refuses_a_mount_point_in_the_repository(rpfs, source, mount, tmp_path):
    rpfs("disk", "create", "d", "--size", "1M", check=True)
    repo = rpfs.repo
    link = tmp_path / "link-into-repo"
    link.symlink_to(repo / "index")
    cases = {repo / "disks": "is inside the repository", link: "is inside the repository",
             repo / "packs": "is inside the repository", repo: "is the repository"}
    before = sorted(p.name for p in repo.iterdir() if p.name != "rpfs.log")
    for target, needle in cases.items():
        _, res = mount(target, check=False)
        assert_one_line_error(res, needle, str(repo))
        assert not is_fuse_mounted(target.resolve())
        assert read_daemon_info(repo) is None
    # The repository inside the mount point: hidden by the mount. Not even with --nonempty.
    for options in ([], ["--nonempty"]):
        _, res = mount(tmp_path, *options, check=False)
        assert_one_line_error(res, f"the repository {repo} is inside the mount point {tmp_path}")
        assert not is_fuse_mounted(tmp_path)
    # In the foreground the daemon checks the same (it does the checking).
    res = rpfs("mount", "-f", repo / "packs", timeout=60)
    assert res.returncode == 1 and "is inside the repository" in res.stderr, res.stderr
    assert not is_fuse_mounted(repo / "packs")
    assert sorted(p.name for p in repo.iterdir() if p.name != "rpfs.log") == before
    # And the repository still works: a clone makes its local file under disks/.
    mnt, _ = mount()
    rpfs("clone", "vm@p", "c", check=True)
    assert_same_bytes(mnt / "disks" / "c.img", source)


def test_mount_refuses_a_bind_mount_of_the_repository(rpfs, source, mount, bind):
    # Under shared propagation (systemd's default) a mount at BIND/packs also covers
    # REPO/packs: the daemon's reads of packs wait on itself, for ever.
    repo = rpfs.repo
    other = bind(repo)
    for target in (other / "packs", other / "index"):
        _, res = mount(target, "--nonempty", check=False)
        assert_one_line_error(res, f"mount point {target} is inside the repository {repo}")
        assert not is_fuse_mounted(target) and not is_fuse_mounted(repo / target.name)
        assert read_daemon_info(repo) is None
    mnt, _ = mount()
    assert_same_bytes(point_image(mnt, "vm", "p"), source)


def test_mount_refuses_a_non_empty_directory_unless_nonempty(rpfs, source, mount, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious.txt").write_text("keep me")
    _, res = mount(full, check=False)
    assert_one_line_error(res, f"mount point {full} is not empty", "--nonempty")
    assert not is_fuse_mounted(full)
    res = rpfs("mount", "-f", full, timeout=60)
    assert res.returncode == 1 and "is not empty" in res.stderr, res.stderr
    assert not is_fuse_mounted(full)
    mnt, _ = mount(full, "--nonempty")
    assert_same_bytes(point_image(mnt, "vm", "p"), source)
    rpfs("umount", mnt, check=True)
    assert (full / "precious.txt").read_text() == "keep me"
