"""Bad input: each is one clear line `rpfs: error: ...` on stderr, a non-zero exit, and
nothing in the repository is lost or changed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Rpfs
from helpers import (
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    is_fuse_mounted,
    point_image,
    write_random,
)

from rpfs.repo import Repository


@pytest.fixture
def populated(rpfs, repo, tmp_path):
    """A repository with one point vm@p1 of an 8 MiB source."""
    src = tmp_path / "vm.img"
    write_random(src, 8 * MiB, seed=1)
    rpfs.capture("vm", src, "p1")
    return src


def assert_nothing_lost(rpfs, src: Path, tmp_path: Path, before: list[dict]) -> None:
    assert rpfs.points() == before
    out = tmp_path / f"check-{time.monotonic_ns()}.img"
    rpfs("restore", "vm@p1", out, check=True)
    assert_same_bytes(out, src)
    out.unlink()


BAD_COMMANDS = {
    # unknown disk or point
    "restore-unknown-disk": (["restore", "nodisk@x", "{out}"], ["nodisk"]),
    "restore-unknown-point": (["restore", "vm@nopoint", "{out}"], ["nopoint"]),
    "points-unknown-disk": (["points", "nodisk"], ["nodisk"]),
    "points-json-unknown-disk": (["points", "nodisk", "--json"], ["nodisk"]),
    # bad names
    "disk-dotdot": (["capture", "../x", "{src}"], ["invalid disk name", "../x"]),
    "disk-slash": (["capture", "a/b", "{src}"], ["invalid disk name"]),
    "disk-empty": (["capture", "", "{src}"], ["invalid disk name"]),
    "disk-hidden": (["capture", ".hidden", "{src}"], ["invalid disk name"]),
    "point-dotdot": (["capture", "vm", "{src}", "--name", "../x"], ["invalid point name"]),
    "point-slash": (["capture", "vm", "{src}", "--name", "a/b"], ["invalid point name"]),
    "point-empty": (["capture", "vm", "{src}", "--name", ""], ["invalid point name"]),
    "point-hidden": (["capture", "vm", "{src}", "--name", ".hidden"], ["invalid point name"]),
    "restore-bad-ref": (["restore", "../x@p1", "{out}"], ["invalid disk name"]),
    "restore-bad-point-ref": (["restore", "vm@a/b", "{out}"], ["invalid point name"]),
    "restore-no-at": (["restore", "vm", "{out}"], ["DISK@POINT"]),
    "points-bad-name": (["points", "../x"], ["invalid", "../x"]),
    # sources
    "missing-source": (
        ["capture", "vm", "{tmp}/nonexistent.img", "--name", "p2"],
        ["nonexistent.img"],
    ),
    "source-is-directory": (["capture", "vm", "{tmp}", "--name", "p2"], ["source"]),
    "size-mismatch": (["capture", "vm", "{other}", "--name", "p2"], ["size", "vm"]),
    "duplicate-point": (["capture", "vm", "{src}", "--name", "p1"], ["vm@p1", "already exists"]),
    # repositories
    "re-init": (["init"], ["already an rpfs repository"]),
    "bad-block-size": (["-r", "{tmp}/newrepo", "init", "--block-size", "3K"], ["block size"]),
    "restore-over-file": (["restore", "vm@p1", "{nonempty}"], ["--force"]),
    "restore-into-missing-dir": (["restore", "vm@p1", "{tmp}/no-dir/out.img"], ["no-dir"]),
    "restore-onto-directory": (["restore", "vm@p1", "{tmp}"], ["neither a regular file"]),
    "repo-is-a-file": (["-r", "{nonempty}", "points"], ["nonempty.img"]),
    # changed-extent lists
    "changed-not-json": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{notjson}"],
        ["not valid JSON"],
    ),
    "changed-past-end": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{pastend}"],
        ["past the disk's size"],
    ),
    "changed-negative": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{negative}"],
        ["item 0"],
    ),
    "changed-missing": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{tmp}/nope.json"],
        ["nope.json"],
    ),
    "changed-is-directory": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{tmp}"],
        ["cannot read changed-extent list"],
    ),
    "changed-not-list": (
        ["capture", "vm", "{src}", "--name", "p2", "--changed", "{notlist}"],
        ["JSON array"],
    ),
    "changed-first-capture-bad": (
        ["capture", "new", "{src}", "--changed", "{pastend}"],
        ["past the disk's size"],
    ),
    # mount / umount misuse
    "umount-not-mounted": (["umount", "{tmp}"], ["not mounted"]),
    "mount-missing-dir": (["mount", "{tmp}/no-such-dir"], ["no-such-dir"]),
}


def points_in_index(repo: Path) -> list[tuple[str, str, int]]:
    """The points, read in-process (cheaper than another `rpfs points` per case)."""
    with Repository(repo) as r, r.index.read() as txn:
        return [(p.disk, p.name, p.gen) for p in r.index.list_points(txn)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One repository with vm@p1 and the files the bad commands use, for all cases."""
    tmp = tmp_path_factory.mktemp("bad-input")
    rpfs = Rpfs(tmp / "repo")
    rpfs("init", check=True)
    src = tmp / "vm.img"
    write_random(src, 8 * MiB, seed=1)
    rpfs.capture("vm", src, "p1")
    write_random(tmp / "other.img", 8 * MiB + 4096, seed=2)
    (tmp / "nonempty.img").write_bytes(b"keep me")
    files = {
        "notjson": "this is not json",
        "pastend": json.dumps([{"start": 8 * MiB - 10, "length": 11}]),
        "negative": json.dumps([{"start": -65536, "length": 65536}]),
        "notlist": json.dumps({"start": 0, "length": 10}),
    }
    for key, text in files.items():
        (tmp / f"{key}.json").write_text(text)
    fmt = {
        "src": src,
        "other": tmp / "other.img",
        "tmp": tmp,
        "out": tmp / "out.img",
        "nonempty": tmp / "nonempty.img",
        **{k: tmp / f"{k}.json" for k in files},
    }
    return rpfs, src, tmp, fmt, rpfs.points()


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_input_is_one_clear_error(shared, case):
    rpfs, _src, tmp, fmt, before = shared
    args, needles = BAD_COMMANDS[case]
    res = rpfs(*[a.format(**fmt) for a in args], timeout=120)
    assert_one_line_error(res, *needles)
    assert not (tmp / "out.img").exists()  # a failed restore creates nothing
    assert (tmp / "nonempty.img").read_bytes() == b"keep me"
    assert not (tmp / "newrepo" / "rpfs.json").exists()
    assert points_in_index(rpfs.repo) == [(p["disk"], p["name"], p["gen"]) for p in before]


def test_bad_input_lost_nothing(shared):
    """After all the bad commands above, the point is still there and exact."""
    rpfs, src, tmp, _fmt, before = shared
    assert_nothing_lost(rpfs, src, tmp, before)
    assert {p.name for p in (rpfs.repo / "locks").iterdir()} <= {
        "disk-vm.lock",
        "disk-new.lock",
        "daemon.lock",
    }


def test_no_repository_is_a_clear_error(rpfs, tmp_path):
    for args in (["points"], ["capture", "vm", tmp_path], ["restore", "vm@p", tmp_path / "o"]):
        res = rpfs(*args)
        assert_one_line_error(res, "no rpfs repository", str(rpfs.repo))
    assert not rpfs.repo.exists()


def test_init_into_non_empty_folder_is_refused(rpfs, tmp_path):
    rpfs.repo.mkdir()
    (rpfs.repo / "precious.txt").write_text("do not touch")
    res = rpfs("init")
    assert_one_line_error(res, "not an empty directory")
    assert sorted(p.name for p in rpfs.repo.iterdir()) == ["precious.txt"]
    assert (rpfs.repo / "precious.txt").read_text() == "do not touch"
    # A plain file is refused as well.
    target = tmp_path / "a-file"
    target.write_text("x")
    res = rpfs("-r", target, "init")
    assert_one_line_error(res, "not an empty directory")
    assert target.read_text() == "x"
    # An empty existing directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    rpfs("-r", empty, "init", check=True)
    assert (empty / "rpfs.json").exists()


def test_reinit_keeps_points(rpfs, populated, tmp_path):
    before = rpfs.points()
    config = (rpfs.repo / "rpfs.json").read_bytes()
    assert_one_line_error(rpfs("init"), "already an rpfs repository")
    assert_one_line_error(rpfs("init", "--block-size", "4K"), "already an rpfs repository")
    assert (rpfs.repo / "rpfs.json").read_bytes() == config
    assert_nothing_lost(rpfs, populated, tmp_path, before)


def test_second_mount_of_same_repository_is_refused(rpfs, populated, mount, tmp_path):
    mnt, _ = mount()
    pid = mount.daemon_pid()
    other = tmp_path / "mnt2"
    for target in (other, mnt):
        _, res = mount(target, check=False)
        line = assert_one_line_error(res, "already served", str(pid))
        assert "rpfs umount" in line
    assert not is_fuse_mounted(other)
    # The first mount still serves and still owns the lock.
    assert mount.daemon_pid() == pid
    assert_same_bytes(point_image(mnt, "vm", "p1"), populated)
    rpfs("umount", mnt, check=True)
    # Once it is down, a mount elsewhere works.
    mnt2, _ = mount(other)
    assert_same_bytes(point_image(mnt2, "vm", "p1"), populated)


def test_point_images_are_read_only(rpfs, populated, mount, tmp_path):
    mnt, _ = mount()
    img = point_image(mnt, "vm", "p1")
    for mode in ("r+b", "wb", "ab"):
        with pytest.raises(OSError) as err:
            open(img, mode)  # noqa: SIM115
        assert err.value.errno == errno.EROFS, mode
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as err:
            os.open(img, flags)
        assert err.value.errno == errno.EROFS
    with pytest.raises(OSError) as err:
        os.truncate(img, 0)
    assert err.value.errno == errno.EROFS
    res = subprocess.run(["truncate", "-s", "0", str(img)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "Read-only file system" in res.stderr
    res = subprocess.run(
        ["dd", "if=/dev/zero", f"of={img}", "bs=4096", "count=1", "conv=notrunc"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    with pytest.raises(OSError) as err:
        os.chmod(img, 0o666)
    assert err.value.errno == errno.EROFS
    assert img.stat().st_size == 8 * MiB
    assert_same_bytes(img, populated)
    assert_nothing_lost(rpfs, populated, tmp_path, rpfs.points())


def test_namespace_changes_fail_with_erofs(rpfs, populated, mount, tmp_path):
    mnt, _ = mount()
    img = point_image(mnt, "vm", "p1")
    attempts = {
        "create": lambda: open(mnt / "points" / "vm" / "new.img", "wb"),  # noqa: SIM115
        "mkdir": lambda: os.mkdir(mnt / "points" / "newdisk"),
        "unlink": lambda: os.unlink(img),
        "rename": lambda: os.rename(img, img.with_name("renamed.img")),
        "symlink": lambda: os.symlink("x", mnt / "points" / "link"),
    }
    got = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            got[name] = "succeeded"
        except OSError as exc:
            got[name] = errno.errorcode.get(exc.errno, exc.errno)
    assert_same_bytes(img, populated)
    assert got == dict.fromkeys(attempts, "EROFS")


def test_output_to_a_closed_pipe_is_no_traceback(rpfs, populated):
    """`rpfs points --json | grep -q ...`: the reader may go before rpfs has written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        proc = rpfs.popen("points", "--json", stdout=write_end, stderr=subprocess.PIPE,
                          text=True)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert "Traceback" not in err, err
