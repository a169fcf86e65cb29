"""Capture of an external raw image or block device into a new recovery point.

The capture is atomic. While it runs, new chunks go to packs of its own and the extents it
will publish wait in the index's `staging` table under a capture id. Only the final
transaction moves them to `extents` at the new generation, takes the chunk references and
creates the point. A capture that dies leaves staging rows (dropped by the next capture)
and unreferenced chunks (reusable by dedup, freed by GC) — never a point or an extent that
a reader could see.

Reading, hashing, comparing and compressing run in a thread pool in batches; the calling
thread only appends records to the pack and commits batches to the index.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .errors import SPACE_ERRNOS, NoSpace, RpfsError
from .index import ZERO, DiskRecord, PointRecord
from .ingest import SESSIONS, Change, Ingest, examine
from .lifecycle import clock, marks
from .lifecycle.purge import release
from .lineage import allocated_at
from .names import ceil_div, check_name, default_point_name, fmt_bytes
from .nbd.client import NbdSource
from .pipeline import ordered_map
from .progress import ProgressFn
from .repo import Repository
from .source import Extent, Source, block_runs, load_changed, open_source

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20  # bytes read and hashed per worker task
FLUSH_BYTES = 64 << 20  # pack bytes appended between index commits

@dataclass
class _Batch:
    first: int  # first block
    count: int
    read: bool  # False: a hole of the source, compared as zeros without reading


@dataclass
class _Base:
    """What the new point is compared against: the disk's newest point, if any."""

    disk: DiskRecord | None
    chain: list[tuple[int, int]] = field(default_factory=list)
    head_gen: int = 0
    allocated_blocks: int = 0


def reap_dead_captures(repo: Repository, held: str) -> None:
    """Drop the staging rows of captures whose process is gone: their disk lock is free,
    or it is `held` by the caller (so no other capture of that disk can be running)."""
    with repo.index.read() as txn:
        records = repo.index.list_captures(txn)
    for capture_id, info in records:
        if info["disk"] == held or repo.disk_lock_free(info["disk"]):
            log.warning(
                "disk %s: dropping capture %d left by pid %s (it did not finish; no point "
                "was created)", info["disk"], capture_id, info.get("pid"),
            )
            with repo.index.write() as txn:
                repo.index.drop_staged(txn, capture_id)


def capture(
    repo: Repository,
    disk: str,
    source: Path | str,
    point: str | None = None,
    changed: Path | None = None,
    progress: ProgressFn | None = None,
    description: str = "",
    expires: float | None = None,
    bitmap: str | None = None,
) -> PointRecord:
    """Capture `source` (a path, or an NBD URI) as a new point of `disk` (created by its
    first capture), with the user's `description` and, if given, its own expiry (seconds
    since the epoch, in the future: then a daemon moves the point to the trash).

    `changed` (a file of extents) or `bitmap` (the NBD source's dirty bitmap of that
    name) lists what changed since the disk's previous point: only that is read."""
    check_name(disk, "disk name")
    point = check_name(point, "point name") if point is not None else default_point_name()
    marks.check_description(description)
    if expires is not None:
        clock.check_expiry(expires)
    if changed is not None and bitmap is not None:
        raise RpfsError("give --changed or --bitmap, not both: each lists what changed")
    src = open_source(source, bitmap)
    try:
        listed = (load_changed(changed, src.size) if changed is not None
                  else src.dirty_extents() if bitmap is not None else None)
        with repo.disk_lock(disk):
            reap_dead_captures(repo, disk)
            taken = _Capture(repo, disk, point, src, listed, progress, description,
                             expires, "dirty-bitmap" if bitmap else "changed-list").run()
    finally:
        src.close()
    checkpoint.cover_new_point(repo)
    return taken


class _Capture:
    def __init__(
        self,
        repo: Repository,
        disk: str,
        point: str,
        src: Source | NbdSource,
        changed: list[Extent] | None,
        progress: ProgressFn | None,
        description: str = "",
        expires: float | None = None,
        listed_by: str = "changed-list",
    ) -> None:
        self.repo = repo
        self.description = description
        self.expires = expires
        self.index = repo.index
        self.bs = repo.block_size
        self.disk = disk
        self.point = point
        self.src = src
        self.nblocks = ceil_div(src.size, self.bs)
        self.changed = changed
        self.listed_by = listed_by  # the method of a point whose changes were listed
        self.progress = progress or (lambda done, total: None)
        self.zero_block = bytes(self.bs)
        self.ingest = Ingest(repo)
        self.pending_stage: list[tuple[int, bytes]] = []
        self.blocks_written = 0
        self.allocated_delta = 0
        self.stored_at = (0, 0)  # (source bytes read, bytes stored) after the last batch

    # -- set-up ---------------------------------------------------------------------------

    def _begin(self) -> tuple[int, _Base]:
        with self.index.write() as txn:
            disk = self.index.get_disk(txn, self.disk)
            base = _Base(disk)
            if disk is not None:
                if disk.writable:
                    raise RpfsError(
                        f"disk {self.disk} is a writable disk; take a point of it with "
                        f"'rpfs snapshot {self.disk}', or capture under a new disk name"
                    )
                if disk.size != self.src.size:
                    raise RpfsError(
                        f"source {self.src.path} is {self.src.size} bytes but disk "
                        f"{self.disk} is {disk.size}; a disk's size is fixed by its first "
                        "capture (capture it under a new disk name)"
                    )
                lineage = self.index.get_lineage(txn, disk.lineage)
                base.head_gen = lineage.head_gen
                base.chain = self.index.chain(txn, disk.lineage, lineage.head_gen)
                base.allocated_blocks = allocated_at(self.index, txn, disk.lineage,
                                                     lineage.head_gen)
            self._check_point_free(txn)
            capture_id = self.index.next_id(txn, "capture")
            # packs_after: every pack this capture writes is numbered above it, so GC
            # leaves those alone while the capture lives (gc.py).
            self.index.put_capture(
                txn, capture_id, {"disk": self.disk, "pid": os.getpid(), "started": time.time(),
                                  "packs_after": self.index.last_id(txn, "pack")}
            )
        return capture_id, base

    def _check_point_free(self, txn) -> None:
        if self.index.get_point(txn, self.disk, self.point) is not None:
            raise RpfsError(
                f"point {self.disk}@{self.point} already exists; choose another --name"
            )

    def _plan(self, base: _Base) -> tuple[list[_Batch], str]:
        """Batches of blocks to read (and holes to compare as zeros), and the method."""
        if self.changed is not None:
            read_runs = block_runs(self.changed, self.bs, self.nblocks)
            hole_runs: list[tuple[int, int]] = []  # unlisted blocks are unchanged
            method = self.listed_by
            if method == "dirty-bitmap" and not base.chain:
                raise RpfsError(
                    f"disk {self.disk} has no point yet, and a dirty bitmap lists only what "
                    "changed since it was started: capture once without --bitmap"
                )
        else:
            read_runs = block_runs(self.src.data_extents(), self.bs, self.nblocks)
            # A hole over a block that held data in the previous point is a change to zero.
            hole_runs = _complement(read_runs, self.nblocks) if base.chain else []
            method = "incremental" if base.chain else "full"
        per_batch = max(1, BATCH_BYTES // self.bs)
        batches = [
            _Batch(b, min(per_batch, end - b), read)
            for runs, read in ((read_runs, True), (hole_runs, False))
            for first, end in runs
            for b in range(first, end, per_batch)
        ]
        batches.sort(key=lambda batch: batch.first)
        return batches, method

    # -- the pipeline ---------------------------------------------------------------------

    def _examine(self, batch: _Batch, chain: list[tuple[int, int]]) -> list[Change]:
        """Worker: read, hash and compare one batch; compress blocks not yet stored."""
        bs = self.bs
        # bytes slices, not memoryview: comparing a memoryview with bytes is per element
        # (~280 us for 64 KiB), a bytes comparison is one memcmp.
        data = self.src.read(batch.first * bs, batch.count * bs) if batch.read else None
        out: list[Change] = []
        with self.index.read() as txn:
            any_bad = self.index.any_bad(txn)
            for i in range(batch.count):
                block = batch.first + i
                raw = data[i * bs : (i + 1) * bs] if data is not None else None
                prev = self.index.resolve(txn, chain, block) if chain else ZERO
                change = examine(self.index, txn, block, raw, self.zero_block, prev, any_bad)
                if change is not None:
                    out.append(change)
        return out

    def _take(self, change: Change) -> None:
        self.ingest.take(change)
        self.pending_stage.append((change.block, change.value))
        self.blocks_written += 1
        self.allocated_delta += change.allocated_delta

    def _flush(self, capture_id: int) -> None:
        """Make appended chunks durable, then record them and the staged extents."""
        self.ingest.sync()
        with self.index.write() as txn:
            self.ingest.register(txn)
            for block, value in self.pending_stage:
                self.index.stage(txn, capture_id, block, value)
        self.ingest.committed()
        self.pending_stage.clear()

    def _publish(self, capture_id: int, base: _Base, method: str) -> PointRecord:
        """The commit point: staged extents become generation head+1 and a point."""
        with self.index.write() as txn:
            self._check_point_free(txn)
            disk = base.disk
            if disk is None:
                lineage = self.index.new_lineage(txn, self.disk)
                disk = DiskRecord(self.disk, self.src.size, lineage.id, clock.now())
                self.index.put_disk(txn, disk)
            else:
                lineage = self.index.get_lineage(txn, disk.lineage)
            gen = lineage.head_gen + 1
            for block, value in self.index.iter_staged(txn, capture_id):
                self.index.add_extent(txn, lineage.id, block, gen, value)
            self.index.drop_staged(txn, capture_id)
            lineage.head_gen = gen
            self.index.put_lineage(txn, lineage)
            if gen > 1:  # the head read gen - 1 until now
                release(self.index, txn, lineage.id, gen - 1)
            point = PointRecord(
                disk=self.disk,
                name=self.point,
                lineage=lineage.id,
                gen=gen,
                created=clock.now(),
                size=self.src.size,
                blocks_written=self.blocks_written,
                allocated_blocks=base.allocated_blocks + self.allocated_delta,
                bytes_stored=self.ingest.bytes_stored,
                method=method,
                description=self.description,
                expires=self.expires,
            )
            self.index.put_point(txn, point)
        return point

    def run(self) -> PointRecord:
        with SESSIONS.writing():  # (other processes' GC sees the capture's record)
            return self._run()

    def _run(self) -> PointRecord:
        space = self.repo.space
        space.check(f"a capture of {self.disk}")  # the index must keep room to commit
        capture_id, base = self._begin()
        total = 0
        try:
            batches, method = self._plan(base)
            total = sum(b.count for b in batches if b.read) * self.bs
            done = 0
            self.progress(0, total)
            examine = functools.partial(self._examine, chain=base.chain)
            for batch, changes in ordered_map(examine, batches):
                if space.low():  # stop before the reserve is gone, not at ENOSPC
                    raise space.error(f"the capture of {self.disk}")
                self.ingest.protect(changes)
                for change in changes:
                    self._take(change)
                if self.ingest.pending_bytes >= FLUSH_BYTES or len(self.pending_stage) >= 65536:
                    self._flush(capture_id)
                if batch.read:
                    done += batch.count * self.bs
                    self.stored_at = (done, self.ingest.bytes_stored)
                    self.progress(done, total)
            self._flush(capture_id)
            self.ingest.close()
            point = self._publish(capture_id, base, method)
        except BaseException as exc:
            try:
                self._abandon(capture_id)
            except Exception:  # the next capture drops what is left; report the cause
                log.info("disk %s: cleaning up after the failed capture failed too", self.disk,
                         exc_info=True)
            if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
                raise self._no_space(exc, total) from None
            raise
        log.info(
            "disk %s: point %s captured (%s): %d blocks written, %d bytes stored",
            self.disk, self.point, method, point.blocks_written, point.bytes_stored,
        )
        return point

    def _abandon(self, capture_id: int) -> None:
        """Undo a failed capture: its packs go, and so do its staging rows and the chunk
        records only it used, in one transaction (after the unregistered bytes are gone,
        so that commit finds room even on a full disk)."""
        self.ingest.discard()
        with self.index.write() as txn:
            self.index.drop_staged(txn, capture_id)
            packs = self.ingest.forget(txn)
        for pack in packs:
            self.ingest.store.delete(pack)

    def _no_space(self, exc: OSError, total: int) -> NoSpace:
        """How much the capture needed: what it stored plus the rest of the source at the
        compression it saw so far (an estimate), against what is free now."""
        stored = self.ingest.bytes_stored
        read, stored_then = self.stored_at  # as of the last whole batch: a ratio to go by
        needed = stored_then + (total - read) * (stored_then / read if read else 1.0)
        space = self.repo.space
        free = space.free_now()
        return NoSpace(
            f"no space for the capture of {self.disk}: it needs about {fmt_bytes(needed)} "
            f"for new chunks, and the filesystem of {self.repo.root} has {fmt_bytes(free)} "
            f"free (rpfs keeps {fmt_bytes(space.figures()[1])} of it for the index); what "
            f"it had stored ({fmt_bytes(stored)}) was removed; free space there (or lower "
            "\"reserve\" in rpfs.json) and capture again",
            exc.filename,
        )


def _complement(runs: list[tuple[int, int]], nblocks: int) -> list[tuple[int, int]]:
    """Block runs of [0, nblocks) not covered by sorted, merged `runs`."""
    out, pos = [], 0
    for first, end in runs:
        if first > pos:
            out.append((pos, first))
        pos = max(pos, end)
    if pos < nblocks:
        out.append((pos, nblocks))
    return out
