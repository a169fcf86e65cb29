"""The PackBackend contract, run against every backend (the local directory now; an
object store joins with its own `Harness`), and the read-error split above it: a pack
that cannot be read now is ChunkUnavailable (EIO, logged, not marked), bad bytes are
CorruptChunk (EIO, logged naming disk, point, block and pack, and marked for verify) —
in-process and through the mount."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BS, point_image, read_at, write_random

from rpfs.capture import capture
from rpfs.errors import ChunkUnavailable, CorruptChunk
from rpfs.index import IndexDamaged
from rpfs.repo import Repository
from rpfs.store.backend import PackBackend, PackMissing, PackUnavailable
from rpfs.store.cache import ChunkCache
from rpfs.store.format import HEADER, digest, encode_chunk, pack_name
from rpfs.store.local import LocalBackend
from rpfs.store.packs import PackStore

FAULTS = Path(__file__).parent / "faults"  # sitecustomize.py: EIO injected into a daemon


class LocalHarness:
    """A LocalBackend in a temporary directory, and a way to make its reads of one pack
    fail as a flaky disk's do (EIO from pread)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        root = tmp_path / "packs"
        root.mkdir()
        self.backend = LocalBackend(root)
        self._monkeypatch = monkeypatch

    @contextlib.contextmanager
    def failing_reads(self, pack: int) -> Iterator[None]:
        real = os.pread
        name = pack_name(pack)

        def pread(fd: int, n: int, offset: int) -> bytes:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, n, offset)

        with self._monkeypatch.context() as m:
            m.setattr("rpfs.store.local.os.pread", pread)
            yield


@pytest.fixture(params=["local"])
def harness(request, tmp_path: Path, monkeypatch) -> Iterator[LocalHarness]:
    h = {"local": LocalHarness}[request.param](tmp_path, monkeypatch)
    try:
        yield h
    finally:
        h.backend.close()


def write_pack(backend: PackBackend, pack: int, parts: list[bytes]) -> bytes:
    """Write `parts` as pack `pack` the way the backend writes; returns its bytes."""
    data = b"".join(parts)
    if backend.can_append:
        out = backend.create(pack)
        offset = 0
        for part in parts:
            out.write(part, offset)
            offset += len(part)
            out.flush()
        out.seal()
    else:
        backend.put(pack, data)
    return data


# -- the contract ----------------------------------------------------------------------


def test_ranged_read(harness):
    b = harness.backend
    data = write_pack(b, 1, [os.urandom(1000), os.urandom(5000)])
    assert b.size(1) == len(data)
    assert b.read(1, 0, len(data)) == data
    assert b.read(1, 1000, 300) == data[1000:1300]
    assert b.read(1, len(data) - 10, 100) == data[-10:]  # fewer only at the end
    assert b.read(1, len(data), 10) == b""


def test_append_then_seal_and_put(harness):
    b = harness.backend
    assert isinstance(b.connections, int) and b.connections >= 1
    if b.can_append:
        out = b.create(2)
        out.write(b"abc", 0)
        out.write(b"defg", 3)
        out.flush()
        assert b.read(2, 0, 100) == b"abcdefg"  # readable before it is sealed
        out.write(b"h", 7)
        out.seal()
        assert b.read(2, 0, 100) == b"abcdefgh"
        b.truncate(2, 5)
        assert b.read(2, 0, 100) == b"abcde" and b.size(2) == 5
        with pytest.raises(FileExistsError):
            b.create(2)  # a pack is never started twice
    b.put(3, b"whole object")
    assert b.read(3, 6, 100) == b"object"


def test_list(harness):
    b = harness.backend
    assert b.list() == []
    for pack in (12, 3, 7):
        write_pack(b, pack, [b"x" * pack])
    assert b.list() == [3, 7, 12]


def test_list_skips_what_is_not_a_pack(harness):
    b = harness.backend
    write_pack(b, 4, [b"x"])
    root = Path(b.location)
    for stray in (".00000005.pack.tmp", "notes.txt", "x.pack"):
        (root / stray).write_bytes(b"")
    assert b.list() == [4]


def test_delete(harness):
    b = harness.backend
    write_pack(b, 1, [b"old bytes"])
    assert b.read(1, 0, 3) == b"old"  # now open in the backend's cache
    b.delete(1)
    assert b.list() == []
    with pytest.raises(PackMissing):
        b.read(1, 0, 3)
    b.delete(1)  # nothing there: nothing to do
    # The same number made again reads the new bytes: the deleted pack is not cached.
    write_pack(b, 1, [b"new bytes"])
    assert b.read(1, 0, 3) == b"new"


def test_missing_pack_is_permanent(harness):
    b = harness.backend
    for call in (lambda: b.read(9, 0, 10), lambda: b.size(9)):
        with pytest.raises(PackMissing) as err:
            call()
        assert isinstance(err.value, FileNotFoundError)
        assert not isinstance(err.value, PackUnavailable)
        assert pack_name(9) in str(err.value)


def test_failed_read_is_temporary_and_a_retry_reads(harness):
    b = harness.backend
    data = write_pack(b, 1, [os.urandom(4096)])
    write_pack(b, 2, [b"other"])
    with harness.failing_reads(1):
        with pytest.raises(PackUnavailable) as err:
            b.read(1, 0, 100)
        assert err.value.errno == errno.EIO and not isinstance(err.value, PackMissing)
        assert pack_name(1) in str(err.value)
        assert b.read(2, 0, 5) == b"other"  # only that pack fails
    assert b.read(1, 0, 100) == data[:100]


# -- LocalBackend's own promises ------------------------------------------------------------


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_local_deleted_pack_leaves_the_fd_cache(tmp_path: Path):
    b = LocalBackend(tmp_path)
    write_pack(b, 1, [b"bytes"])
    b.read(1, 0, 1)
    path = str(b.path(1))
    assert path in open_fds()
    b.delete(1)
    assert path not in open_fds() and f"{path} (deleted)" not in open_fds()
    b.close()


def test_local_delete_during_a_read_closes_the_fd_after_it(tmp_path: Path, monkeypatch):
    b = LocalBackend(tmp_path)
    write_pack(b, 1, [b"bytes"])
    real = os.pread
    seen = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        b.delete(1)  # another thread deletes the pack while this read is in the pread
        seen.append(os.fstat(fd))  # the fd is still this read's
        return real(fd, n, offset)

    monkeypatch.setattr("rpfs.store.local.os.pread", pread)
    assert b.read(1, 0, 5) == b"bytes"
    assert seen and not any(p.startswith(str(tmp_path)) for p in open_fds())
    b.close()


# -- the chunk store and the cache above a backend ---------------------------------------


def _records(n: int) -> list[bytes]:
    return [os.urandom(BS) for _ in range(n)]


def test_store_tells_unreadable_from_corrupt(harness):
    store = PackStore(harness.backend, BS)
    writer = store.writer(iter(range(1, 100)).__next__)
    blocks = _records(3)
    locs = [writer.append(encode_chunk(b, digest(b))) for b in blocks]
    writer.close()
    wanted = [(loc, digest(b)) for loc, b in zip(locs, blocks, strict=True)]
    with harness.failing_reads(locs[0].pack):
        got = store.get_many(wanted)  # one run, one read: each chunk gets the failure
        assert all(isinstance(g, ChunkUnavailable) and not isinstance(g, CorruptChunk)
                   for g in got)
        assert [g.offset for g in got] == [loc.offset for loc in locs]
        assert "a retry may succeed" in str(got[0]) and pack_name(locs[0].pack) in str(got[0])
    assert store.get_many(wanted) == blocks  # the retry reads them
    store.delete(locs[0].pack)
    got = store.get_many(wanted)
    assert all(isinstance(g, CorruptChunk) and "pack file is missing" in str(g) for g in got)


@pytest.fixture
def repo3(tmp_path: Path) -> Iterator[tuple[Repository, list[bytes]]]:
    """A repository with one point vm@p1 of three random blocks."""
    repo = Repository.init(tmp_path / "repo", BS)
    src = tmp_path / "src.img"
    write_random(src, 3 * BS, seed=5)
    capture(repo, "vm", src, "p1")
    data = src.read_bytes()
    try:
        yield repo, [data[i * BS : (i + 1) * BS] for i in range(3)]
    finally:
        repo.close()


def _flip(repo: Repository, block: bytes) -> str:
    """Flip a payload byte of `block`'s record; the name of its pack."""
    with repo.index.read() as txn:
        loc = repo.index.get_chunk(txn, digest(block))
    path = repo.store.backend.path(loc.pack)
    with open(path, "r+b") as f:
        f.seek(loc.offset + HEADER.size + 100)
        byte = f.read(1)[0]
        f.seek(loc.offset + HEADER.size + 100)
        f.write(bytes([byte ^ 1]))
    return path.name


def test_cache_marks_a_corrupt_chunk_and_not_an_unreadable_one(repo3, caplog, monkeypatch):
    repo, blocks = repo3
    cache = ChunkCache(repo)
    values = [digest(b) for b in blocks]
    with repo.index.read() as txn:
        pack = repo.index.get_chunk(txn, values[0]).pack
    real = os.pread

    def eio(fd, n, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("rpfs.store.local.os.pread", eio)
    with repo.index.read() as txn, pytest.raises(ChunkUnavailable):
        cache.load(txn, range(3), values, "disk vm point p1")
    monkeypatch.setattr("rpfs.store.local.os.pread", real)
    unreadable = caplog.text
    assert re.search(r"disk vm point p1 block 0: cannot read pack " + pack_name(pack), unreadable)
    assert "corrupt" not in unreadable and "marked" not in unreadable
    name = _flip(repo, blocks[1])
    with repo.index.read() as txn, pytest.raises(CorruptChunk):
        cache.load(txn, range(3), values, "disk vm point p1")
    cache.close()  # waits for the marker
    line = re.search(r"disk vm point p1 block 1: corrupt chunk in pack (\S+) .*", caplog.text)
    assert line and line.group(1) == name and "marked for verify" in line.group(0)
    with repo.index.read() as txn:
        assert repo.index.suspects(txn) == [values[1]]


def test_a_mark_that_cannot_be_written_is_a_warning(repo3, caplog, monkeypatch):
    repo, blocks = repo3
    cache = ChunkCache(repo)
    _flip(repo, blocks[2])

    def damaged(*args):
        raise IndexDamaged(repo.root / "index", "page 7 is not a page")

    monkeypatch.setattr(repo.index, "mark_suspect", damaged)
    with caplog.at_level(logging.WARNING), repo.index.read() as txn, \
            pytest.raises(CorruptChunk):
        cache.load(txn, [2], [digest(blocks[2])], "disk vm point p1")
    cache.close()
    assert "cannot mark it for verify in the index: the index" in caplog.text


def test_marks_survive_an_older_reader_of_meta(repo3):
    """An index with marks still passes the start-up record check (which reads every
    `meta` value but config as a counter, as rpfs before the marks did)."""
    repo, blocks = repo3
    with repo.index.write() as txn:
        repo.index.mark_suspect(txn, digest(blocks[0]), 1e9)
        repo.index.mark_suspect(txn, digest(blocks[0]), 2e9)  # the first time is kept
    repo.index.verify_records()
    with repo.index.read() as txn:
        assert repo.index.suspects(txn) == [digest(blocks[0])]


# -- through the mount -------------------------------------------------------------------


def _dd(img: Path, block: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dd", f"if={img}", "of=/dev/null", f"bs={BS}", f"skip={block}", "count=1",
         "iflag=direct"], capture_output=True, text=True,
    )


def _suspects(repo_dir: Path) -> list[bytes]:
    with Repository(repo_dir) as repo, repo.index.read() as txn:
        return repo.index.suspects(txn)


def _chunk_of(repo_dir: Path, data: bytes) -> tuple[bytes, str]:
    with Repository(repo_dir) as repo, repo.index.read() as txn:
        return digest(data), pack_name(repo.index.get_chunk(txn, digest(data)).pack)


def test_read_eio_through_the_mount_is_not_corruption(rpfs, repo, mount, tmp_path):
    src = tmp_path / "src.img"
    write_random(src, 8 * BS, seed=8)
    rpfs.capture("vm", src, "p1")
    _, pack = _chunk_of(repo, read_at(src, 3 * BS, BS))
    failing = tmp_path / "failing-packs"
    failing.write_text(pack)
    rpfs.env.update(PYTHONPATH=f"{FAULTS}:{os.environ.get('PYTHONPATH', '')}",
                    RPFS_TEST_READ_EIO=str(failing))
    mnt, _ = mount()
    img = point_image(mnt, "vm", "p1")
    res = _dd(img, 3)
    assert res.returncode != 0 and "Input/output error" in res.stderr
    log = (repo / "rpfs.log").read_text()
    line = re.search(r"disk vm point p1 block 3: .*", log)
    assert line and f"cannot read pack {pack}" in line.group(0), log
    assert "corrupt" not in log and "marked" not in log
    failing.write_text("")  # the disk answers again: a retry reads the block
    res = _dd(img, 3)
    assert res.returncode == 0, res.stderr
    assert _suspects(repo) == []


def test_flipped_byte_through_the_mount_is_logged_and_marked(rpfs, repo, mounted, tmp_path):
    src = tmp_path / "src.img"
    write_random(src, 8 * BS, seed=9)
    rpfs.capture("vm", src, "p1")
    value, pack = _chunk_of(repo, read_at(src, 5 * BS, BS))
    with Repository(repo) as r:
        _flip(r, read_at(src, 5 * BS, BS))
    img = point_image(mounted, "vm", "p1")
    res = _dd(img, 5)
    assert res.returncode != 0 and "Input/output error" in res.stderr
    log = (repo / "rpfs.log").read_text()
    line = re.search(r"disk vm point p1 block 5: corrupt chunk in pack (\S+) .*", log)
    assert line and line.group(1) == pack and "marked for verify" in line.group(0), log
    for _ in range(100):  # the marker thread commits on its own
        if _suspects(repo):
            break
        subprocess.run(["sleep", "0.05"])
    assert _suspects(repo) == [value]
