"""A disk's history shown plainly: `rpfs disks` ORIGIN (the clone's source kept through
rollbacks, deleted points and disks named as such) and `rpfs points --tree` (each
rollback's branch under the point it went back to, `now`, abandoned branches), checked
line for line on real histories built through the daemon; and records written before the
history fields existed, read the same."""

from __future__ import annotations

import json
import os
import random
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from helpers import BS, MiB, disks_by_name

from rpfs.disks import history
from rpfs.index import DiskRecord, Index, LineageRecord, PointRecord, TrashRecord

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC).timestamp()  # every point's time (RPFS_NOW)
AT = "2026-11-30 10:00:00Z"


def make_source(path: Path, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(MiB))


def write(mnt: Path, disk: str, block: int, fill: bytes) -> None:
    fd = os.open(mnt / "disks" / f"{disk}.img", os.O_WRONLY)
    try:
        os.pwrite(fd, fill * BS, block * BS)
        os.fsync(fd)
    finally:
        os.close(fd)


def settle(rpfs, disk: str) -> None:
    """Wait until the disk is closed (the kernel's release is async) and its points are
    archived, so the table's STATE columns are what the test expects."""
    deadline = time.monotonic() + 30
    while (disks_by_name(rpfs)[disk]["state"] != "idle"
           or any(p["state"] != "complete" for p in rpfs.points(disk))):
        assert time.monotonic() < deadline, rpfs("disks").stdout
        time.sleep(0.05)


def table(rpfs) -> list[list[str]]:
    """`rpfs disks`, each line cut into its cells (columns are two spaces apart or more)."""
    lines = rpfs("disks", check=True).stdout.splitlines()
    return [re.split(r" {2,}", line) for line in lines]


def tree(rpfs, disk: str) -> list[str]:
    return rpfs("points", disk, "--tree", check=True).stdout.splitlines()


def test_disks_and_tree_show_clones_rollbacks_and_deletions(rpfs, repo, mount, tmp_path):
    rpfs.env["RPFS_NOW"] = str(T0)
    src = tmp_path / "src.img"
    make_source(src, seed=1)
    rpfs.capture("web01", src, "p1")
    make_source(src, seed=2)
    rpfs.capture("web01", src, "monday")
    mnt, _ = mount()
    rpfs("clone", "web01@p1", "web01-test", check=True)
    rpfs("clone", "web01@monday", "web02", check=True)
    write(mnt, "web01-test", 0, b"a")
    rpfs("snapshot", "web01-test", "--name", "before", check=True)
    write(mnt, "web01-test", 1, b"b")
    rpfs("snapshot", "web01-test", "--name", "after", check=True)
    settle(rpfs, "web01-test")
    rpfs("rollback", "web01-test@before", check=True)
    write(mnt, "web01-test", 2, b"c")
    rpfs("snapshot", "web01-test", "--name", "retry", check=True)
    settle(rpfs, "web01-test")
    rpfs("rollback", "web01-test@after", check=True)
    write(mnt, "web01-test", 3, b"d")
    rpfs("snapshot", "web01-test", "--name", "s5", check=True)
    settle(rpfs, "web01-test")

    assert table(rpfs) == [
        ["DISK", "SIZE", "ORIGIN", "HYDRATED", "STATE"],
        ["web01", "1.0 MiB", "-", "-", "points only"],
        ["web01-test", "1.0 MiB", "cloned from web01@p1, rolled back to web01-test@after",
         "12.5%", "idle"],
        ["web02", "1.0 MiB", "cloned from web01@monday", "0.0%", "idle"],
    ]
    listed = disks_by_name(rpfs)["web01-test"]
    assert {k: listed[k] for k in (
        "origin", "origin_deleted", "cloned_from", "cloned_from_deleted",
        "cloned_from_disk_deleted", "rolled_back_to", "rolled_back_to_deleted")} == {
        "origin": "web01-test@after", "origin_deleted": False,  # its meaning as before
        "cloned_from": "web01@p1", "cloned_from_deleted": False,
        "cloned_from_disk_deleted": False,
        "rolled_back_to": "web01-test@after", "rolled_back_to_deleted": False,
    }
    assert tree(rpfs, "web01-test") == [
        "web01-test: cloned from web01@p1, rolled back to web01-test@after",
        f"  before   {AT}  tracked  complete",
        "    rolled back to before:",
        f"    retry  {AT}  tracked  complete",
        "    (abandoned)",
        f"  after    {AT}  tracked  complete",
        "    rolled back to after:",
        f"    s5     {AT}  tracked  complete",
        "    now",
        "  (abandoned)",
    ]
    assert tree(rpfs, "web01") == [
        "web01",
        f"  p1      {AT}  full         complete",
        f"  monday  {AT}  incremental  complete",
    ]

    # The rollback's point deleted, and a new point under its name: still the deleted
    # one, which the tree keeps (in the trash) since a branch starts from it.
    rpfs("point", "delete", "web01@monday", "web01-test@after", check=True)
    rpfs("snapshot", "web01-test", "--name", "after", check=True)
    settle(rpfs, "web01-test")
    assert [row[2] for row in table(rpfs)[2:]] == [
        "cloned from web01@p1, rolled back to web01-test@after (deleted)",
        "cloned from web01@monday (deleted)",
    ]
    assert tree(rpfs, "web01-test") == [
        "web01-test: cloned from web01@p1, rolled back to web01-test@after (deleted)",
        f"  before   {AT}  tracked  complete",
        "    rolled back to before:",
        f"    retry  {AT}  tracked  complete",
        "    (abandoned)",
        "  after (deleted)",
        "    rolled back to after:",
        f"    s5     {AT}  tracked  complete",
        f"    after  {AT}  tracked  complete",
        "    now",
        "  (abandoned)",
    ]

    # The clones' origin disk deleted: they were detached, and say so.
    rpfs("disk", "delete", "web01", "--force", "--with-points", check=True)
    assert [row[2] for row in table(rpfs)[1:]] == [
        "cloned from web01@p1 (disk deleted), rolled back to web01-test@after (deleted)",
        "cloned from web01@monday (disk deleted)",
    ]
    assert disks_by_name(rpfs)["web02"]["cloned_from_disk_deleted"] is True

    # Fully hydrated, the disk no longer reads the point it was rolled back to; purged,
    # that point's name comes from the disk's record. The tree is the same.
    rpfs("hydrate", "web01-test", check=True)
    rpfs("trash", "purge", check=True)
    assert tree(rpfs, "web01-test") == [
        "web01-test: cloned from web01@p1 (disk deleted), rolled back to web01-test@after "
        "(deleted)",
        f"  before   {AT}  tracked  complete",
        "    rolled back to before:",
        f"    retry  {AT}  tracked  complete",
        "    (abandoned)",
        "  after (deleted)",
        "    rolled back to after:",
        f"    s5     {AT}  tracked  complete",
        f"    after  {AT}  tracked  complete",
        "    now",
        "  (abandoned)",
    ]


def test_a_created_disk_rolled_back_twice(rpfs, repo, mount):
    rpfs.env["RPFS_NOW"] = str(T0)
    mnt, _ = mount()
    rpfs("disk", "create", "vm", "--size", "1M", check=True)
    assert table(rpfs)[1] == ["vm", "1.0 MiB", "-", "100.0%", "idle"]
    for name in ("p1", "p2"):
        write(mnt, "vm", int(name[1]), name.encode())
        rpfs("snapshot", "vm", "--name", name, check=True)
    settle(rpfs, "vm")
    rpfs("rollback", "vm@p1", check=True)
    # Nothing was taken on the first rollback's branch: it left nothing to show.
    rpfs("rollback", "vm@p2", check=True)
    assert [row[2] for row in table(rpfs)[1:]] == ["rolled back to vm@p2"]
    assert tree(rpfs, "vm") == [
        "vm: rolled back to vm@p2",
        f"  p1  {AT}  tracked  complete",
        f"  p2  {AT}  tracked  complete",
        "    rolled back to p2:",
        "    now",
        "  (abandoned)",
    ]
    assert json.loads(rpfs("points", "vm", "--json", check=True).stdout)[0]["name"] == "p1"


# -- records written before the history fields --------------------------------------------


def old_disk(index: Index, txn, **fields) -> DiskRecord:
    """A disk record as rpfs wrote it before `cloned_from`, `cloned_at` and `origin_at`."""
    raw = {"size": 4096, "created": 0.0, "origin": None, "file_id": 1, "clean": True, **fields}
    txn.put(raw["name"].encode(), json.dumps(raw).encode(), db=index.db["disks"])
    return index.get_disk(txn, raw["name"])


def test_records_from_before_the_history_fields_read_the_same(index: Index):
    with index.write() as txn:
        index.put_lineage(txn, LineageRecord(1, head_gen=2, disks=["src"]))
        index.put_disk(txn, DiskRecord("src", 4096, 1, 0.0))
        for gen, name in ((1, "p1"), (2, "p2")):
            index.put_point(txn, PointRecord("src", name, 1, gen, 0.0, 4096))
        index.put_lineage(txn, LineageRecord(2, head_gen=1, parent=1, parent_gen=1,
                                             disks=["clone"]))
        index.put_lineage(txn, LineageRecord(3, parent=2, parent_gen=1, disks=["clone"]))
        index.put_point(txn, PointRecord("clone", "c1", 2, 1, 0.0, 4096))
        plain = old_disk(index, txn, name="plain", lineage=2, origin="src@p1")
        rolled = old_disk(index, txn, name="clone", lineage=3, origin="clone@c1")
        # A deleted point whose name was taken again: without `origin_at`, by name.
        index.put_trash(txn, TrashRecord(PointRecord("src", "p2", 1, 2, 0.0, 4096), 0.0))
    with index.read() as txn:
        assert (plain.cloned_from, plain.origin_at) == (None, None)
        assert history.origins(index, txn, plain) == history.Origins(
            cloned_from=history.Link("src@p1"))
        # Its first rollback lost the clone's source from the record; the lineage knows it.
        assert history.origins(index, txn, rolled) == history.Origins(
            cloned_from=history.Link("src@p1"), rolled_back_to=history.Link("clone@c1"))
        lines = history.lines(index, txn, rolled, index.list_lineages(txn))
    [first] = lines
    assert [s.name for s in first.steps] == ["c1"]
    # The rollback to c1 is the disk now (the record names lineage 3, under c1).
    assert (first.now, first.steps[0].branches[0].now) == (False, True)


def test_a_point_made_under_a_deleted_origins_name_is_not_the_origin(index: Index):
    with index.write() as txn:
        index.put_lineage(txn, LineageRecord(1, head_gen=5, disks=["src"]))
        index.put_disk(txn, DiskRecord("src", 4096, 1, 0.0))
        index.put_point(txn, PointRecord("src", "monday", 1, 5, 0.0, 4096))  # the new one
        disk = DiskRecord("c", 4096, 2, 0.0, file_id=1)
        disk.started_from(PointRecord("src", "monday", 1, 2, 0.0, 4096), clone=True)
        index.put_disk(txn, disk)
    with index.read() as txn:
        stored = index.get_disk(txn, "c")
        assert (stored.origin_at, stored.cloned_at) == ((1, 2), (1, 2))
        assert history.origins(index, txn, stored) == history.Origins(
            cloned_from=history.Link("src@monday", deleted=True))
