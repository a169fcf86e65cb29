"""The live-disk state machine in process (no FUSE mount), against a reference model.

Seeded random sequences of write (through `write` or `write_at_hand`) / sync / snapshot /
archive step / copy-on-read / rollback / crash-and-reopen run on a clone of a captured
point; after every step the model says what the disk and every point must read:

- a point reads exactly the disk's content at the instant it was taken, whether it is
  complete or still archiving (then its frozen blocks come from the local file);
- the disk reads the model's content;
- after a crash (the process forgets everything not committed: the open disk is dropped
  without a close), every block reads either its content at the last durable step (sync,
  snapshot, rollback) or its latest write, and nothing else; the next point compares
  every block (the map is not trusted).

The in-process crash keeps the page cache (a real one may not): the SIGKILL tests through
the mount cover that side. Replay one sequence with RPFS_MODEL_SEED=N.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rpfs.capture import capture
from rpfs.disks.blockmap import ABSENT, FROZEN
from rpfs.disks.point import PointImage
from rpfs.disks.registry import Registry
from rpfs.disks.service import DiskService
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache

BS = 4096
NBLOCKS = 40  # a partial last block too
SIZE = NBLOCKS * BS - 1000
STEPS = 120
SEEDS = [int(os.environ["RPFS_MODEL_SEED"])] if "RPFS_MODEL_SEED" in os.environ else range(12)


@dataclass
class Model:
    """What the disk and its points must read."""

    disk: bytearray
    durable: bytes  # the content at the last durable step
    written: set[int] = field(default_factory=set)  # blocks written since then
    points: dict[str, bytes] = field(default_factory=dict)

    def durable_now(self) -> None:
        self.durable = bytes(self.disk)
        self.written.clear()


class Harness:
    """A repository with one clone `vm` of a captured point, driven step by step.

    Archiving runs only when the sequence says so (no archiver threads): the service's
    `Registry.start_archiver` is replaced by a no-op, as if the daemon's archiver were slow.
    """

    def __init__(self, root: Path, rng: random.Random, monkeypatch) -> None:
        self.root = root
        self.rng = rng
        monkeypatch.setattr(Registry, "start_archiver", lambda self, name: None)
        source = root.parent / "source.img"
        data = bytearray(rng.randbytes(SIZE))
        for b in rng.sample(range(NBLOCKS), NBLOCKS // 4):  # zero blocks: not stored
            data[b * BS : (b + 1) * BS] = bytes(len(data[b * BS : (b + 1) * BS]))
        source.write_bytes(data)
        Repository.init(root, BS).close()
        self._open()
        capture(self.repo, "base", source, "p0")
        self.service.clone("base@p0", "vm")
        self.model = Model(bytearray(data), bytes(data))
        self.disk = self.service.registry.acquire("vm")
        self.serial = 0

    def _open(self) -> None:
        self.repo = Repository(self.root)
        self.cache = ChunkCache(self.repo)
        self.service = DiskService(self.repo, self.cache, background=True)

    def close(self) -> None:
        self.service.registry.release("vm")
        self.service.registry.close_all()
        self.cache.close()
        self.repo.close()

    # -- steps ----------------------------------------------------------------------------

    def write(self) -> None:
        offset = self.rng.randrange(SIZE)
        length = min(self.rng.choice([1, 100, BS, 2 * BS + 7, 5 * BS]), SIZE - offset)
        data = self.rng.randbytes(length) if self.rng.random() < 0.8 else bytes(length)
        # Half of the writes try the trio thread's way first (FUSE's small writes): it
        # must decline a range with a block to fetch or to archive first, and otherwise
        # do what `write` does.
        written = None
        if self.rng.random() < 0.5:
            states = self.disk.map.states[offset // BS : (offset + length - 1) // BS + 1]
            written = self.disk.write_at_hand(offset, data)
            if ABSENT in states or FROZEN in states:
                assert written is None, f"write_at_hand wrote over states {list(states)}"
        if written is None:
            written = self.disk.write(offset, data)
        assert written == length
        self.model.disk[offset : offset + length] = data
        self.model.written.update(range(offset // BS, (offset + length - 1) // BS + 1))

    def sync(self) -> None:
        self.disk.sync()
        self.model.durable_now()

    def snapshot(self) -> None:
        self.serial += 1
        name = f"s{self.serial}"
        self.service.snapshot(["vm"], name)
        self.model.points[name] = bytes(self.model.disk)
        self.model.durable_now()

    def archive_step(self) -> None:
        self.disk.snapshots.archive_batch(self.rng.randint(1, 8))

    def read_range(self) -> None:
        offset = self.rng.randrange(SIZE)
        length = self.rng.choice([1, BS, 3 * BS, SIZE])
        assert self.disk.read(offset, length) == bytes(self.model.disk[offset : offset + length])

    def rollback(self) -> None:
        if not self.model.points:
            return
        name = self.rng.choice(sorted(self.model.points))
        self.service.registry.release("vm")
        self.service.rollback(f"vm@{name}")
        self.disk = self.service.registry.acquire("vm")
        self.model.disk = bytearray(self.model.points[name])
        self.model.durable_now()

    def crash(self) -> None:
        """Forget everything not committed: drop the open disk without closing it."""
        for entry in self.service.registry._open.values():
            os.close(entry.disk.fd)
            if entry.disk.snapshots._ingest is not None:
                entry.disk.snapshots._ingest.writer.close()
            os.close(entry.lock_fd)
        self.service.registry._open.clear()
        self.cache.close()
        self.repo.close()
        self._open()
        self.disk = self.service.registry.acquire("vm")
        got = self.disk.read(0, SIZE)
        m = self.model
        for b in range(NBLOCKS):
            window = slice(b * BS, min((b + 1) * BS, SIZE))
            allowed = {m.durable[window], bytes(m.disk[window])}
            assert got[window] in allowed, f"block {b} after a crash is neither durable nor new"
        m.disk = bytearray(got)
        m.durable_now()
        assert not self.disk.map.tracked, "a crash must make the next point compare every block"

    # -- checks ---------------------------------------------------------------------------

    def check(self, step: str) -> None:
        assert self.disk.read(0, SIZE) == bytes(self.model.disk), f"disk after {step}"
        with self.repo.index.read() as txn:
            records = {p.name: p for p in self.repo.index.list_points(txn, "vm")}
        assert set(records) == set(self.model.points)
        for name, expected in self.model.points.items():
            rec = records[name]
            overlay = self.disk if rec.state != "complete" else None
            image = PointImage(self.repo, self.cache, rec, overlay)
            assert image.read(0, SIZE) == expected, f"point {name} after {step}"


STEP_WEIGHTS = {
    "write": 40, "sync": 8, "snapshot": 10, "archive_step": 15, "read_range": 10,
    "rollback": 6, "crash": 5,
}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_match_the_model(tmp_path: Path, monkeypatch, seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(tmp_path / "repo", rng, monkeypatch)
    names, weights = zip(*STEP_WEIGHTS.items(), strict=True)
    history: list[str] = []
    try:
        for i in range(STEPS):
            step = rng.choices(names, weights)[0]
            history.append(step)
            getattr(h, step)()
            h.check(f"step {i} ({step}) of seed {seed}: {' '.join(history[-8:])}")
        while h.disk.snapshots.archive_batch():
            pass
        h.check(f"the final archive of seed {seed}")
        assert FROZEN not in h.disk.map.states
        with h.repo.index.read() as txn:
            assert all(p.state == "complete" for p in h.repo.index.list_points(txn, "vm"))
    finally:
        h.close()
