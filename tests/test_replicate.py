"""Replication (issue 14): send/receive through a file and a pipe, pull and push through
a far `rpfs serve --stdio` started by a stand-in for ssh (tests/fakessh.py, which counts
the bytes each way and can SIGKILL the far side midway). The target is the test's own
repository, read back through its mount; the source is a second one."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Rpfs
from helpers import (
    MiB,
    assert_check_clean,
    assert_one_line_error,
    point_image,
    sha256_file,
    sha256sum,
    write_random,
)

FAKESSH = f"{sys.executable} {Path(__file__).parent / 'fakessh.py'}"
FAR_RPFS = f"{sys.executable} -m rpfs.cli"
BLOCK = 64 << 10
SIZE = 32 * MiB


@pytest.fixture
def source(tmp_path: Path) -> Rpfs:
    src = Rpfs(tmp_path / "source")
    src("init", check=True)
    return src


def _ssh_pull(rpfs: Rpfs, src: Rpfs, tmp_path: Path, *extra: str,
              kill_after: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    """`rpfs pull ssh://...` through fakessh; (result, bytes each way)."""
    log = tmp_path / "fakessh.json"
    log.unlink(missing_ok=True)
    rpfs.env.update(FAKESSH_LOG=str(log), FAKESSH_KILL_AFTER=str(kill_after))
    try:
        res = rpfs("pull", f"ssh://backup@host:2222{src.repo}", *extra, "--rsh", FAKESSH,
                   "--remote-rpfs", FAR_RPFS, "--json")
    finally:
        for key in ("FAKESSH_LOG", "FAKESSH_KILL_AFTER"):
            rpfs.env.pop(key)
    return res, json.loads(log.read_text())


def _churn(image: Path, rng: random.Random, blocks: int) -> None:
    """Overwrite `blocks` random blocks with random bytes."""
    with open(image, "r+b") as f:
        for block in rng.sample(range(SIZE // BLOCK), blocks):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))


def _two_points(src: Rpfs, tmp_path: Path, seed: int, first: str, second: str,
                blocks: int) -> tuple[str, str]:
    """Capture `web@first`, change `blocks` blocks, capture `web@second`; their sha256."""
    image = tmp_path / "web.img"
    write_random(image, SIZE, seed=seed)
    src.capture("web", image, first)
    one = sha256_file(image)
    _churn(image, random.Random(seed), blocks)
    src.capture("web", image, second)
    return one, sha256_file(image)


def _restored(rpfs: Rpfs, ref: str, tmp_path: Path) -> str:
    """The sha256 of point `ref` written out by `rpfs restore`."""
    out = tmp_path / "out.img"
    out.unlink(missing_ok=True)
    rpfs("restore", ref, out, check=True)
    return sha256_file(out)


def _points(rpfs: Rpfs, disk: str = "web") -> dict[str, dict]:
    return {p["name"]: p for p in rpfs.points(disk)}


def test_pull_full_and_incrementals(rpfs, repo, source, mount, tmp_path):
    """A full point and three incrementals, each pulled through ssh:// as it is taken:
    each incremental costs at most 1.1 x its changed blocks' stored bytes + 64 KiB; every
    point reads bit-exact through the target's mount; a hold and a description follow."""
    rng = random.Random(14)
    image = tmp_path / "web.img"
    write_random(image, SIZE, seed=1)
    sums = {}
    for i, name in enumerate(["p0", "p1", "p2", "p3"]):
        if i:
            _churn(image, rng, 10 * i)
        taken = source.capture("web", image, name)
        sums[name] = sha256_file(image)
        res, moved = _ssh_pull(rpfs, source, tmp_path)
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["points_published"] == [f"web@{name}"]
        assert summary["bytes_received"] == moved["from_far"]
        if i:
            assert moved["from_far"] <= 1.1 * taken["bytes_stored"] + 64 * 1024, (
                name, moved, taken["bytes_stored"])
            assert taken["bytes_stored"] >= 10 * i * BLOCK * 0.9  # random: no dedup
    source("hold", "web@p1", "--tag", "legal", check=True)
    source("point", "describe", "web@p2", "monthly", check=True)
    res, moved = _ssh_pull(rpfs, source, tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["points_published"] == []
    assert moved["from_far"] < 64 * 1024  # the catalog only
    target = _points(rpfs)
    assert target["p1"]["hold"] == "legal" and target["p2"]["description"] == "monthly"
    assert all(p["method"] == "received" for p in target.values())
    assert_one_line_error(rpfs("point", "delete", "web@p1"), "legal")
    assert_check_clean(rpfs)
    mnt, _ = mount()
    for name, digest in sums.items():
        assert sha256sum(point_image(mnt, "web", name)) == digest, name


def test_send_receive_file_and_pipe(rpfs, repo, source, tmp_path):
    mon, tue = _two_points(source, tmp_path, 2, "mon", "tue", 20)
    stream = tmp_path / "mon.rps"
    source("send", "web@mon", "-o", stream, check=True)
    # an incremental whose base the target lacks: refused, nothing published
    send = source.popen("send", "web@tue", "--from", "web@mon", stdout=subprocess.PIPE)
    res = rpfs("receive", stdin=send.stdout)
    send.stdout.close()  # the receiver gave up: the sender sees EPIPE, not a full pipe
    send.wait()
    assert_one_line_error(res, "web@mon", "does not have")
    assert rpfs.points() == []
    rpfs("receive", "-i", stream, check=True)
    send = source.popen("send", "web@tue", "--from", "web@mon", stdout=subprocess.PIPE)
    res = rpfs("receive", "--json", stdin=send.stdout)
    send.stdout.close()
    assert send.wait() == 0 and res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["points_published"] == ["web@tue"]
    # a receive into another disk name
    rpfs("receive", "-i", stream, "--disk", "copy", check=True)
    for ref, digest in (("web@mon", mon), ("web@tue", tue), ("copy@mon", mon)):
        assert _restored(rpfs, ref, tmp_path) == digest, ref
    assert_check_clean(rpfs)


def test_corrupt_and_truncated_streams(rpfs, repo, source, tmp_path):
    image = tmp_path / "web.img"
    write_random(image, 4 * MiB, seed=3)
    source.capture("web", image, "mon")
    stream = tmp_path / "mon.rps"
    source("send", "web@mon", "-o", stream, check=True)
    data = stream.read_bytes()
    flipped, cut = tmp_path / "flipped.rps", tmp_path / "cut.rps"
    pos = len(data) // 2
    flipped.write_bytes(data[:pos] + bytes([data[pos] ^ 1]) + data[pos + 1:])
    cut.write_bytes(data[: len(data) - 100])
    assert_one_line_error(rpfs("receive", "-i", flipped), "corrupt", "CRC32C")
    assert_one_line_error(rpfs("receive", "-i", cut), "cut short")
    assert rpfs.points() == [] and json.loads(rpfs("disks", "--json", check=True).stdout) == []
    assert_check_clean(rpfs)
    rpfs("receive", "-i", stream, check=True)  # the good one still goes in
    assert _restored(rpfs, "web@mon", tmp_path) == sha256_file(image)


def test_killed_pull_resumes(rpfs, repo, source, mount, tmp_path):
    """SIGKILL the far side halfway: the re-run moves only what is missing."""
    image = tmp_path / "web.img"
    write_random(image, SIZE, seed=4)
    source.capture("web", image, "mon")
    res, moved = _ssh_pull(rpfs, source, tmp_path, kill_after=SIZE // 2)
    assert_one_line_error(res, "far side")
    assert moved["from_far"] == SIZE // 2
    assert rpfs.points() == []
    assert_check_clean(rpfs)
    res, again = _ssh_pull(rpfs, source, tmp_path)
    assert res.returncode == 0, res.stderr
    # what arrived stayed: the re-run moves the other half (and 2 flushes' worth at most)
    assert again["from_far"] <= SIZE // 2 + 64 * 1024 + 2 * BLOCK, again
    assert_check_clean(rpfs)
    mnt, _ = mount()
    assert sha256sum(point_image(mnt, "web", "mon")) == sha256_file(image)


def test_backfill_and_serve_writes_nothing(rpfs, repo, source, mount, tmp_path):
    old, new = _two_points(source, tmp_path, 5, "old", "new", 30)
    before = _tree(source.repo)
    res = rpfs("pull", source.repo, "--last", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["points_published"] == ["web@new"]
    res = rpfs("pull", source.repo, "web", "--json")
    assert json.loads(res.stdout)["points_published"] == ["web@old"]
    assert _tree(source.repo) == before  # the far side wrote nothing
    assert_check_clean(rpfs)
    mnt, _ = mount()
    assert sha256sum(point_image(mnt, "web", "old")) == old
    assert sha256sum(point_image(mnt, "web", "new")) == new


def test_push(rpfs, repo, source, tmp_path):
    image = tmp_path / "web.img"
    write_random(image, 4 * MiB, seed=6)
    source.capture("web", image, "mon")
    res = source("push", f"ssh://host{rpfs.repo}", "--rsh", FAKESSH, "--remote-rpfs",
                 FAR_RPFS, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["points_published"] == ["web@mon"]
    assert _restored(rpfs, "web@mon", tmp_path) == sha256_file(image)


def test_bad_input(rpfs, repo, source, tmp_path):
    assert_one_line_error(rpfs("pull", tmp_path / "nowhere"), "no rpfs repository")
    assert_one_line_error(rpfs("pull", "ssh://host"), "ssh://[USER@]HOST")
    other = Rpfs(tmp_path / "big")
    other("init", "--block-size", "128K", check=True)
    image = tmp_path / "web.img"
    write_random(image, 1 * MiB, seed=7)
    other.capture("web", image, "mon")
    assert_one_line_error(rpfs("pull", other.repo), "block")
    source.capture("web", image, "mon")
    rpfs("pull", source.repo, check=True)
    write_random(image, 2 * MiB, seed=8)
    source.capture("web2", image, "a")
    rpfs("receive", "-i", _sent(source, "web2@a", tmp_path), "--disk", "x", check=True)
    assert_one_line_error(rpfs("receive", "-i", _sent(source, "web2@a", tmp_path, "b"),
                               "--disk", "web"), "bytes")


def _sent(src: Rpfs, ref: str, tmp_path: Path, tag: str = "a") -> Path:
    out = tmp_path / f"{ref.replace('@', '-')}-{tag}.rps"
    src("send", ref, "-o", out, check=True)
    return out


def _tree(root: Path) -> dict[str, tuple[str, float]]:
    """Every file under `root` but LMDB's lock file, with its hash and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "lock.mdb":
            out[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime)
    return out
