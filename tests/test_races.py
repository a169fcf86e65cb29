"""Commands that change what an image reads (rollback, disk delete, point purge) racing
open() of the image, through the real mount: the command is refused, or the open waits
for it and then reads the new state (a purged point's image, opened before, reads on to
its close); an open file never sees its bytes change (buffered or O_DIRECT), and a
deleted point's image never reads zeros. And a clone racing the delete of its origin.

Run as a script (`python test_races.py opener ...`), this file is the opener process.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import mmap
import os
import sys
import time

PROBE = 4096  # bytes of block 0 each read looks at: one page, as O_DIRECT needs


def read_block0(fd: int) -> tuple[bytes, bytes]:
    """The start of block 0 read twice from one open file: buffered (the kernel's page
    cache may answer) and O_DIRECT (always the daemon)."""
    buffered = os.pread(fd, PROBE, 0)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    try:
        with mmap.mmap(-1, PROBE) as buf:  # page aligned
            direct = bytes(buf[: os.preadv(fd, [buf], 0)])
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return buffered, direct


def tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def opener_main(argv: list[str]) -> int:
    """Open, read block 0, hold, read it again, close; as fast as it can, logging each.

    Log lines (line-buffered): `O tag tag tag tag` (buffered and O_DIRECT at open, then
    the same before close) or `E errno` for an open that failed.
    """
    p = argparse.ArgumentParser(prog="opener")
    p.add_argument("image")
    p.add_argument("--log", required=True)
    p.add_argument("--stop", required=True, help="stop when this file exists")
    p.add_argument("--hold", type=float, default=0.002, help="seconds between the reads")
    p.add_argument("--gap", type=float, default=0.002, help="seconds between close and open")
    p.add_argument("--until-gone", action="store_true", help="stop at the first ENOENT")
    p.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    with open(args.log, "w", buffering=1) as log:
        while not os.path.exists(args.stop) and time.monotonic() < deadline:
            try:
                fd = os.open(args.image, os.O_RDONLY)
            except OSError as exc:
                log.write(f"E {exc.errno}\n")
                if args.until_gone and exc.errno == errno.ENOENT:
                    return 0
                time.sleep(args.gap)
                continue
            try:
                first = read_block0(fd)
                time.sleep(args.hold)
                last = read_block0(fd)
            finally:
                os.close(fd)
            log.write("O " + " ".join(tag(x) for x in (*first, *last)) + "\n")
            time.sleep(args.gap)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["opener"]:
    sys.exit(opener_main(sys.argv[2:]))


import contextlib  # noqa: E402  (the opener process above needs none of this)
import io  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import BS, MiB, assert_one_line_error, point_image, write_at  # noqa: E402

from rpfs.cli import main as cli  # noqa: E402
from rpfs.disks import service as service_module  # noqa: E402
from rpfs.disks.service import DiskService  # noqa: E402
from rpfs.errors import RpfsError  # noqa: E402
from rpfs.lifecycle.purge import refcount_errors  # noqa: E402
from rpfs.repo import Repository  # noqa: E402
from rpfs.serve.control import RemoteService  # noqa: E402

HERE = Path(__file__).resolve()
A = b"A" * BS  # block 0 of the older point
B = b"B" * BS  # block 0 of the newer one
BLOCK0 = {"pa": "A", "pb": "B"}  # the points of two_points()
ROLLBACKS = 200  # rollbacks raced against the opener (~3 s)
DELETES = 12  # disks deleted while an opener opens their point image


def rpfs_main(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`rpfs ARGS` run in this process: the CLI's own code, through the daemon's socket,
    without an interpreter start per call (~0.3 s), so a loop races hundreds of commands
    in seconds instead of dozens (at 40 commands a run, the unfixed race went unseen in
    one run of five)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["-r", str(repo), *args])
    return subprocess.CompletedProcess(["rpfs", *args], rc, out.getvalue(), err.getvalue())


def names_of(*contents: bytes) -> dict[str, str]:
    """tag -> a readable name, for assertion messages."""
    out = {tag(bytes(PROBE)): "zeros"}
    for i, data in enumerate(contents):
        out[tag(data[:PROBE])] = "AB"[i] if i < 2 else f"content {i}"
    return out


def wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_idle(remote: RemoteService, disk: str) -> None:
    """Until the daemon has had the kernel's release of every file of `disk`'s image."""
    wait_until(
        lambda: next(d for d in remote.disks() if d["name"] == disk)["state"] == "idle",
        f"disk {disk} to be closed",
    )


def wait_complete(rpfs, disk: str, point: str) -> None:
    wait_until(lambda: rpfs.point_record(disk, point)["state"] == "complete",
               f"{disk}@{point} to be archived")


def spawn_opener(image: Path, log: Path, stop: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), "opener", str(image), "--log", str(log), "--stop",
         str(stop), *extra]
    )


def opener_records(log: Path) -> tuple[list[list[str]], list[int]]:
    """(the four tags of every open that succeeded, the errno of every one that failed)."""
    opens, errors = [], []
    for line in log.read_text().splitlines():
        kind, *fields = line.split()
        if kind == "O":
            opens.append(fields)
        else:
            errors.append(int(fields[0]))
    return opens, errors


@contextlib.contextmanager
def opening_until_gone(image: Path, tmp_path: Path, round_: int, hold: str
                       ) -> Iterator[Path]:
    """An opener that opens, reads and closes a point's `image` as fast as it can until
    the image is gone (it ends at its first ENOENT), started and seen to open once; the
    body removes the image, and on the way out the opener is waited for, or stopped if
    the body failed. Yields the opener's log, for `assert_only_own_bytes`."""
    log, stop = tmp_path / f"opener-{round_}.log", tmp_path / f"stop-{round_}"
    opener = spawn_opener(image, log, stop, "--until-gone", "--hold", hold, "--gap", "0.001")
    try:
        wait_until(lambda: log.exists() and log.read_text(), "the first open")
        yield log
        opener.wait(timeout=30)
    finally:
        stop.touch()
        opener.wait(timeout=30)


def assert_only_own_bytes(log: Path, content: bytes, round_: int, *others: bytes) -> None:
    """Every open in the opener's `log` read the point's own bytes (`content`'s tag) to
    its close, and the only failure was the ENOENT that ended it."""
    opens, errors = opener_records(log)
    assert errors == [errno.ENOENT], f"round {round_}: failed opens {errors}"
    names = names_of(content, *others)
    wrong = [[names.get(t, "other") for t in rec] for rec in opens
             if rec != [tag(content[:PROBE])] * 4]
    assert not wrong, f"round {round_}: {len(wrong)} of {len(opens)} opens of the point " \
                      f"image read other bytes (A = the point), e.g. {wrong[0]}"


@pytest.fixture
def remote(mounted: Path, repo: Path) -> RemoteService:
    """The daemon's control socket, called in-process (no process start per command)."""
    return RemoteService(repo / "control.sock")


def two_points(remote: RemoteService, image: Path, disk: str) -> None:
    """Disk `disk` with point pa (block 0 = A), then pb (block 0 = B); they differ in 32
    MiB more, so that a rollback between them has work to do while an open races it."""
    remote.create(name=disk, size=64 * MiB)
    write_at(image, 0, A + os.urandom(32 * MiB))
    remote.snapshot(disks=[disk], name="pa")
    write_at(image, 0, B + os.urandom(32 * MiB))
    remote.snapshot(disks=[disk], name="pb")


def read_names(image: Path, names: dict[str, str]) -> list[str | None]:
    """What a fresh open of `image` reads at block 0, buffered and O_DIRECT."""
    fd = os.open(image, os.O_RDONLY)
    try:
        return [names.get(tag(x)) for x in read_block0(fd)]
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_open_while_a_rollback_waits_for_the_archive(rpfs, repo, mounted, remote):
    """The deterministic case: the rollback waits ~1 s for an archive; an open 50 ms in."""
    remote.create(name="d", size=256 * MiB)
    image = mounted / "disks" / "d.img"
    write_at(image, 0, A)
    remote.snapshot(disks=["d"], name="base")
    with open(image, "r+b") as f:
        f.write(B)
        for _ in range(50):
            f.write(os.urandom(4 * MiB))  # 200 MiB that do not compress: a long archive
    remote.snapshot(disks=["d"], name="big")
    wait_idle(remote, "d")
    assert rpfs.point_record("d", "big")["state"] == "archiving"
    outcome: list[subprocess.CompletedProcess] = []
    thread = threading.Thread(target=lambda: outcome.append(rpfs_main(repo, "rollback", "d@base")))
    thread.start()
    time.sleep(0.05)
    fd = os.open(image, os.O_RDONLY)
    try:
        at_open = read_block0(fd)
        thread.join(60)
        assert not thread.is_alive(), "the rollback did not return"
        later = read_block0(fd)
    finally:
        os.close(fd)
    names = names_of(A, B)
    seen = [names.get(tag(x), "other") for x in (*at_open, *later)]
    # Refused (the image was open before the rollback could act): B throughout. Done:
    # the open waited for it and reads A. Never both, never B after the rollback.
    res = outcome[0]
    if res.returncode:
        assert "disk d is open" in res.stderr, res.stderr
        assert seen == ["B"] * 4, f"rollback refused, but the open file read {seen}"
        wait_idle(remote, "d")
        assert rpfs_main(repo, "rollback", "d@base").returncode == 0
    else:
        assert seen == ["A"] * 4, f"rollback done, but the open file read {seen} " \
                                  "(buffered, O_DIRECT at open; the same after the rollback)"
    assert read_names(image, names) == ["A", "A"]


@pytest.mark.timeout(180)
def test_rollbacks_racing_opens_of_the_disk_image(rpfs, repo, mounted, remote, tmp_path):
    image = mounted / "disks" / "d.img"
    two_points(remote, image, "d")
    wait_complete(rpfs, "d", "pb")
    wait_idle(remote, "d")
    log, stop = tmp_path / "opener.log", tmp_path / "stop"
    opener = spawn_opener(image, log, stop, "--hold", "0.003", "--gap", "0.004")
    done = []
    try:
        wait_until(lambda: log.exists() and log.read_text(), "the opener's first open")
        for i in range(ROLLBACKS):
            target = ("pa", "pb")[i % 2]
            res = rpfs_main(repo, "rollback", f"d@{target}")
            if res.returncode == 0:
                done.append(target)
            else:
                assert_one_line_error(res, "disk d is open", "roll it back again")
    finally:
        stop.touch()
        opener.wait(timeout=30)
    opens, errors = opener_records(log)
    names = names_of(A, B)
    assert errors == [], f"opens failed: {Counter(errors)}"
    seen = Counter(tuple(names.get(t, "other") for t in rec) for rec in opens)
    bad = {reads: n for reads, n in seen.items() if reads not in (("A",) * 4, ("B",) * 4)}
    assert not bad, f"{sum(bad.values())} of {len(opens)} opens saw the disk change (or " \
                    f"the page cache differ from the daemon) while open: {bad}"
    assert done, f"every one of {ROLLBACKS} rollbacks was refused: the loop raced nothing"
    assert len(done) < ROLLBACKS, "no rollback was refused: the opener never held the disk"
    wait_idle(remote, "d")
    assert read_names(image, names) == [BLOCK0[done[-1]]] * 2


@pytest.mark.timeout(180)
def test_delete_racing_opens_of_a_point_image(rpfs, repo, mounted, remote, tmp_path):
    refused = 0
    for i in range(DELETES):
        disk = f"v{i}"
        content = os.urandom(BS)  # never all zeros
        remote.create(name=disk, size=MiB)
        write_at(mounted / "disks" / f"{disk}.img", 0, content)
        remote.snapshot(disks=[disk], name="p")
        wait_complete(rpfs, disk, "p")
        wait_idle(remote, disk)
        with opening_until_gone(point_image(mounted, disk, "p"), tmp_path, i, "0.001") as log:
            deadline = time.monotonic() + 30
            while (res := rpfs_main(repo, "disk", "delete", disk, "--with-points")).returncode:
                assert_one_line_error(res, f"disk {disk} has", "open point image")
                refused += 1
                assert time.monotonic() < deadline, "delete refused for 30 s"
            assert res.stdout == f"disk {disk}: deleted with 1 point(s): p\n"
        assert_only_own_bytes(log, content, i)
    assert rpfs.points() == []
    assert refused, "no delete was ever refused: the loop raced nothing"


def test_clone_racing_the_delete_of_its_origin(rpfs, repo, tmp_path, monkeypatch):
    """A clone reads its origin's point, then makes its local file, then commits: a
    `disk delete --with-points` of the origin committed in between (it saw no dependant
    yet) left a clone whose reads found zeros. The clone must see the deletion."""
    src = tmp_path / "vm.img"
    src.write_bytes(os.urandom(MiB))
    rpfs.capture("vm", src, "p")
    made, go = threading.Event(), threading.Event()

    def create_then_wait(path: Path, size: int) -> None:  # the clone's window, held open
        real_create(path, size)
        made.set()
        assert go.wait(30)

    real_create = service_module.create_local_file
    monkeypatch.setattr(service_module, "create_local_file", create_then_wait)
    outcome: list[object] = []
    with Repository(repo) as opened:
        service = DiskService(opened)

        def clone() -> None:
            try:
                outcome.append(service.clone("vm@p", "c"))
            except RpfsError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=clone)
        thread.start()
        try:
            assert made.wait(30)
            service.delete("vm", with_points=True)
        finally:
            go.set()
            thread.join(30)
    assert isinstance(outcome[0], RpfsError), f"the clone was made: {outcome[0]}"
    assert str(outcome[0]) == "cannot clone vm@p: it was deleted meanwhile; disk c was not created"
    assert rpfs("disks", "--json", check=True).stdout.strip() == "[]"
    assert list((repo / "disks").iterdir()) == []  # no orphan local file


@pytest.mark.timeout(180)
def test_purge_racing_opens_of_its_point_image(rpfs, repo, mounted, remote, tmp_path):
    """`point delete --purge` while an opener opens, reads and closes the point's image
    as fast as it can: never refused; every open reads the point's own bytes to its
    close (its block 0 is read by nothing else, so an early release reads zeros or B),
    then opens are ENOENT; the trash empties and the refcounts are exact."""
    deferred = 0
    for i in range(DELETES):
        disk, content = f"v{i}", os.urandom(BS)  # never all zeros
        remote.create(name=disk, size=MiB)
        image = mounted / "disks" / f"{disk}.img"
        write_at(image, 0, content)
        remote.snapshot(disks=[disk], name="p")
        write_at(image, 0, B)  # the next point rewrites block 0: p's is its own
        remote.snapshot(disks=[disk], name="q")
        wait_complete(rpfs, disk, "q")
        wait_idle(remote, disk)
        with opening_until_gone(point_image(mounted, disk, "p"), tmp_path, i, "0.02") as log:
            res = rpfs_main(repo, "point", "delete", "--purge", f"{disk}@p")
            assert res.returncode == 0, res.stderr
            deferred += "closes" in res.stdout
        assert_only_own_bytes(log, content, i, B)
        wait_until(lambda: remote.list_trash() == [], "the purge at the last close")
    assert deferred, "no purge ever met an open image: the loop raced nothing"
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []
