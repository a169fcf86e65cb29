"""A damaged index or an edited rpfs.json: one clear error and nothing written, never a
SIGBUS, a traceback, an empty repository or wrong bytes; and the index comes back from
its checkpoints with `rpfs index restore`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Rpfs
from helpers import (
    BS,
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    is_fuse_mounted,
    read_at,
    write_at,
    write_random,
)

from rpfs import checkpoint
from rpfs.disks.service import DiskService
from rpfs.index import Index
from rpfs.repo import Repository

SEED = 9  # the flipped-bytes cases pick their bytes with random.Random(SEED)
SIZE = 1 * MiB
DAMAGED = ("is damaged", "rpfs index restore")


def data_file(repo: Path) -> Path:
    return repo / "index" / "data.mdb"


def flip_everywhere(path: Path, needle: bytes, offset: int, mask: int) -> int:
    """XOR the byte at `offset` of every copy of `needle` in the file with `mask`: LMDB
    keeps older copies of a page in free pages, so the live one is among them."""
    data = bytearray(path.read_bytes())
    found, pos = 0, data.find(needle)
    while pos >= 0:
        data[pos + offset] ^= mask
        found += 1
        pos = data.find(needle, pos + 1)
    assert found, f"{needle!r} is not in {path}"
    path.write_bytes(bytes(data))
    return found


def raw_record(repo: Path, db: str, key: bytes) -> bytes:
    index = Index(repo / "index")
    try:
        with index.read() as txn:
            raw = txn.get(key, db=index.db[db])
    finally:
        index.close()
    assert raw is not None
    return raw


def newest_meta_offset(path: Path) -> int:
    """Where the meta page LMDB uses (the higher txnid) starts."""
    data = path.read_bytes()[:8192]
    txnids = [struct.unpack_from("<Q", data, page + 16 + 128)[0] for page in (0, 4096)]
    return 4096 if txnids[1] > txnids[0] else 0


def flip_magic(repo: Path, rng: random.Random) -> None:
    path = data_file(repo)
    with open(path, "r+b") as f:
        pos = 16 + rng.randrange(4)  # mm_magic of the first meta page
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ rng.randrange(1, 256)]))


def flip_last_page(repo: Path, rng: random.Random) -> None:
    """A high bit of mm_last_pg: the file looks far too short for its pages."""
    path = data_file(repo)
    pos = newest_meta_offset(path) + 16 + 120 + rng.randrange(4, 7)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))


def flip_point_record(repo: Path, rng: random.Random) -> None:
    """A high bit in the JSON of vm@p1's record: not UTF-8 any more."""
    raw = raw_record(repo, "points", b"vm\0p1")
    flip_everywhere(data_file(repo), raw, rng.randrange(len(raw)), 0x80)


def flip_db_name(repo: Path, rng: random.Random) -> None:
    """A bit of the name under which the main database holds the `points` database."""
    flip_everywhere(data_file(repo), b"points", rng.randrange(6), 1 << rng.randrange(7))


def flip_page_type(repo: Path, rng: random.Random) -> None:
    """The type flags of the page that holds vm@p1's record."""
    path = data_file(repo)
    raw = raw_record(repo, "points", b"vm\0p1")
    data = bytearray(path.read_bytes())
    mask = rng.choice((0x01, 0x02, 0x04))
    pages = {pos // 4096 for pos in range(len(data)) if data.startswith(raw, pos)}
    for page in pages:
        data[page * 4096 + 10] ^= mask  # mp_flags
    path.write_bytes(bytes(data))


def edit_config(**change) -> Callable[[Path, random.Random], None]:
    def edit(repo: Path, rng: random.Random) -> None:
        path = repo / "rpfs.json"
        config = json.loads(path.read_text())
        config.update(change)
        path.write_text(json.dumps(config))

    return edit


def write_config(text: str) -> Callable[[Path, random.Random], None]:
    return lambda repo, rng: (repo / "rpfs.json").write_text(text)


CASES: dict[str, tuple[Callable[[Path, random.Random], None], tuple[str, ...]]] = {
    "truncate-20000": (lambda repo, rng: os.truncate(data_file(repo), 20000),
                       (*DAMAGED, "20000 bytes")),
    "truncate-0": (lambda repo, rng: os.truncate(data_file(repo), 0), (*DAMAGED, "empty")),
    "missing-data-file": (lambda repo, rng: data_file(repo).unlink(), (*DAMAGED, "missing")),
    "flip-meta-magic": (flip_magic, (*DAMAGED, "magic")),
    "flip-meta-last-page": (flip_last_page, (*DAMAGED, "its pages reach")),
    "flip-point-record": (flip_point_record, (*DAMAGED, "points/vm@p1")),
    "flip-database-name": (flip_db_name, (*DAMAGED, "'points' is missing")),
    "flip-page-type": (flip_page_type, DAMAGED),
    "config-block-size-text": (edit_config(block_size="x"), ("rpfs.json", "'block_size'")),
    "config-block-size-zero": (edit_config(block_size=0), ("rpfs.json", "'block_size'")),
    "config-block-size-bool": (edit_config(block_size=True), ("rpfs.json", "'block_size'")),
    "config-extra-key": (edit_config(colour="blue"), ("rpfs.json", "'colour'")),
    "config-format-newer": (edit_config(format=4), ("rpfs.json", "format 4", "newer rpfs")),
    "config-list": (write_config("[1, 2]"), ("rpfs.json", "JSON object")),
    "config-codec": (edit_config(codec="lz4"), ("rpfs.json", "'codec'", '"zstd"')),
    "config-hash": (edit_config(hash="sha256"), ("rpfs.json", "'hash'", '"blake3"')),
    "config-block-size-edited": (
        edit_config(block_size=4096),
        ("rpfs.json", "block_size 4096", '"block_size": 65536', "probably edited"),
    ),
}


def manifest(repo: Path) -> dict[str, str]:
    """sha256 of every file of the repository but LMDB's lock file, the lock files and
    the daemon's log (a refused mount may log its error there)."""
    out = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if path.is_file() and not (
            rel.startswith("locks/") or rel.endswith("lock.mdb") or rel == "rpfs.log"
        ):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """A repository with vm@p1, copied by each damage case, and a source for vm."""
    base = tmp_path_factory.mktemp("template")
    rpfs = Rpfs(base / "repo")
    rpfs("init", check=True)
    src = base / "vm.img"
    write_random(src, SIZE, seed=1)
    rpfs.capture("vm", src, "p1")
    write_random(src, SIZE, seed=2)  # what the refused capture would have stored
    return rpfs.repo, src


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_is_one_clear_error_and_nothing_is_written(case, template, rpfs, mount, tmp_path):
    shutil.copytree(template[0], rpfs.repo)
    damage, needles = CASES[case]
    damage(rpfs.repo, random.Random(SEED))
    before = manifest(rpfs.repo)
    out = tmp_path / "out.img"
    for args in (["points"], ["capture", "vm", template[1], "--name", "p2"],
                 ["restore", "vm@p1", out]):
        res = rpfs(*args)
        assert res.returncode == 1, f"rpfs {args[0]}: rc {res.returncode}\n{res.stderr}"
        assert_one_line_error(res, *needles)
    mnt, res = mount(check=False)
    assert res.returncode == 1, res.stderr
    assert_one_line_error(res, *needles)
    assert not is_fuse_mounted(mnt)
    assert not out.exists()
    assert manifest(rpfs.repo) == before


def test_index_restore_brings_back_the_newest_good_checkpoint(rpfs, repo, mount, tmp_path):
    """p1 and a clone's fsynced write are in a checkpoint; p2, a later write and a new
    disk are not (the checkpoints that held them are damaged too). After restore p1 reads
    bit-exact, p2 is reported lost, and the clone keeps both writes."""
    src_a, src_b = tmp_path / "a.img", tmp_path / "b.img"
    write_random(src_a, SIZE, seed=1)
    write_random(src_b, SIZE, seed=2)
    rpfs.capture("vm", src_a, "p1")
    mnt, _ = mount()
    rpfs("clone", "vm@p1", "d", check=True)
    image = mnt / "disks" / "d.img"
    first, second = b"W1" * (BS // 2), b"W2" * (BS // 2)
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), first, 3 * BS)
        os.fsync(f.fileno())
    rpfs("umount", mnt, check=True)  # the daemon takes a checkpoint as it stops
    good = checkpoint.list_checkpoints(repo)[0]
    mnt, _ = mount()
    rpfs("disk", "create", "e", "--size", "1M", check=True)
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), second, 10 * BS)  # block 10 was never read: ABSENT
        os.fsync(f.fileno())
    rpfs("umount", mnt, check=True)
    rpfs.capture("vm", src_b, "p2")
    newer = [c for c in checkpoint.list_checkpoints(repo) if c.created > good.created]
    assert len(newer) == 2
    for c in newer:
        os.truncate(c.path, 20000)
    flip_point_record(repo, random.Random(SEED))  # the points table still lists p2
    assert_one_line_error(rpfs("points"), *DAMAGED)

    res = rpfs("index", "restore", check=True)
    assert f"from checkpoint {good.path.name}" in res.stdout
    assert "lost (points newer than the checkpoint, per the index it replaces): vm@p2" in res.stdout
    assert "disk d: marked unclean" in res.stdout
    assert "blocks written after the checkpoint, kept: 1" in res.stdout
    assert "disks/00000002.raw" in res.stdout  # disk e's local file: e is lost
    assert len(list(repo.glob("index.damaged-*/data.mdb"))) == 1

    assert [p["name"] for p in rpfs.points()] == ["p1"]
    out = tmp_path / "p1.img"
    rpfs("restore", "vm@p1", out, check=True)
    assert_same_bytes(out, src_a)
    expected = tmp_path / "d-expected.img"
    expected.write_bytes(src_a.read_bytes())
    write_at(expected, 3 * BS, first)
    write_at(expected, 10 * BS, second)
    mnt, _ = mount()
    assert_same_bytes(image, expected)
    res = rpfs("snapshot", "d", "--name", "s1", check=True)
    assert "full-compare" in res.stdout
    point = mnt / "points" / "d" / "s1.img"
    assert_same_bytes(point, expected)
    rpfs("umount", mnt, check=True)
    rpfs.capture("vm", src_b, "p3")  # new packs do not clash with p2's


def test_restore_says_when_lost_points_cannot_be_known(rpfs, repo, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, SIZE, seed=1)
    rpfs.capture("vm", src, "p1")
    write_random(src, SIZE, seed=2)
    rpfs.capture("vm", src, "p2")
    for c in checkpoint.list_checkpoints(repo)[:1]:
        c.path.unlink()  # as if the capture of p2 died before its checkpoint
    os.truncate(data_file(repo), 20000)
    res = rpfs("index", "restore", check=True)
    assert "which ones cannot be known" in res.stdout
    assert [p["name"] for p in rpfs.points()] == ["p1"]


def test_restore_is_refused_while_served_or_when_not_damaged(rpfs, repo, mount, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, SIZE, seed=1)
    rpfs.capture("vm", src, "p1")
    assert_one_line_error(rpfs("index", "restore"), "not damaged", "--force")
    mnt, _ = mount()
    assert_one_line_error(rpfs("index", "restore", "--force"), "served by rpfs daemon")
    rpfs("umount", mnt, check=True)
    res = rpfs("index", "restore", "--force", "--verify-data", check=True)
    assert "decoded and hashed: all there" in res.stdout


def test_no_good_checkpoint_is_a_clear_error(rpfs, repo, tmp_path):
    src = tmp_path / "vm.img"
    write_random(src, SIZE, seed=1)
    rpfs.capture("vm", src, "p1")
    for c in checkpoint.list_checkpoints(repo):
        os.truncate(c.path, 0)
    os.truncate(data_file(repo), 0)
    assert_one_line_error(rpfs("index", "restore"), "no good index checkpoint")
    assert data_file(repo).stat().st_size == 0  # nothing was swapped


def test_checkpoints_are_kept_few_private_and_listed(rpfs, repo, tmp_path):
    src = tmp_path / "vm.img"
    for n in range(checkpoint.KEEP + 2):
        write_random(src, SIZE, seed=n)
        rpfs.capture("vm", src, f"p{n}")
    found = checkpoint.list_checkpoints(repo)
    assert len(found) == checkpoint.KEEP
    assert stat.S_IMODE((repo / checkpoint.CHECKPOINTS).stat().st_mode) == 0o700
    assert all(stat.S_IMODE(c.path.stat().st_mode) == 0o600 for c in found)
    os.truncate(found[0].path, 20000)
    lines = rpfs("index", "restore", "--list", check=True).stdout.splitlines()
    assert lines[1].startswith(found[0].path.name) and "bad: " in lines[1]
    assert lines[2].startswith(found[1].path.name)
    assert lines[2].split()[-2:] == [str(checkpoint.KEEP + 1), "good"]


def test_the_daemon_takes_checkpoints(rpfs, repo, mount):
    mnt, _ = mount()  # no checkpoint yet: the daemon takes one at once
    deadline = time.monotonic() + 20
    while not checkpoint.list_checkpoints(repo):
        assert time.monotonic() < deadline, "the daemon took no checkpoint at start"
        time.sleep(0.05)
    rpfs("disk", "create", "d", "--size", "1M", check=True)
    rpfs("umount", mnt, check=True)  # the index changed: one more as it stops
    found = checkpoint.list_checkpoints(repo)
    assert len(found) == 2
    copy = Index(found[0].path, copy=True)
    try:
        with copy.read() as txn:
            assert [d.name for d in copy.list_disks(txn)] == ["d"]
    finally:
        copy.close()


def test_a_repository_without_the_config_record_opens_and_gets_it(rpfs, repo, tmp_path):
    """Repositories made before the index recorded the config open as before; the first
    open records it, after checking rpfs.json against a stored block."""
    src = tmp_path / "vm.img"
    write_random(src, SIZE, seed=1)
    rpfs.capture("vm", src, "p1")
    index = Index(repo / "index")
    with index.write() as txn:
        txn.delete(b"config", db=index.db["meta"])
    index.close()
    config = repo / "rpfs.json"
    good = config.read_text()
    config.write_text(good.replace("65536", "4096"))
    assert_one_line_error(rpfs("points"), "stored blocks are 65536 bytes")
    config.write_text(good)
    assert [p["name"] for p in rpfs.points()] == ["p1"]
    with Repository(repo) as opened:
        assert opened.index.recorded == {"block_size": 65536, "hash": "blake3", "codec": "zstd"}


def test_restore_undoes_a_snapshot_that_was_still_archiving(rpfs, repo, tmp_path):
    """A checkpoint taken while a snapshot was half archived: after a later write to a
    frozen block (archived first, in the index the damage lost), the point's content is
    not known, so the restore drops it and both blocks are written again, as they are in
    the local file. Set up in-process to stop the archive at a known place."""
    rpfs("disk", "create", "d", "--size", "1M", check=True)
    a, b, c = (bytes([n]) * BS for n in (0xA1, 0xB2, 0xC3))
    with Repository(repo) as opened:
        service = DiskService(opened)
        disk = service.registry.acquire("d")
        try:
            disk.write(0, a)
            disk.write(BS, b)
            with disk.barrier(), opened.index.write() as txn:
                point = disk.snapshots.freeze(txn, "s1", time.time())
            disk.snapshots.frozen(point)
            assert disk.snapshots.archive_batch(limit=1) == 1  # block 0 archived, block 1 frozen
            good = checkpoint.take(opened)
            disk.write(BS, c)  # archives block 1 first (copy-before-write)
            disk.sync()
        finally:
            service.registry.release("d")
    flip_db_name(repo, random.Random(SEED))
    res = rpfs("index", "restore", check=True)
    assert f"from checkpoint {good.path.name}" in res.stdout
    assert "dropped d@s1" in res.stdout
    res = rpfs("snapshot", "d", "--name", "s2", check=True)
    assert "full-compare" in res.stdout
    out = tmp_path / "s2.img"
    rpfs("restore", "d@s2", out, check=True)
    assert read_at(out, 0, 2 * BS) == a + c
    assert rpfs.point("d", "s2")["gen"] == 1  # the undone snapshot's generation, again
    assert rpfs.point("d", "s2")["allocated_blocks"] == 2
