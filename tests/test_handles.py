"""Image handles in process (no FUSE mount): what opening and closing an image involves,
and which of a handle's reads the FUSE read path runs on the trio thread.

The archiver threads are replaced by a no-op (as if the daemon's archiver were slow), so a
point taken here stays archiving until a test archives it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rpfs.disks.registry import Registry
from rpfs.disks.service import DiskService
from rpfs.errors import RpfsError
from rpfs.lifecycle import trash
from rpfs.repo import Repository
from rpfs.serve.fuse import INLINE_READ_MAX, Operations
from rpfs.serve.handles import Images
from rpfs.serve.readqueue import ReadQueue
from rpfs.store.cache import ChunkCache

BS = 4096
SIZE = 16 * BS


@dataclass
class Setup:
    repo: Repository
    service: DiskService
    images: Images

    def fill(self, byte: int) -> bytes:
        """Write `byte` over the whole of disk `vm`; returns its content."""
        data = bytes([byte]) * SIZE
        with self.service.registry.using("vm") as disk:
            assert disk.write(0, data) == SIZE
        return data

    def archive(self) -> None:
        """Finish archiving `vm`'s pending point (the archiver thread's job)."""
        with self.service.registry.using("vm") as disk:
            disk.snapshots.finish()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch) -> Iterator[Setup]:
    """A repository with one writable disk `vm` holding 0x11 bytes and its point `p1`,
    still archiving."""
    monkeypatch.setattr(Registry, "start_archiver", lambda self, name: None)
    repo = Repository.init(tmp_path / "repo", BS)
    cache = ChunkCache(repo)
    service = DiskService(repo, cache, background=True)
    s = Setup(repo, service, Images(repo, cache, service.registry))
    try:
        service.create("vm", SIZE)
        s.fill(0x11)
        service.snapshot(["vm"], "p1")
        yield s
    finally:
        service.registry.close_all()
        cache.close()
        repo.close()


def test_a_point_still_archiving_reads_its_frozen_blocks_through_the_overlay(setup):
    setup.fill(0x22)  # copy-before-write keeps the point's blocks in the local file
    handle = setup.images.open_point("vm", "p1")
    try:
        assert handle.read_may_wait
        assert handle.read_at_hand(0, SIZE) is None  # never answered from the cache alone
        assert handle.read(0, SIZE) == bytes([0x11]) * SIZE
        assert setup.service.registry.open_disks(), "the overlay holds the disk open"
    finally:
        handle.close()
    assert not setup.service.registry.open_disks(), "close releases the overlay's hold on the disk"


def test_a_complete_point_reads_from_the_store(setup):
    setup.archive()
    setup.fill(0x22)
    handle = setup.images.open_point("vm", "p1")
    try:
        assert not handle.read_may_wait
        assert not setup.service.registry.open_disks(), "a complete point needs no live disk"
        assert handle.read(0, SIZE) == bytes([0x11]) * SIZE
        assert handle.read_at_hand(0, BS) == bytes([0x11]) * BS  # decoded in the cache now
    finally:
        handle.close()


def test_hydrating_a_point_decodes_its_range_into_the_cache(setup):
    """NBD CACHE of a point: its chunks stay where they are, the range is read into the
    chunk cache, so the reads that follow are answered from it (on the trio thread)."""
    setup.archive()
    handle = setup.images.open_point("vm", "p1")
    try:
        assert handle.read_at_hand(0, SIZE) is None, "nothing decoded before"
        handle.hydrate(0, 10 * SIZE)  # past the end: clipped
        assert handle.read_at_hand(0, SIZE) == bytes([0x11]) * SIZE
    finally:
        handle.close()


def test_a_point_deleted_while_the_open_waits_is_enoent(setup):
    """An open waits while a command holds the disk and looks the point up after: a
    delete that commits under its claim leaves nothing to open, never an image of
    extents that are gone."""
    outcome: list[object] = []

    def open_p1() -> None:
        try:
            outcome.append(setup.images.open_point("vm", "p1"))
        except OSError as exc:
            outcome.append(exc)

    setup.archive()
    with setup.service.registry.claim("vm", "delete it"):
        opener = threading.Thread(target=open_p1)
        opener.start()
        opener.join(0.2)
        assert opener.is_alive(), "the open did not wait for the claim"
        trash.delete(setup.repo.index, ["vm@p1"], purge=True)
    opener.join(10)
    [failed] = outcome
    assert isinstance(failed, FileNotFoundError) and "no point vm@p1" in str(failed)


def test_a_failed_open_releases_its_count(setup):
    with pytest.raises(FileNotFoundError):
        setup.images.open_point("vm", "nope")
    setup.service.delete("vm", with_points=True)  # not refused for an open point image


def test_closing_a_point_handle_lets_the_disk_be_deleted(setup):
    handle = setup.images.open_point("vm", "p1")
    with pytest.raises(RpfsError, match="1 open point image"):
        setup.service.delete("vm", with_points=True)
    handle.close()
    setup.service.delete("vm", with_points=True)


def test_closing_a_disk_handle_lets_the_disk_be_rolled_back(setup):
    handle = setup.images.open_disk("vm")
    assert handle.write(0, b"\x33" * BS) == BS
    with pytest.raises(RpfsError, match="disk vm is open"):
        setup.service.rollback("vm@p1")
    handle.close()
    setup.service.rollback("vm@p1")
    with setup.service.registry.using("vm") as disk:
        assert disk.read(0, SIZE) == bytes([0x11]) * SIZE


def test_a_disk_open_elsewhere_is_ebusy_and_a_missing_one_enoent(setup):
    with pytest.raises(FileNotFoundError, match="no writable disk gone"):
        setup.images.open_disk("gone")
    fd = setup.repo.lock_disk("vm", "held by this test")  # as another process would
    try:
        with pytest.raises(OSError) as refused:
            setup.images.open_disk("vm")
        assert refused.value.errno == errno.EBUSY
    finally:
        os.close(fd)


def test_info_is_the_local_file_for_a_disk_and_the_record_for_a_point(setup):
    disk = setup.images.disk_info("vm")
    with setup.repo.index.read() as txn:
        local = os.stat(setup.repo.root / setup.repo.index.get_disk(txn, "vm").file)
    assert (disk.size, disk.allocated, disk.mtime) == (SIZE, local.st_blocks * 512,
                                                       local.st_mtime)
    assert disk.allocated >= SIZE
    setup.service.create("sparse", SIZE)
    sparse = setup.images.disk_info("sparse")
    assert (sparse.size, sparse.allocated) == (SIZE, 0)
    setup.archive()
    point = setup.images.point_info("vm", "p1")
    assert (point.size, point.allocated) == (SIZE, SIZE)
    with pytest.raises(FileNotFoundError):
        setup.images.point_info("vm", "nope")


class Recording:
    """A point's handle that records which of its reads ran on which thread."""

    writable = False

    def __init__(self, waits: bool) -> None:
        self.read_may_wait = waits
        self.calls: list[tuple[str, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", threading.get_ident()))
        return bytes(length)

    def read_at_hand(self, offset: int, length: int) -> bytes | None:
        self.calls.append(("read_at_hand", threading.get_ident()))
        return None

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls.append(("read_many", threading.get_ident()))
        return [bytes(length) for _, length in ranges]


@pytest.mark.parametrize("waits, size, busy, expected", [
    (False, BS, False, [("read", "here")]),  # a lone small read fetches on the trio thread
    (True, BS, False, [("read_at_hand", "here"), ("read", "worker")]),  # unless it may wait
    (False, BS, True, [("read_at_hand", "here"), ("read_many", "reader")]),  # others queue
    (True, BS, True, [("read_at_hand", "here"), ("read", "worker")]),
    (False, INLINE_READ_MAX + 1, False, [("read_at_hand", "here"), ("read", "worker")]),
])
async def test_the_fuse_read_fetches_on_the_trio_thread_only_what_cannot_wait(
    waits, size, busy, expected
):
    reads = ReadQueue()
    ops = Operations(tree=None, images=None, reads=reads)
    if busy:  # as if other reads had been in flight just now
        ops._busy_until = time.monotonic() + 60
    handle = Recording(waits)
    ops._handles[1] = handle
    try:
        assert await ops.read(1, 0, size) == bytes(size)
    finally:
        reads.close()
    here = threading.get_ident()
    reader = reads._thread.ident if reads._thread else None
    assert [(name, "here" if t == here else "reader" if t == reader else "worker")
            for name, t in handle.calls] == expected


def test_the_periodic_sync_holds_the_disk_open_while_it_syncs(setup, monkeypatch):
    """The daemon's periodic sync takes a reference on each disk it syncs: the last close
    meanwhile waits for the sync instead of closing the local file under it."""
    registry = setup.service.registry
    handle = setup.images.open_disk("vm")
    handle.write(0, b"\x44" * BS)
    disk, _ = registry.opened("vm")
    in_sync, go_on = threading.Event(), threading.Event()
    real_sync = disk.sync

    calls: list[None] = []

    def slow_sync() -> None:
        calls.append(None)
        if len(calls) == 1:  # the periodic sync waits; the close's own sync does not
            in_sync.set()
            assert go_on.wait(10)
        real_sync()  # would fail with EBADF (or sync another file) if closed meanwhile

    monkeypatch.setattr(disk, "sync", slow_sync)
    monkeypatch.setattr(type(disk.map), "needs_sync", property(lambda self: True))
    failed: list = []
    syncer = threading.Thread(target=lambda: failed.append(registry.sync_changed()))
    syncer.start()
    assert in_sync.wait(10)
    handle.close()  # the mount's last user goes while the sync runs
    assert registry.opened("vm")[0] is disk, "closed under the running sync"
    go_on.set()
    syncer.join(10)
    assert failed == [{}]
    assert registry.opened("vm")[0] is None, "the sync's reference was released"
