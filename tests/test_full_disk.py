"""Full disks: the repository lives on a small tmpfs of its own, which the tests fill.

A filler file (posix_fallocate) takes the free space; deleting it gives the space back.
What must hold: a refusal is one line that says how much is free and what to do, nothing
half written stays behind, earlier points stay exact, the daemon stays up and finishes
stalled archives by itself, and the space reserve keeps the index able to commit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    pid_alive,
    point_image,
    read_at,
    write_random,
)

from rpfs import capture as capture_mod
from rpfs.errors import NoSpace
from rpfs.index import ChunkLoc
from rpfs.repo import Repository

FS_SIZE = 96 * MiB
BS = 64 << 10


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of FS_SIZE bytes at tmp/fs, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(fs)],
                   check=True)
    try:
        yield fs
    finally:
        if subprocess.run(["umount", str(fs)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


@pytest.fixture
def repo_dir(small_fs: Path) -> Path:
    """The repository (of the `rpfs`, `repo` and `mount` fixtures) lives on the tmpfs."""
    return small_fs / "repo"


def free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def fill(fs: Path, leave: int, name: str = "filler") -> Path:
    """Take all free space of `fs` but `leave` bytes, with one new file; returns it."""
    path = fs / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        want = free_bytes(fs) - leave
        if want > 0:
            os.posix_fallocate(fd, 0, want)
    finally:
        os.close(fd)
    return path


def reserve_of(repo: Path) -> int:
    """The repository's free-space floor in bytes."""
    with Repository(repo) as r:
        return r.space.figures()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def index_state(repo: Path) -> tuple[dict[bytes, ChunkLoc], list, list]:
    """The chunk table, capture records and staging rows, read in-process."""
    with Repository(repo) as r, r.index.read() as txn:
        chunks = {bytes(k): ChunkLoc.decode(v) for k, v in txn.cursor(db=r.index.db["chunks"])}
        staged = list(txn.cursor(db=r.index.db["staging"]))
        return chunks, r.index.list_captures(txn), staged


def packs(repo: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (repo / "packs").iterdir()}


def assert_chunks_in_packs(repo: Path) -> None:
    """Every chunk record names bytes that exist in its pack file."""
    sizes = packs(repo)
    for loc in index_state(repo)[0].values():
        name = f"{loc.pack:08d}.pack"
        assert name in sizes and loc.offset + loc.length <= sizes[name], loc


def needs_mib(line: str) -> float:
    m = re.search(r"needs about ([\d.]+) MiB", line)
    assert m, line
    return float(m.group(1))


# -- captures -----------------------------------------------------------------------------


@pytest.mark.parametrize("reserve", ["default", "0"])
def test_capture_into_a_full_repository(rpfs, small_fs, tmp_path, reserve):
    """Stopped at the reserve or by ENOSPC itself (reserve 0): one line with the space it
    needed, exit 1, its packs gone, the earlier point exact."""
    rpfs("init", *([] if reserve == "default" else ["--reserve", reserve]), check=True)
    src = tmp_path / "vm.img"
    write_random(src, 8 * MiB, seed=1)
    rpfs.capture("vm", src, "p1")
    packs_before, index_before = packs(rpfs.repo), index_state(rpfs.repo)
    big = tmp_path / "big.img"
    write_random(big, 24 * MiB, seed=2)
    fill(small_fs, leave=6 * MiB)

    res = rpfs("capture", "vm2", big, "--name", "p1")
    assert res.returncode == 1
    line = assert_one_line_error(res, "no space for the capture of vm2", str(rpfs.repo),
                                 "free", "removed")
    assert 23 <= needs_mib(line) <= 26, line  # 24 MiB of random data
    assert packs(rpfs.repo) == packs_before  # its partial pack is gone
    assert index_state(rpfs.repo) == index_before  # no chunk, capture or staging row left
    assert free_bytes(small_fs) > 5 * MiB  # the space it took came back
    out = tmp_path / "out.img"
    rpfs("restore", "vm@p1", out, check=True)
    assert_same_bytes(out, src)


def test_failed_capture_removes_the_packs_it_registered(rpfs, repo, small_fs, tmp_path,
                                                        monkeypatch):
    """A capture that already committed chunks (refcount 0) in earlier flushes removes
    those records with its staging rows, and then their packs: nothing is left."""
    monkeypatch.setattr(capture_mod, "FLUSH_BYTES", 1 * MiB)  # commit every MiB
    src = tmp_path / "vm.img"
    write_random(src, 4 * MiB, seed=3)
    rpfs.capture("vm", src, "p1")
    packs_before, index_before = packs(repo), index_state(repo)
    big = tmp_path / "big.img"
    write_random(big, 24 * MiB, seed=4)
    fill(small_fs, leave=6 * MiB)
    with Repository(repo) as r, pytest.raises(NoSpace) as err:
        capture_mod.capture(r, "vm2", big, "p1")
    assert "needs about" in str(err.value)
    assert packs(repo) == packs_before
    assert index_state(repo) == index_before
    assert_chunks_in_packs(repo)


def test_capture_below_the_reserve_does_not_start(rpfs, repo, small_fs, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, 1 * MiB, seed=5)
    floor = reserve_of(repo)
    fill(small_fs, leave=floor // 2)
    res = rpfs("capture", "vm", src, "--name", "p1")
    assert_one_line_error(res, "no space for a capture of vm", "free", "reserve", "rpfs.json")
    assert packs(repo) == {}
    assert rpfs.points() == []


def test_init_reserve(rpfs, small_fs):
    rpfs("init", "--reserve", "10%", check=True)
    assert reserve_of(rpfs.repo) == FS_SIZE // 10
    bad = rpfs("-r", small_fs / "other", "init", "--reserve", "lots")
    assert_one_line_error(bad, "invalid reserve")
    assert not (small_fs / "other" / "rpfs.json").exists()


# -- new disks ----------------------------------------------------------------------------


def test_new_disks_on_a_full_disk_are_refused(rpfs, repo, small_fs, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, 1 * MiB, seed=6)
    rpfs.capture("vm", src, "p1")
    fill(small_fs, leave=reserve_of(repo) // 2)
    for args, name in ((["disk", "create", "d", "--size", "1G"], "d"),
                       (["clone", "vm@p1", "c"], "c")):
        res = rpfs(*args)
        assert_one_line_error(res, f"no space for a new disk {name}", "free", "reserve")
    assert not (repo / "disks").exists() or list((repo / "disks").iterdir()) == []
    assert [d["name"] for d in disks_json(rpfs)] == ["vm"]


# -- the daemon -----------------------------------------------------------------------------


def disks_json(rpfs) -> list[dict]:
    return json.loads(rpfs("disks", "--json", check=True).stdout)


def write_synced(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_errno(path: Path, offset: int, data: bytes) -> int:
    """0 if the write went through, else its errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def test_archiving_on_a_full_disk_stalls_and_resumes(rpfs, repo, small_fs, mount, tmp_path):
    mnt, _ = mount()
    pid = mount.daemon_pid()
    rpfs("disk", "create", "d", "--size", "16M", check=True)
    data = os.urandom(8 * MiB)
    img = mnt / "disks" / "d.img"
    write_synced(img, 0, data)
    expected = data + bytes(8 * MiB)
    filler = fill(small_fs, leave=reserve_of(repo) // 2)

    rpfs("snapshot", "d", "--name", "s1", check=True)
    wait_for(lambda: "stalled: no space on device" in rpfs("points", "d").stdout, 20,
             "the stalled state in 'rpfs points'")
    point = rpfs.point("d", "s1")
    assert (point["state"], point["stalled"]) == ("archiving", "no space on device")
    assert "archiving stalled: no space on device" in rpfs("disks", check=True).stdout
    # The point reads right meanwhile (from the frozen local blocks).
    assert point_image(mnt, "d", "s1").read_bytes() == expected
    # Copy-before-write needs space: the VM's write fails, the point keeps its bytes.
    assert pwrite_errno(img, 0, b"x" * 4096) == errno.ENOSPC
    # A clone needs the archive: refused at once, saying why.
    assert_one_line_error(rpfs("clone", "d@s1", "c"), "stalled", "no space on device")
    assert pid_alive(pid)

    filler.unlink()
    wait_for(lambda: rpfs.point("d", "s1")["state"] == "complete", 90, "the archive to resume")
    assert "stalled" not in rpfs("points", "d", check=True).stdout
    assert point_image(mnt, "d", "s1").read_bytes() == expected
    out = tmp_path / "s1.img"
    rpfs("restore", "d@s1", out, check=True)
    assert out.read_bytes() == expected
    assert read_at(img, 0, 4096) == data[:4096]  # the refused write changed nothing
    assert pid_alive(pid)
    log = (repo / "rpfs.log").read_text()
    assert "archiving stalled" in log and "archiving resumed" in log
    assert "--- Logging error ---" not in log and "Traceback" not in log


def test_reserve_refuses_new_blocks_not_rewrites(rpfs, repo, small_fs, mount, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, 4 * MiB, seed=7)
    rpfs.capture("vm", src, "p1")
    mnt, _ = mount()
    rpfs("disk", "create", "d", "--size", "16M", check=True)
    rpfs("clone", "vm@p1", "c", check=True)
    img = mnt / "disks" / "d.img"
    old = os.urandom(2 * MiB)
    write_synced(img, 0, old)
    filler = fill(small_fs, leave=reserve_of(repo) // 2)
    time.sleep(1)  # the daemon trusts a free-space figure for half a second

    new = os.urandom(BS)
    assert pwrite_errno(img, 8 * MiB, new) == errno.ENOSPC  # a hole: new space
    write_synced(img, 0, new)  # a rewrite of an allocated block: no new space
    assert read_at(img, 0, 2 * MiB) == new + old[BS:]
    assert read_at(img, 8 * MiB, BS) == bytes(BS)
    # A clone's blocks still read (copy-on-read serves them without keeping them).
    assert_same_bytes(mnt / "disks" / "c.img", src)
    assert [d["hydrated_pct"] for d in disks_json(rpfs) if d["name"] == "c"] == [0]
    # Hydration and captures do not start.
    assert_one_line_error(rpfs("hydrate", "c"), "no space for hydrating disk c", "reserve")
    assert_one_line_error(rpfs("capture", "vm2", src), "no space for a capture of vm2")

    filler.unlink()
    time.sleep(1)
    assert pwrite_errno(img, 8 * MiB, new) == 0
    assert read_at(img, 8 * MiB, BS) == new
    assert "--- Logging error ---" not in (repo / "rpfs.log").read_text()


def test_os_error_through_the_daemon_is_one_line(rpfs, small_fs, mount, tmp_path):
    """With no reserve, hydration hits ENOSPC itself: the control socket's reply is the
    one-line description, not an 'internal error'; the daemon stays up."""
    rpfs("init", "--reserve", "0", check=True)
    src = tmp_path / "vm.img"
    write_random(src, 8 * MiB, seed=8)
    rpfs.capture("vm", src, "p1")
    mnt, _ = mount()
    rpfs("clone", "vm@p1", "c", check=True)
    fill(small_fs, leave=0)
    line = assert_one_line_error(rpfs("hydrate", "c"), "no space left on the filesystem of",
                                 "free space there")
    assert "internal error" not in line
    assert pid_alive(mount.daemon_pid())
    assert_same_bytes(mnt / "disks" / "c.img", src)


# -- the CLI and the log --------------------------------------------------------------------


def test_restore_onto_a_full_filesystem_names_the_target(rpfs, tmp_path, small_fs):
    rpfs.repo = tmp_path / "repo-elsewhere"  # the repository is not the one that is full
    rpfs("init", check=True)
    src = tmp_path / "vm.img"
    write_random(src, 8 * MiB, seed=9)
    rpfs.capture("vm", src, "p1")
    fill(small_fs, leave=1 * MiB)
    target = small_fs / "out.img"
    res = rpfs("restore", "vm@p1", target)
    assert_one_line_error(res, "no space left on the filesystem of", str(target))


def test_a_bug_is_one_line_with_the_log_path(rpfs, repo):
    code = ("import sys, rpfs.cli.main as cli\n"
            "def boom(args): raise KeyError('planted')\n"
            "cli.cmd_disks = boom\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    for verbose in ([], ["-v"]):
        res = subprocess.run([sys.executable, "-c", code, *verbose, "-r", str(repo), "disks"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("rpfs: internal error: KeyError: 'planted'"), res.stderr
        assert str(repo / "rpfs.log") in last
        assert ("Traceback" in res.stderr) == bool(verbose), res.stderr
    log = (repo / "rpfs.log").read_text()
    assert log.count("KeyError: 'planted'") == 2 and "Traceback" in log


def test_a_log_that_cannot_be_written_is_one_line(small_fs, capsys):
    """The daemon's log handler on a full filesystem: no '--- Logging error ---'
    traceback per message, one line on stderr, and a note once it writes again."""
    from rpfs.cli.logs import file_log

    path = small_fs / "rpfs.log"
    handler = file_log(small_fs)
    logger = logging.getLogger("rpfs.test-full-log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        handler.flush()
        with open(path, "ab") as f:  # tmpfs gives a file room up to the end of its page
            f.write(b"#" * (-path.stat().st_size % 4096))
        filler = fill(small_fs, leave=0)
        for i in range(3):
            logger.warning("while full %d", i)
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err, err
        assert err.count("\n") == 1 and err.startswith("rpfs: cannot write the log"), err
        filler.unlink()
        logger.warning("after")
        assert capsys.readouterr().err == ""
        text = path.read_text()
        assert "after" in text
        assert "could not be written for 3 message(s)" in text
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_write_cut_short_by_enospc_keeps_the_rest_of_its_blocks(rpfs, small_fs, mount,
                                                                    tmp_path):
    """No reserve: a write into a clone's unfetched blocks runs out of space halfway.
    What the VM is told was written reads back; the rest of the disk still reads as the
    point it was cloned from (not as the holes the short write left)."""
    rpfs("init", "--reserve", "0", check=True)
    src = tmp_path / "vm.img"
    write_random(src, 4 * MiB, seed=10)
    rpfs.capture("vm", src, "p1")
    mnt, _ = mount()
    rpfs("clone", "vm@p1", "c", check=True)
    img = mnt / "disks" / "c.img"
    fill(small_fs, leave=200 << 10)
    new = os.urandom(2 * MiB)
    fd = os.open(img, os.O_RDWR)
    try:
        written = os.pwrite(fd, new, 0)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        written = 0
    finally:
        os.close(fd)
    assert written < len(new)
    expected = new[:written] + src.read_bytes()[written:]
    assert img.read_bytes() == expected
