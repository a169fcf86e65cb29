"""Deleting points of a seeded random history through the daemon, read back through the
mount after every step.

The history: captures with churn, a clone of one of them written to through the mount
with live snapshots, a rollback that leaves two points on an abandoned branch, a clone
of a middle point. Then every point is deleted, in a random order (the first, the
middle, the last, a branch's, a clone's origin all come up), each at once (`--purge`)
or to the trash and then purged or undeleted and deleted again. After every step every
surviving point and both writable disks read back through the mount bit-exact (sha256
recorded when each was made), the references recounted from the extents equal the
stored counts, nothing no survivor reads is kept, and `rpfs check` is clean.

Replay with RPFS_PURGE_MOUNT_SEED=N.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from helpers import MiB, assert_check_clean, point_image, sha256_file, unread_extents

from rpfs.lifecycle.purge import refcount_errors
from rpfs.repo import Repository

BS = 64 << 10
SIZE = 4 * MiB
SEED = int(os.environ.get("RPFS_PURGE_MOUNT_SEED") or 5)


class History:
    def __init__(self, rpfs, mnt: Path, tmp_path: Path, rng: random.Random) -> None:
        self.rpfs, self.mnt, self.rng = rpfs, mnt, rng
        self.source = tmp_path / "vm.img"
        self.points: dict[str, str] = {}  # DISK@POINT -> sha256 when it was made
        self.disks: dict[str, bytearray] = {}  # writable disk -> what it must read

    def churn(self, data: bytearray) -> None:
        for _ in range(self.rng.randrange(3, 12)):
            block = self.rng.randrange(SIZE // BS)
            data[block * BS:(block + 1) * BS] = self.rng.randbytes(BS)

    def capture(self, name: str, data: bytearray) -> None:
        self.source.write_bytes(data)
        self.rpfs.capture("vm", self.source, name)
        self.points[f"vm@{name}"] = hashlib.sha256(data).hexdigest()

    def clone(self, ref: str, disk: str, data: bytes) -> None:
        self.rpfs("clone", ref, disk, check=True)
        self.disks[disk] = bytearray(data)

    def write(self, disk: str) -> None:
        """Random blocks and a partial block, written through the mount and fsynced."""
        data = self.disks[disk]
        fd = os.open(self.mnt / "disks" / f"{disk}.img", os.O_WRONLY)
        try:
            for _ in range(self.rng.randrange(2, 8)):
                offset = self.rng.randrange(SIZE - BS)
                piece = self.rng.randbytes(self.rng.choice([4096, BS, BS + 512]))
                piece = piece[:SIZE - offset]
                os.pwrite(fd, piece, offset)
                data[offset:offset + len(piece)] = piece
            os.fsync(fd)
        finally:
            os.close(fd)

    def snapshot(self, disk: str, name: str) -> None:
        self.rpfs("snapshot", disk, "--name", name, check=True)
        self.points[f"{disk}@{name}"] = hashlib.sha256(self.disks[disk]).hexdigest()

    def rollback(self, ref: str, data: bytes) -> None:
        self.rpfs("rollback", ref, check=True)
        self.disks[ref.split("@")[0]] = bytearray(data)

    def check(self, step: str) -> None:
        for ref, want in sorted(self.points.items()):
            assert sha256_file(point_image(self.mnt, *ref.split("@"))) == want, (
                f"RPFS_PURGE_MOUNT_SEED={SEED}, after {step}: {ref} differs")
        for disk, data in sorted(self.disks.items()):
            assert sha256_file(self.mnt / "disks" / f"{disk}.img") == hashlib.sha256(
                data).hexdigest(), f"RPFS_PURGE_MOUNT_SEED={SEED}, after {step}: disk {disk}"
        gone = {p.name for p in (self.mnt / "points").glob("*/*.img")}
        assert gone == {f"{ref.split('@')[1]}.img" for ref in self.points}, step
        with Repository(self.rpfs.repo) as repo:
            assert refcount_errors(repo.index) == [], step
            assert unread_extents(repo.index) == [], step
        assert_check_clean(self.rpfs)


def test_deleting_every_point_of_a_random_history_in_a_random_order(rpfs, repo, mount,
                                                                   tmp_path):
    rng = random.Random(SEED)
    print(f"RPFS_PURGE_MOUNT_SEED={SEED}")
    mnt, _ = mount()
    h = History(rpfs, mnt, tmp_path, rng)
    data = bytearray(rng.randbytes(SIZE))
    versions = []
    for i in range(4):
        h.capture(f"p{i}", data)
        versions.append(bytes(data))
        h.churn(data)
    h.clone("vm@p1", "c", versions[1])
    for name in ("s0", "s1", "s2"):
        h.write("c")
        h.snapshot("c", name)
        if name == "s0":
            at_s0 = bytes(h.disks["c"])
    h.rollback("c@s0", at_s0)  # s1 and s2 stay, on the branch the rollback left
    h.write("c")
    h.snapshot("c", "s3")
    h.clone("vm@p2", "m", versions[2])  # a clone of a middle point
    h.write("m")
    h.check("the history")

    order = sorted(h.points)
    rng.shuffle(order)
    for ref in order:
        way = rng.choice(["purge", "trash", "trash-undelete"])
        if way == "purge":
            rpfs("point", "delete", ref, "--purge", "--wait", check=True)
        else:
            rpfs("point", "delete", ref, "--wait", check=True)
            if way == "trash-undelete":
                rpfs("undelete", ref, check=True)
                h.check(f"undelete {ref}")
                rpfs("point", "delete", ref, check=True)
            rpfs("trash", "purge", ref, check=True)
        del h.points[ref]
        h.check(f"{way} {ref}")
    assert rpfs("trash", check=True).stdout == "the trash is empty\n"
