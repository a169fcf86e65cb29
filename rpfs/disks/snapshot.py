"""The points of one open writable disk in the making: freeze, archive, riders, completion.

Snapshot (`freeze`): under the disk's barrier (every stripe lock held, no write in
flight, the local file durable), in one index transaction take generation g, create the
point ("archiving") and turn DIRTY into FROZEN (every local block if the map is not
trusted). Archiving copies FROZEN blocks into the store and, in one transaction, writes
their extents at g, the point's figures and their new map pages: a persisted FROZEN
state therefore always means "not archived yet", and a crash resumes where it stopped.
A write to a FROZEN block archives it first (copy-before-write), so the local file keeps
the point's bytes until the index has them.

A point taken while another is still archiving, with nothing written since, reads
exactly as that one: it is a rider, with no frozen blocks of its own, and completes when
that one does. Only one point of a disk archives at a time.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..index import PointRecord, PointState
from ..ingest import SESSIONS, Ingest, examine
from ..lifecycle.purge import release
from ..lineage import allocated_at
from .blockmap import DIRTY, FROZEN, PRESENT
from .catalog import archiving_and_riders

if TYPE_CHECKING:
    from .livedisk import LiveDisk

log = logging.getLogger(__name__)

ARCHIVE_BATCH = 64  # frozen blocks archived per index transaction


class Snapshots:
    """The archiving state machine of one open disk; the archiver thread drives it
    (`archive_batch` until it returns 0), and so do writes to frozen blocks.

    `_archive_lock` makes archive batches (and completion) one at a time: it guards the
    Ingest (its pack writer and unregistered records) and `archiving`'s figures. It is
    taken after the stripe locks of the blocks a batch archives and before the block
    map's sync lock. `archiving` and `riders` change only under a barrier (freeze) or
    under the archive lock with the sync lock (completion), so they are exact for whoever
    holds either.
    """

    def __init__(self, disk: LiveDisk) -> None:
        self.disk = disk
        self.index = disk.index
        self.map = disk.map
        self._archive_lock = threading.Lock()
        self._ingest: Ingest | None = None
        self._before_freeze = b""
        self._prev_chain: list[tuple[int, int]] = []  # where the archiving point's base reads
        # Points taken while `archiving` was pending, with nothing written since: they read
        # exactly as it does, so they complete with it instead of waiting for it.
        self.riders: list[PointRecord] = []
        self.archiving = self._find_archiving()

    def _find_archiving(self) -> PointRecord | None:
        """The point whose frozen blocks are still to archive (the oldest pending one);
        newer pending points of the lineage are its riders."""
        with self.index.read() as txn:
            archiving, riders = archiving_and_riders(
                self.index.list_points(txn, self.disk.name), self.disk.record.lineage)
            if archiving is None:
                return None
            self._prev_chain = self.index.chain(txn, archiving.lineage, archiving.gen - 1)
        self.riders = riders
        return archiving

    def close(self) -> None:
        if self._ingest is not None:
            self._ingest.close()

    def pending(self, gen: int) -> bool:
        """Whether the point of generation `gen` is archiving or rides on the one that is."""
        point = self.archiving
        return point is not None and (point.gen == gen or any(r.gen == gen for r in self.riders))

    # -- freeze ---------------------------------------------------------------------------

    def freeze(self, txn, name: str, now: float, description: str = "",
               expires: float | None = None) -> PointRecord:
        """Create point `name` at a new generation (caller holds the disk's barrier,
        checked that the name is free, and commits txn), with the user's `description`
        and its own expiry, if any.

        Call `frozen(point)` after the transaction commits, `unfreeze()` if it does not.
        """
        index, disk = self.index, self.disk
        lineage = index.get_lineage(txn, disk.record.lineage)
        # What the disk read at its last point: its origin's before its first one (a
        # detached clone's own gen-0 extents).
        base = (lineage.parent, lineage.parent_gen) if not lineage.head_gen and (
            lineage.parent is not None) else (lineage.id, lineage.head_gen)
        lineage.head_gen += 1
        index.put_lineage(txn, lineage)
        if self.archiving is not None:
            if self.must_finish:
                raise RuntimeError(f"disk {disk.name}: freeze while archiving with writes")
            self._before_freeze = bytes(self.map.states)
            frozen = 0  # a rider: its blocks are the pending point's, nothing to freeze
        else:
            self._before_freeze = self.map.freeze()
            frozen = self.map.states.count(FROZEN)
            self.map.store_pages(txn)  # the barrier made the data durable
            self._prev_chain = index.chain(txn, lineage.id, lineage.head_gen - 1)
        point = PointRecord(
            disk=disk.name, name=name, lineage=lineage.id, gen=lineage.head_gen, created=now,
            size=disk.size, allocated_blocks=allocated_at(index, txn, *base),
            method="tracked" if self.map.tracked else "full-compare",
            state=PointState.ARCHIVING if frozen or self.archiving else PointState.COMPLETE,
            frozen_blocks=frozen, description=description, expires=expires,
        )
        index.put_point(txn, point)
        return point

    @property
    def must_finish(self) -> bool:
        """A point is still archiving and something was written since (or the map is not
        trusted): the next point must wait for that archive. Otherwise the next point
        rides on the pending one. Exact only under the disk's barrier."""
        return self.archiving is not None and (not self.map.tracked or DIRTY in self.map.states)

    def unfreeze(self) -> None:
        """The freeze's transaction did not commit: take back its state changes."""
        self.map.restore(self._before_freeze)

    def frozen(self, point: PointRecord) -> None:
        """The freeze committed: start tracking writes anew and archive `point` (or let
        it ride on the point being archived)."""
        self.map.tracked = True
        if self.archiving is not None:
            self.riders.append(point)
        else:
            self.archiving = point if point.state == PointState.ARCHIVING else None

    # -- archive --------------------------------------------------------------------------

    def archive_batch(self, limit: int = ARCHIVE_BATCH) -> int:
        """Archive up to `limit` frozen blocks; 0 once the point is complete."""
        if self.archiving is None:
            return 0
        states, blocks, pos = self.map.states, [], 0
        while len(blocks) < limit:
            pos = states.find(FROZEN, pos)
            if pos < 0:
                break
            blocks.append(pos)
            pos += 1
        if not blocks:
            self._complete()
            return 0
        with self.disk.locked_blocks(blocks):
            return self.archive_locked([b for b in blocks if states[b] == FROZEN])

    def finish(self) -> None:
        """Archive the pending point to the end (on the caller's thread)."""
        while self.archive_batch():
            pass

    def archive_locked(self, blocks: list[int]) -> int:
        """Copy frozen `blocks` into the point (caller holds their stripe locks).

        All or nothing: if anything fails (a full disk, say), the blocks stay FROZEN, the
        records this batch appended are cut from the pack, and the next attempt starts
        on a new Ingest. Below the space reserve it does not start (NoSpace).
        """
        if not blocks:
            return 0
        with self._archive_lock:
            self.disk.space.check(f"archiving point {self.archiving.ref}")
            ingest = self._ingest = self._ingest or Ingest(self.disk.repo)
            try:
                with SESSIONS.writing():  # from its examine to its commit
                    self._archive_into(ingest, blocks)
            except BaseException:
                self._ingest = None
                for b in blocks:
                    self.map.set(b, b + 1, FROZEN)
                try:
                    ingest.discard()
                except OSError as exc:  # left as garbage that nothing names
                    log.warning("disk %s: cannot remove unregistered pack bytes: %s",
                                self.disk.name, exc)
                raise
        return len(blocks)

    def _archive_into(self, ingest: Ingest, blocks: list[int]) -> None:
        point, disk = self.archiving, self.disk
        stored_before = ingest.bytes_stored
        changes = []
        with self.index.read() as txn:
            any_bad = self.index.any_bad(txn)
            for b in blocks:
                prev = self.index.resolve(txn, self._prev_chain, b)
                change = examine(self.index, txn, b, disk.pread_block(b), disk.zero, prev,
                                 any_bad)
                if change is not None:
                    changes.append(change)
        ingest.protect(changes)
        for change in changes:
            ingest.take(change)
        ingest.sync()
        for b in blocks:
            self.map.set(b, b + 1, PRESENT)

        def commit(txn) -> PointRecord:
            ingest.register(txn)
            for change in changes:
                self.index.add_extent(txn, point.lineage, change.block, point.gen, change.value)
            rec = self.index.get_point(txn, point.disk, point.name)
            rec.archived_blocks += len(blocks)
            rec.blocks_written += len(changes)
            rec.bytes_stored += ingest.bytes_stored - stored_before
            rec.allocated_blocks += sum(c.allocated_delta for c in changes)
            self.index.put_point(txn, rec)
            return rec

        # The extents, the point's figures and the blocks' PRESENT states in one commit.
        rec = self.map.persist(commit)
        ingest.committed()
        self.archiving = rec

    def _complete(self) -> None:
        # The sync lock keeps this out of a barrier, so a point is never made a rider
        # between this commit and the end of the freeze that took it.
        with self._archive_lock, self.map.lock:
            point = self.archiving
            if point is None:
                return
            with self.index.write() as txn:
                rec = self.index.get_point(txn, point.disk, point.name)
                rec.state = PointState.COMPLETE
                self.index.put_point(txn, rec)
                for rider in self.riders:
                    other = self.index.get_point(txn, rider.disk, rider.name)
                    other.state, other.allocated_blocks = PointState.COMPLETE, rec.allocated_blocks
                    self.index.put_point(txn, other)
                release(self.index, txn, rec.lineage, rec.gen - 1)  # the head read it until now
            self.archiving, riders, self.riders = None, self.riders, []
        log.info("disk %s: point %s archived (%d blocks written, %d bytes stored)",
                 self.disk.name, rec.name, rec.blocks_written, rec.bytes_stored)
        for rider in riders:
            log.info("disk %s: point %s complete with %s (nothing written between them)",
                     self.disk.name, rider.name, rec.name)
