"""Who may read what: the mount's users and modes, and the repository's file modes.

The other user is a real account made for the test (`other_user`), and everything it
should be refused lives in a directory it may traverse (`public`): pytest's own
temporary directories are 0700, which would refuse it for the wrong reason.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounter, Rpfs, User
from helpers import (
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    is_fuse_mounted,
    point_image,
    read_at,
    write_random,
)


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory every user may traverse, removed afterwards (unless a mount is left)."""
    path = Path(tempfile.mkdtemp(prefix="rpfs-public-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        with open("/proc/mounts") as f:
            left = [line for line in f if line.split()[1].startswith(f"{path}/")]
        assert not left, f"mounts left under {path}: {left}"
        shutil.rmtree(path)


@pytest.fixture
def prpfs(public: Path) -> Rpfs:
    return Rpfs(public / "repo")


@pytest.fixture
def pmount(prpfs: Rpfs, public: Path) -> Iterator[Mounter]:
    """Mounts of the public repository (at public/mnt by default), undone at teardown."""
    with Mounter(prpfs, public) as mounter:
        yield mounter


@pytest.fixture
def served(prpfs: Rpfs, tmp_path: Path) -> Path:
    """The public repository with point vm@p of a 2 MiB source and disk x, a clone of it;
    returns the source."""
    prpfs("init", check=True)
    src = tmp_path / "vm.img"
    write_random(src, 2 * MiB, seed=21)
    prpfs.capture("vm", src, "p")
    prpfs("clone", "vm@p", "x", check=True)
    return src


def assert_refused(user: User, *cmd: str | Path) -> None:
    res = user.run(*cmd)
    assert res.returncode != 0, f"{user.name} ran {cmd}: {res.stdout[:200]!r}"
    assert res.stdout == "", res.stdout[:200]
    assert "Permission denied" in res.stderr, res.stderr


def read_as(user: User, path: Path, out: Path) -> None:
    """`cat path > out` as `user` (`out` is opened by the test: only the read is theirs)."""
    with open(out, "wb") as f:
        res = user.run("cat", path, stdout=f)
    assert res.returncode == 0, res.stderr


def mount_options(mnt: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            ours, _, theirs = line.partition(" - ")
            if ours.split()[4] == str(mnt):
                return set(theirs.split()[2].split(","))
    raise AssertionError(f"{mnt} is not in the mount table")


def modes(mnt: Path) -> dict[str, tuple[int, int, int]]:
    """(mode bits, uid, gid) of the mount's directories and images, seen by root."""
    paths = {
        "root": mnt, "points": mnt / "points", "disk dir": mnt / "points" / "vm",
        "point": point_image(mnt, "vm", "p"), "disk": mnt / "disks" / "x.img",
    }
    return {k: (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            for k, st in ((k, p.stat()) for k, p in paths.items())}


def test_default_mount_is_the_daemon_users_only(prpfs, pmount, served, other_user):
    mnt, _ = pmount()
    # FUSE lets no other user in at all: not a byte, not a listing, not a stat.
    assert_refused(other_user, "cat", point_image(mnt, "vm", "p"))
    assert_refused(other_user, "cat", mnt / "disks" / "x.img")
    assert_refused(other_user, "ls", mnt)
    assert_refused(other_user, "stat", mnt / "points")
    assert "allow_other" not in mount_options(mnt)
    assert_same_bytes(point_image(mnt, "vm", "p"), served)  # root reads as before
    assert modes(mnt) == {"root": (0o700, 0, 0), "points": (0o700, 0, 0),
                          "disk dir": (0o700, 0, 0), "point": (0o400, 0, 0),
                          "disk": (0o600, 0, 0)}


def test_allow_other_alone_still_lets_only_root_read(prpfs, pmount, served, other_user):
    mnt, _ = pmount(None, "--allow-other")
    assert {"allow_other", "default_permissions"} <= mount_options(mnt)
    assert modes(mnt) == {"root": (0o700, 0, 0), "points": (0o700, 0, 0),
                          "disk dir": (0o700, 0, 0), "point": (0o400, 0, 0),
                          "disk": (0o600, 0, 0)}
    assert_refused(other_user, "ls", mnt)
    assert_refused(other_user, "cat", point_image(mnt, "vm", "p"))
    assert_refused(other_user, "cat", mnt / "disks" / "x.img")
    assert_same_bytes(point_image(mnt, "vm", "p"), served)


def test_a_group_may_read_points_and_disks_but_not_write(
    prpfs, pmount, served, other_user, tmp_path
):
    mnt, _ = pmount(None, "--allow-other", "--gid", other_user.group, "--mode", "0640")
    g = other_user.gid
    assert modes(mnt) == {"root": (0o750, 0, g), "points": (0o750, 0, g),
                          "disk dir": (0o750, 0, g), "point": (0o440, 0, g),
                          "disk": (0o640, 0, g)}
    out = tmp_path / "read-by-user.img"
    read_as(other_user, point_image(mnt, "vm", "p"), out)
    assert_same_bytes(out, served)
    read_as(other_user, mnt / "disks" / "x.img", out)
    assert_same_bytes(out, served)
    res = other_user.run("ls", mnt / "points" / "vm")
    assert res.returncode == 0 and res.stdout.split() == ["p.img"], res
    res = other_user.run("dd", "if=/dev/zero", f"of={mnt / 'disks' / 'x.img'}", "bs=4096",
                         "count=1", "conv=notrunc")
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    assert_same_bytes(mnt / "disks" / "x.img", served)


def test_a_mode_without_owner_bits_reaches_the_daemon(prpfs, pmount, served, other_user,
                                                     tmp_path):
    # 0040 went to the daemon as "40", which it refused: "see its log".
    mnt, _ = pmount(None, "--allow-other", "--gid", other_user.group, "--mode", "0040")
    g = other_user.gid
    assert modes(mnt) == {"root": (0o050, 0, g), "points": (0o050, 0, g),
                          "disk dir": (0o050, 0, g), "point": (0o040, 0, g),
                          "disk": (0o040, 0, g)}
    out = tmp_path / "read-by-group.img"
    read_as(other_user, mnt / "disks" / "x.img", out)
    assert_same_bytes(out, served)


def test_the_owner_given_by_name_may_write_its_disk(prpfs, pmount, served, other_user, tmp_path):
    mnt, _ = pmount(None, "--allow-other", "--uid", other_user.name, "--gid",
                    str(other_user.gid), "--mode", "600")
    u, g = other_user.uid, other_user.gid
    assert modes(mnt) == {"root": (0o700, u, g), "points": (0o700, u, g),
                          "disk dir": (0o700, u, g), "point": (0o400, u, g),
                          "disk": (0o600, u, g)}
    disk = mnt / "disks" / "x.img"
    res = other_user.run("dd", "if=/dev/zero", f"of={disk}", "bs=4096", "count=1",
                         "conv=notrunc,fsync")
    assert res.returncode == 0, res.stderr
    assert read_at(disk, 0, 4096) == bytes(4096)
    assert read_at(disk, 4096, 2 * MiB) == read_at(served, 4096, 2 * MiB)
    out = tmp_path / "read-by-owner.img"
    read_as(other_user, point_image(mnt, "vm", "p"), out)
    assert_same_bytes(out, served)


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        (["--gid", "0"], ["--gid needs --allow-other"]),
        (["--uid", "0", "--mode", "0640"], ["--uid and --mode need --allow-other"]),
        (["--allow-other", "--mode", "0755"], ["invalid --mode", "0755"]),
        (["--allow-other", "--mode", "rw"], ["invalid --mode"]),
        (["--allow-other", "--gid", "no-such-group-rpfs"], ["no group named", "--gid"]),
        (["--allow-other", "--uid", "no-such-user-rpfs"], ["no user named", "--uid"]),
        # Past the kernel's ids the daemon hung on its own first stat; -1 is "no id".
        (["--allow-other", "--uid", "4294967296"], ["invalid --uid 4294967296", "4294967294"]),
        (["--allow-other", "--gid", "4294967295"], ["invalid --gid 4294967295", "4294967294"]),
        (["--allow-other", "--uid", "99999999999999999999"], ["invalid --uid"]),
        (["--allow-other", "--uid", "\u00b2"], ["no user named '\u00b2'"]),  # isdigit, not int
        (["--allow-other", "--gid", "\u0663"], ["no group named '\u0663'"]),  # an Arabic 3
    ],
)
def test_bad_access_options_are_one_clear_error(rpfs, repo, mount, options, needles):
    mnt, res = mount(None, *options, check=False)
    assert_one_line_error(res, *needles)
    assert not is_fuse_mounted(mnt)


# -- the repository's own files ----------------------------------------------------------


def wrong_modes(root: Path) -> list[str]:
    """Paths under `root` (and itself) that are not 0700 (directories) or 0600 (files)."""
    wrong = _wrong(root)
    for top, dirs, files in os.walk(root):  # symlinks are listed, not followed
        for name in dirs + files:
            wrong += _wrong(Path(top) / name)
    return wrong


def _wrong(path: Path) -> list[str]:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return []
    want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
    have = stat.S_IMODE(st.st_mode)
    return [] if have == want else [f"{path} {have:04o}"]


@pytest.fixture
def umask(request) -> Iterator[int]:
    """This process's umask (inherited by every rpfs command and daemon) for the test."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o000], indirect=True, ids=["0022", "0000"])
def test_repository_files_are_private_whatever_the_umask(
    umask, prpfs, pmount, other_user, tmp_path
):
    repo = prpfs.repo
    prpfs("init", check=True)
    src = tmp_path / "vm.img"
    write_random(src, 2 * MiB, seed=22)
    prpfs.capture("vm", src, "p")
    prpfs("clone", "vm@p", "c", check=True)
    mnt, _ = pmount()
    disk = mnt / "disks" / "c.img"
    subprocess.run(["dd", "if=/dev/zero", f"of={disk}", "bs=64k", "count=2", "conv=notrunc,fsync"],
                   check=True, capture_output=True)
    prpfs("snapshot", "c", "--name", "s", check=True)
    names = {p.relative_to(repo).as_posix() for p in repo.rglob("*")}
    assert {"control.sock", "rpfs.log", "index/data.mdb", "locks/daemon.lock",
            "locks/disk-c.lock"} <= names, names
    assert any(n.startswith("disks/") for n in names) and any(n.startswith("packs/")
                                                              for n in names)
    for path in (repo / "index" / "data.mdb", repo / "rpfs.log", repo / "rpfs.json", repo):
        assert_refused(other_user, "cat" if path.is_file() else "ls", path)
    assert wrong_modes(repo) == []
    prpfs("umount", mnt, check=True)
    assert wrong_modes(repo) == []
    # Even with the repository directory open to all, its files are not.
    repo.chmod(0o755)
    for path in (repo / "index" / "data.mdb", repo / "rpfs.log", repo / "rpfs.json"):
        assert_refused(other_user, "cat", path)


def test_a_repository_directory_of_another_user_is_refused(
    prpfs, pmount, other_user, tmp_path
):
    # Its owner may rename and replace anything in it, whatever its mode: the index, the
    # packs, or rpfs.log as a symlink to a file of root's, which rpfs then appended to.
    repo = prpfs.repo
    repo.mkdir()
    os.chown(repo, other_user.uid, other_user.gid)
    owned = f"{repo} is owned by {other_user.name} (uid {other_user.uid}), not by root"
    assert_one_line_error(prpfs("init"), owned)
    assert list(repo.iterdir()) == []
    os.chown(repo, 0, 0)
    prpfs("init", check=True)
    src = tmp_path / "vm.img"
    write_random(src, MiB, seed=24)
    prpfs.capture("vm", src, "p")
    os.chown(repo, other_user.uid, other_user.gid)
    assert_one_line_error(prpfs("points"), owned)
    _, res = pmount(None, check=False)
    assert_one_line_error(res, owned)
    os.chown(repo, 0, 0)
    victim = tmp_path / "root-only.txt"
    victim.write_text("root's\n")
    (repo / "rpfs.log").unlink(missing_ok=True)
    (repo / "rpfs.log").symlink_to(victim)
    _, res = pmount(None, check=False)
    assert_one_line_error(res, f"{repo / 'rpfs.log'} is a symlink", "remove the symlink")
    assert victim.read_text() == "root's\n"
    (repo / "rpfs.log").unlink()
    mnt, _ = pmount()
    assert_same_bytes(point_image(mnt, "vm", "p"), src)


def test_init_and_the_daemon_correct_modes_and_say_so(rpfs, repo_dir, mount, tmp_path):
    repo_dir.mkdir(mode=0o755)
    repo_dir.chmod(0o755)
    res = rpfs("init", check=True)
    assert f"rpfs: corrected the mode of {repo_dir} from 0755 to 0700" in res.stderr
    src = tmp_path / "vm.img"
    write_random(src, MiB, seed=23)
    rpfs.capture("vm", src, "p")
    pack = next((repo_dir / "packs").iterdir())
    outside = tmp_path / "outside.txt"
    outside.write_text("not the repository's")
    outside.chmod(0o644)
    (repo_dir / "link-to-outside").symlink_to(outside)
    wrong = {pack: 0o644, repo_dir / "index" / "data.mdb": 0o644, repo_dir / "packs": 0o755,
             repo_dir / "rpfs.json": 0o666, repo_dir: 0o711}
    for path, mode in wrong.items():
        path.chmod(mode)
    mnt, res = mount()
    log = (repo_dir / "rpfs.log").read_text()
    for path, mode in wrong.items():
        want = 0o700 if path.is_dir() else 0o600
        line = f"corrected the mode of {path} from {mode:04o} to {want:04o}"
        assert f"rpfs: {line}\n" in res.stderr, res.stderr
        assert f"WARNING rpfs.perms: {line}\n" in log
    assert len(res.stderr.splitlines()) == len(wrong), res.stderr
    assert wrong_modes(repo_dir) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a symlink is not followed
    assert_same_bytes(point_image(mnt, "vm", "p"), src)
    # Nothing wrong: nothing said.
    rpfs("umount", mnt, check=True)
    _, res = mount()
    assert res.stderr == ""
    assert_same_bytes(point_image(mnt, "vm", "p"), src)


def test_many_corrections_are_logged_and_summarised(rpfs, repo, mount):
    extra = repo / "extra"
    extra.mkdir(mode=0o700)
    for i in range(30):
        (extra / f"f{i:02d}").touch(mode=0o644)
    _, res = mount()
    lines = res.stderr.splitlines()
    assert len(lines) == 21, res.stderr
    assert all(line.startswith("rpfs: corrected the mode of ") for line in lines[:20])
    assert lines[20] == f"rpfs: and 10 more mode corrections: see {repo / 'rpfs.log'}"
    assert (repo / "rpfs.log").read_text().count("WARNING rpfs.perms: corrected") == 30
    assert wrong_modes(repo) == []
