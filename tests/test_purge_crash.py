"""SIGKILL during a large purge, then restart: every point whole or gone, references exact.

The history: disk "big", captures whose every one rewrites most of its blocks (4 KiB
blocks: purging one of its points drops thousands of extents in one transaction, the
chunks of some shared by many blocks and points); disk "many", many small points; a
clone "cl" of a big point that is deleted later (the clone reads on through it). Each
point's sha256 and the chunks it reads are recorded when it is made.

Then points are deleted in rounds, and the process doing it is SIGKILLed: the CLI
working on the repository itself, or the daemon working for a CLI client. Each round is
one command: `point delete --purge` of several points, `trash purge` of what `point
delete` moved to the trash, or `prune`. Fault hooks (tests/faults/sitecustomize.py) kill
at chosen moments: after the K-th extent a point's purge drops (in the middle of its
transaction), or just after the N-th point's commit; other rounds kill at a seeded moment
while the purge is seen under way.

After each kill, restarted: the command's points were done in order up to where it
died and not at all after (each point exactly in the points, the trash or gone); every
point and the clone read bit-exact through the mount, each point in the trash reads
bit-exact (one of them through the mount, undeleted and deleted again); the stored
refcounts equal a recount of the extents; no extent is kept that nothing reads; the live
stored bytes are those of the chunks the survivors read, from the records made at their
creation. At the end `trash purge` completes and all of it holds again.

RPFS_PURGE_CRASH_SEED=N replays the choices (the seeded kills' moments depend on timing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import armed, assert_check_clean, point_image, unread_extents, wait_pid_exit
from livewriter import read_image

from rpfs.capture import capture
from rpfs.disks.point import PointImage
from rpfs.disks.service import DiskService
from rpfs.index import ZERO, Index
from rpfs.lifecycle.purge import doomed, refcount_errors
from rpfs.lineage import reads
from rpfs.repo import Repository
from rpfs.store.cache import ChunkCache

BS = 4096
POOL = 16  # blocks of shared content: chunks that many blocks and points reference
WAIT = 60.0  # seconds a command may take before it counts as stuck


@dataclass(frozen=True)
class Scale:
    big_blocks: int  # blocks of disk "big"
    big_points: int
    many_points: int  # of disk "many", 256 blocks, 8 rewritten by each
    seeded_kills: int  # rounds killed at a seeded moment


DEFAULT = Scale(big_blocks=8192, big_points=10, many_points=24, seeded_kills=2)
STRESS = Scale(big_blocks=32768, big_points=14, many_points=60, seeded_kills=8)
MANY_BLOCKS = 256
CHURN = 0.75  # of big's blocks each capture rewrites


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class History:
    """The repository, what every point and disk must read, and the rounds of kills."""

    def __init__(self, rpfs, mount, tmp: Path, seed: int, scale: Scale, daemon: bool):
        self.rpfs = rpfs
        self.mount = mount
        self.mnt = tmp / "mnt"
        self.tmp = tmp
        self.root = rpfs.repo
        self.rng = random.Random(seed)
        self.seed = seed
        self.scale = scale
        self.daemon = daemon  # kill the daemon serving the command, else the CLI itself
        self.sums: dict[str, str] = {}  # DISK@POINT (or a disk's name) -> sha256
        self.chunks: dict[str, frozenset[bytes]] = {}  # the same -> the chunks it reads
        self.made: dict[str, list[str]] = {"big": [], "many": []}  # point names, in order
        self.timings: list[str] = []

    # -- the history, in process (no daemon yet) ------------------------------------------

    def build(self) -> None:
        self.rpfs("init", "--block-size", "4K", check=True)
        pool = [self.rng.randbytes(BS) for _ in range(POOL)]
        big = bytearray(self.scale.big_blocks * BS)
        many = bytearray(MANY_BLOCKS * BS)
        with Repository(self.root) as repo:
            for i in range(self.scale.big_points):
                rewrite = range(self.scale.big_blocks) if i == 0 else self.rng.sample(
                    range(self.scale.big_blocks), int(CHURN * self.scale.big_blocks))
                self._change(big, rewrite, pool, f"big {i}")
                self._capture(repo, "big", f"p{i:02}", big)
            for i in range(self.scale.many_points):
                rewrite = range(MANY_BLOCKS) if i == 0 else self.rng.sample(range(MANY_BLOCKS), 8)
                self._change(many, rewrite, pool, f"many {i}")
                self._capture(repo, "many", f"m{i:02}", many)
            service = DiskService(repo)
            try:
                service.clone("big@p01", "cl")  # big@p01 is deleted in the second round
            finally:
                service.registry.close_all()
        self.sums["cl"], self.chunks["cl"] = self.sums["big@p01"], self.chunks["big@p01"]

    def _change(self, image: bytearray, blocks, pool: list[bytes], tag: str) -> None:
        """Rewrite `blocks`: mostly text unique to the block and capture (compressible, so
        captures are quick), some shared pool blocks, some zeros (no chunk)."""
        for b in blocks:
            kind = self.rng.random()
            if kind < 0.1:
                data = self.rng.choice(pool)
            elif kind < 0.15:
                data = bytes(BS)
            else:
                data = (f"{tag} block {b} ".encode() * (BS // 8))[:BS]
            image[b * BS : (b + 1) * BS] = data

    def _capture(self, repo: Repository, disk: str, name: str, image: bytearray) -> None:
        source = self.tmp / "source.img"
        source.write_bytes(image)
        point = capture(repo, disk, source, name)
        ref = f"{disk}@{name}"
        with repo.index.read() as txn:
            read = reads(repo.index, txn, repo.index.chain(txn, point.lineage, point.gen))
        self.sums[ref], self.chunks[ref] = sha(image), frozenset(read.values())
        self.made[disk].append(name)
        self.sums[disk], self.chunks[disk] = self.sums[ref], self.chunks[ref]  # its head

    # -- the state of the repository -----------------------------------------------------

    def state(self) -> tuple[set[str], list[str]]:
        """The points (DISK@POINT) and the trash's points, in purge order."""
        with Repository(self.root) as repo, repo.index.read() as txn:
            points = {p.ref for p in repo.index.list_points(txn)}
            trash = [e.point.ref for e in repo.index.list_trash(txn)]
        return points, trash

    def to_trash(self, refs: list[str]) -> None:
        if refs:
            self.rpfs("point", "delete", *refs, check=True)

    # -- running a command and killing it -------------------------------------------------

    def killed(self, args: list[str], hooks: dict[str, int], progress=None) -> str:
        """Run `rpfs ARGS` (through a daemon when killing one) and kill it: the fault
        `hooks` do, else this once `progress()` (polled) says so. Returns how it ended."""
        if self.daemon:
            with armed(self.rpfs, **hooks):
                self.mount(self.mnt)
            victim = self.mount.daemon_pid()
            proc = self.rpfs.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            with armed(self.rpfs, **hooks):
                proc = self.rpfs.popen(*args, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
            victim = proc.pid
        start = time.monotonic()
        try:
            if progress is not None:
                while proc.poll() is None and not progress():
                    assert time.monotonic() < start + WAIT, f"rpfs {args}: no progress"
                    time.sleep(0.001)
                ended = f"killed {time.monotonic() - start:.3f} s in"
                if proc.poll() is not None:
                    ended = "ended before the kill"
                if proc.poll() is None or self.daemon:
                    os.kill(victim, signal.SIGKILL)  # our own child, or the daemon we mounted
            err = proc.communicate(timeout=WAIT)[1].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if progress is None:
            ended = f"killed by {hooks} {time.monotonic() - start:.3f} s in"
        assert wait_pid_exit(victim, WAIT), f"rpfs {args}: {victim} was not killed"
        if ended == "ended before the kill":
            assert proc.returncode == 0, f"rpfs {args} failed unkilled: {err}"
        elif self.daemon and proc.returncode == 0:  # the answer crossed the kill
            assert progress is not None, f"rpfs {args} did not see the daemon die"
            ended = "answered, then the daemon killed"
        elif self.daemon:
            assert "daemon" in err, f"rpfs {args}: {err}"
        else:
            assert proc.returncode == -signal.SIGKILL, f"rpfs {args}: {proc.returncode} {err}"
        if self.daemon:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        return ended

    @contextlib.contextmanager
    def seeded_kill(self, order: list[str]) -> Iterator[Callable[[], bool]]:
        """A `progress` for killed(): true a seeded pause of a few milliseconds after a
        seeded number of the points `order` (at least one, not all) are gone: the command
        purging them is at work. Its index is opened before the command starts (opening
        one writes)."""
        done = self.rng.randint(1, len(order) - 1)
        pause = self.rng.uniform(0, 0.005)
        index = Index(self.root / "index")
        seen: list[float] = []

        def progress() -> bool:
            if not seen:
                with index.read() as txn:
                    there = {p.ref for p in index.list_points(txn)} | {
                        e.point.ref for e in index.list_trash(txn)}
                if len(set(order) - there) < done:
                    return False
                seen.append(time.monotonic())
            return time.monotonic() >= seen[0] + pause

        try:
            yield progress
        finally:
            index.close()

    # -- the rounds ------------------------------------------------------------------------

    def run(self) -> None:
        self.build()
        self.check("the history")
        self.round_purge_at_once_killed_mid_transaction()
        self.round_trash_purge_killed_after_commits()
        self.round_prune_killed_after_commits()
        for r in range(self.scale.seeded_kills):
            if r % 2 == 0:
                self.round_trash_purge_killed_seeded(r)
            else:
                self.round_purge_at_once_killed_seeded(r)
        if self.daemon:
            self.mount(self.mnt)
        start = time.monotonic()
        res = self.rpfs("trash", "purge", check=True, timeout=WAIT)
        self.timings.append(f"trash purge of {len(res.stdout.splitlines())} points, not killed: "
                            f"{time.monotonic() - start:.3f} s")
        if self.daemon:
            self.rpfs("umount", self.mnt, check=True, timeout=WAIT)
        self.check("the final purge", final=True)
        assert self.state()[1] == []

    def round_purge_at_once_killed_mid_transaction(self) -> None:
        """`point delete --purge` of three big points: killed half-way through the second
        one's drops, so the first is gone and the second and third are untouched."""
        targets = ["big@p00", "big@p03", "big@p05"]
        with Repository(self.root) as repo, repo.index.read() as txn:
            plan = [repo.index.get_point(txn, *ref.split("@")) for ref in targets[:2]]
            drops = [len(doomed(repo.index, txn, p.lineage, p.gen, gone=p).extents) for p in plan]
        assert min(drops) > 1000, drops  # a large purge, or the test proves little
        at = drops[0] + drops[1] // 2
        ended = self.killed(["point", "delete", *targets, "--purge"], {"kill_at_drop": at})
        self.timings.append(f"point delete --purge {ended}")
        self.expect(targets, "points", "gone", done=1)
        self.check(f"point delete --purge killed at drop {at} of {drops}")

    def round_trash_purge_killed_after_commits(self) -> None:
        """`trash purge` of big and many points (one the clone's origin): killed just after
        a seeded number of them were purged."""
        self.to_trash(["big@p01", "big@p03", "big@p04"] + [f"many@m{i:02}" for i in range(6)])
        _, trash = self.state()
        n = self.rng.randint(1, len(trash) - 1)
        ended = self.killed(["trash", "purge"], {"kill_after_commits": n})
        self.timings.append(f"trash purge {ended}")
        self.expect(trash, "trash", "gone", done=n)
        self.check(f"trash purge killed after {n} of {len(trash)} points")

    def round_prune_killed_after_commits(self) -> None:
        """`prune many --keep-last HALF`: killed after a seeded number of its moves to the
        trash (in the order of its plan, newest first)."""
        keep = str(self.scale.many_points // 2)
        res = self.rpfs("prune", "many", "--keep-last", keep, "--dry-run", "--json", check=True)
        removed = [f"many@{p['name']}" for p in json.loads(res.stdout) if not p["keep"]]
        n = self.rng.randint(1, len(removed) - 1)
        ended = self.killed(["prune", "many", "--keep-last", keep], {"kill_after_commits": n})
        self.timings.append(f"prune {ended}")
        self.expect(removed, "points", "trash", done=n)
        self.check(f"prune killed after {n} of {len(removed)} moves")

    def round_trash_purge_killed_seeded(self, r: int) -> None:
        """`trash purge` of what the trash holds and a few more points, killed at a seeded
        moment once it is seen purging."""
        self.to_trash(self._sample(self.state()[0], 3))
        _, trash = self.state()
        if len(trash) < 2:
            return
        with self.seeded_kill(trash) as progress:
            ended = self.killed(["trash", "purge"], {}, progress)
        left = self.expect(trash, "trash", "gone")
        self.timings.append(f"trash purge {ended}: {len(trash) - left} of {len(trash)} purged")
        self.check(f"seeded round {r}: trash purge {ended}")

    def round_purge_at_once_killed_seeded(self, r: int) -> None:
        """`point delete --purge` of several points, killed at a seeded moment."""
        points, _ = self.state()
        targets = self._sample(points, 3)
        if len(targets) < 2:
            return
        with self.seeded_kill(targets) as progress:
            ended = self.killed(["point", "delete", *targets, "--purge"], {}, progress)
        left = self.expect(targets, "points", "gone")
        self.timings.append(f"point delete --purge {ended}: {len(targets) - left} of "
                            f"{len(targets)} purged")
        self.check(f"seeded round {r}: point delete --purge {ended}")

    def _sample(self, points: set[str], n: int) -> list[str]:
        """Up to `n` of `points`, big ones first (large purges), never the newest of a
        disk (so some points survive)."""
        keep = {f"{disk}@{names[-1]}" for disk, names in self.made.items()}
        out = []
        for disk in self.made:
            there = sorted(ref for ref in points - keep if ref.startswith(f"{disk}@"))
            out += self.rng.sample(there, min(n - len(out), len(there)))
        return out

    def expect(self, order: list[str], was: str, into: str, done: int | None = None) -> int:
        """The command worked through the points `order` one at a time, each from `was`
        (the points, or the trash) `into` the trash or gone: the first ones are there, the
        others where they were, exactly `done` of them went if given. Returns how many
        stayed."""
        points, trash = self.state()
        where = {ref: "points" if ref in points else "trash" if ref in trash else "gone"
                 for ref in order}
        went = sum(where[ref] == into for ref in order)
        wanted = [into] * went + [was] * (len(order) - went)
        assert [where[ref] for ref in order] == wanted, (
            f"RPFS_PURGE_CRASH_SEED={self.seed}: not one point at a time, in order: {where}")
        if done is not None:
            assert went == done, f"RPFS_PURGE_CRASH_SEED={self.seed}: {where}, not {done} done"
        return len(order) - went

    # -- the checks ---------------------------------------------------------------------------

    def check(self, when: str, final: bool = False) -> None:
        """Everything reads what it must, references are exact, nothing unread is kept.

        The clone is read in process without copy-on-read, through its origin's extents
        (a read through the mount would copy them into its local file); through the mount
        at the end only."""
        what = f"RPFS_PURGE_CRASH_SEED={self.seed}, after {when}"
        points, trash = self.state()
        assert points | set(trash) <= set(self.sums), what
        assert not points & set(trash), what
        with Repository(self.root) as repo:
            assert refcount_errors(repo.index) == [], what
            assert unread_extents(repo.index) == [], what
            readers = points | set(trash) | {"big", "many", "cl"}
            wanted = frozenset().union(*(self.chunks[ref] for ref in readers)) - {ZERO}
            with repo.index.read() as txn:
                live = repo.index.live_stored_bytes(txn)
                expected = sum(repo.index.get_chunk(txn, d).length for d in wanted)
                entries = repo.index.list_trash(txn)
            assert live == expected, f"{what}: {live} live stored bytes, not {expected}"
            cache = ChunkCache(repo)
            service = DiskService(repo, cache)
            try:
                for entry in entries:  # a deleted point is whole until purged
                    image = PointImage(repo, cache, entry.point)
                    assert sha(image.read(0, image.size)) == self.sums[entry.point.ref], (
                        f"{what}: {entry.point.ref} in the trash differs")
                with service.registry.using("cl") as clone:
                    repo.space.low = lambda: True  # fetched blocks are not kept
                    assert sha(clone.read(0, clone.size)) == self.sums["cl"], f"{what}: cl"
            finally:
                service.registry.close_all()
                cache.close()
        self.mount(self.mnt)
        for ref in sorted(points):
            image = point_image(self.mnt, *ref.split("@"))
            assert sha(read_image(image)) == self.sums[ref], f"{what}: {ref} differs"
        if final:
            assert sha(read_image(self.mnt / "disks" / "cl.img")) == self.sums["cl"], what
        if trash:  # one from the trash through the mount, and back
            ref = self.rng.choice(trash)
            self.rpfs("undelete", ref, check=True)
            image = point_image(self.mnt, *ref.split("@"))
            assert sha(read_image(image)) == self.sums[ref], f"{what}: undeleted {ref} differs"
            self.rpfs("point", "delete", ref, check=True)
        assert_check_clean(self.rpfs)  # through the daemon
        self.rpfs("umount", self.mnt, check=True, timeout=WAIT)


def purge_crash_seed(default: int) -> int:
    return int(os.environ.get("RPFS_PURGE_CRASH_SEED") or default)


@pytest.mark.parametrize("daemon", [False, True], ids=["cli", "daemon"])
def test_sigkill_during_purge_leaves_points_whole_and_refcounts_exact(
    rpfs, mount, tmp_path, daemon
):
    history = History(rpfs, mount, tmp_path, purge_crash_seed(11), DEFAULT, daemon)
    history.run()
    print(*history.timings, sep="\n")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("daemon", [False, True], ids=["cli", "daemon"])
def test_sigkill_during_large_purges_stress(rpfs, mount, tmp_path, daemon):
    seed = purge_crash_seed(random.SystemRandom().randrange(2**32))
    print(f"RPFS_PURGE_CRASH_SEED={seed}")
    history = History(rpfs, mount, tmp_path, seed, STRESS, daemon)
    history.run()
    print(*history.timings, sep="\n")
