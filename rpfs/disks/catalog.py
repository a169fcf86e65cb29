"""What the points of a repository are: the listing `rpfs points` shows, each point's
state (which pending point a rider completes with, a stalled archive) and its sizes.

Its own room because these answers are read by more than one caller (the command line,
the live disk at open) and will grow (owned and shared bytes, expiry and holds): none of
them should re-derive them from index records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..index import DiskRecord, LineageRecord, PointRecord, PointState
from ..lifecycle.cost import Costs, PointCost, costs
from ..repo import Repository
from .history import History, history


def archiving_and_riders(
    points: Iterable[PointRecord], lineage: int
) -> tuple[PointRecord | None, list[PointRecord]]:
    """Of one lineage's points: the one whose frozen blocks are still to archive and the
    ones that ride on it, oldest first.

    A disk archives one point at a time; a point taken while that one was pending, with
    nothing written since, has no frozen blocks of its own and completes with it. So the
    oldest pending point archives and every newer pending point rides.
    """
    pending = sorted(
        (p for p in points if p.state == PointState.ARCHIVING and p.lineage == lineage),
        key=lambda p: p.gen,
    )
    return (pending[0], pending[1:]) if pending else (None, [])


@dataclass(frozen=True)
class PointStatus:
    """A point with the answers derived from the repository around it."""

    record: PointRecord
    allocated_bytes: int
    rides_on: PointRecord | None = None  # the pending point a rider completes with
    stalled: str | None = None  # why its (pending) archive waits, if it does
    cost: PointCost | None = None  # owned and shared bytes, when asked for

    @property
    def archived_pct(self) -> int:
        """How far a pending point's own archive is, in whole percent."""
        p = self.record
        return 100 * p.archived_blocks // max(1, p.frozen_blocks)


@dataclass(frozen=True)
class Catalog:
    """The disks, lineages and points of a repository (or of one disk), read at once."""

    block_size: int
    disks: list[DiskRecord]
    lineages: list[LineageRecord]
    points: list[PointStatus]
    disk_bytes: dict[str, int]  # stored bytes of each disk's points after dedup, if asked
    histories: dict[str, History] = field(default_factory=dict)  # by disk name, if asked
    has_store: bool = False  # the packs go to an object store (costs say what is pending)


def read_catalog(
    repo: Repository, disk: str | None = None, stalls: Mapping[str, str] | None = None,
    with_costs: bool = False, with_history: bool = False,
) -> Catalog:
    """The catalog of `disk` (an error if there is none), or of every disk.

    `stalls` says which disks' archives are stalled and why: only a serving daemon knows
    (it keeps that in memory), so the caller asks it and passes the answer on.
    `with_costs` prices every point (`lifecycle/cost.py`: a scan of each lineage);
    `with_history` adds each disk's origins and lines of points (`disks/history.py`).
    """
    stalls = stalls or {}
    index, bs = repo.index, repo.block_size
    with index.read() as txn:
        disks = [index.disk_named(txn, disk)] if disk is not None else index.list_disks(txn)
        lineages = index.list_lineages(txn)
        records = index.list_points(txn, disk)
        stored = None if repo.config.store is None else {
            pack for pack, r in index.pack_states(txn).items() if r["state"] == "stored"}
        priced = costs(index, txn, records, stored) if with_costs else Costs()
        histories = {d.name: history(index, txn, d, lineages) for d in disks} if with_history \
            else {}
    heads: dict[tuple[str, int], tuple[PointRecord | None, list[PointRecord]]] = {}
    statuses = []
    for p in records:
        key = (p.disk, p.lineage)
        if key not in heads:
            heads[key] = archiving_and_riders((q for q in records if q.disk == p.disk),
                                              p.lineage)
        head, riders = heads[key]
        pending = p.state != PointState.COMPLETE
        statuses.append(PointStatus(
            record=p,
            allocated_bytes=p.allocated_blocks * bs,
            rides_on=head if p in riders else None,
            stalled=stalls.get(p.disk) if pending else None,
            cost=priced.points.get((p.disk, p.name)),
        ))
    return Catalog(block_size=bs, disks=disks, lineages=lineages, points=statuses,
                   disk_bytes=priced.disks, histories=histories,
                   has_store=repo.config.store is not None)
