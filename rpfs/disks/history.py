"""A disk's history as a reader sees it: the point it was cloned from and the point it
was last rolled back to (and whether each is still there), and its points drawn as lines,
each rollback's line starting under the point it went back to and the disk's current
line ending at "now".

Its own room because `rpfs disks` (through the disk service, perhaps the daemon's) and
`rpfs points --tree` (through the catalog) must name a disk's origins alike, and because
the index keeps history as lineages, which no reader should need to know about.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import lmdb

from ..index import DiskRecord, Index, LineageRecord, PointRecord
from ..names import parse_point_ref


@dataclass(frozen=True)
class Link:
    """A point a disk's content started from, and whether it is still there."""

    ref: str  # DISK@POINT
    deleted: bool = False  # in the trash or purged, or its disk deleted
    disk_deleted: bool = False  # its disk deleted (with --force: the clone was detached)


@dataclass(frozen=True)
class Origins:
    """Where a disk's content came from: a clone's source (kept through rollbacks) and
    the point of the disk's own that it was last rolled back to."""

    cloned_from: Link | None = None
    rolled_back_to: Link | None = None

    def as_json(self) -> dict:
        """The fields `rpfs disks --json` adds for them."""
        c, r = self.cloned_from, self.rolled_back_to
        return {
            "cloned_from": c and c.ref,
            "cloned_from_deleted": bool(c and c.deleted),
            "cloned_from_disk_deleted": bool(c and c.disk_deleted),
            "rolled_back_to": r and r.ref,
            "rolled_back_to_deleted": bool(r and r.deleted),
        }


def _link(index: Index, txn: lmdb.Transaction, ref: str, at: tuple[int, int] | None) -> Link:
    """`ref` as it stands now. `at`, which point it was (lineage, gen), tells a point
    made later under a deleted one's name from it; records without it go by name."""
    disk, name = parse_point_ref(ref)
    if index.get_disk(txn, disk) is None:
        return Link(ref, deleted=True, disk_deleted=True)
    point = index.get_point(txn, disk, name)
    there = point is not None and (at is None or (point.lineage, point.gen) == at)
    return Link(ref, deleted=not there)


def origins(index: Index, txn: lmdb.Transaction, disk: DiskRecord) -> Origins:
    """The clone source and rollback target of `disk`.

    A rollback's target is always a point of the disk itself and a clone's source one of
    another disk, so `origin` tells which it is. A record written before `cloned_from`
    existed lost its clone source at its first rollback; its first lineage still names
    that point while the disk reads through it (until it is fully hydrated).
    """
    rolled = None
    if disk.origin is not None and parse_point_ref(disk.origin)[0] == disk.name:
        rolled = _link(index, txn, disk.origin, disk.origin_at)
    if disk.cloned_from is not None:
        cloned = _link(index, txn, disk.cloned_from, disk.cloned_at)
    elif disk.origin is not None and rolled is None:
        cloned = _link(index, txn, disk.origin, disk.origin_at)
    else:
        cloned = _first_origin(index, txn, disk) if rolled is not None else None
    return Origins(cloned, rolled)


def _first_origin(index: Index, txn: lmdb.Transaction, disk: DiskRecord) -> Link | None:
    """The point of another disk that the lineages of `disk` read through, if any."""
    lineage = index.get_lineage(txn, disk.lineage)
    while lineage is not None and lineage.parent is not None:
        parent = index.get_lineage(txn, lineage.parent)
        if parent is not None and disk.name in parent.disks:
            lineage = parent
            continue
        at = (lineage.parent, lineage.parent_gen)
        point = index.point_at(txn, *at)
        if point is not None:
            return Link(point.ref)
        for entry in index.list_trash(txn):
            if (entry.point.lineage, entry.point.gen) == at:
                return Link(entry.point.ref, deleted=True)
        return None
    return None


@dataclass
class Step:
    """A point on a line of history, and the lines that rollbacks to it started."""

    name: str  # "" for a deleted point whose name is no longer known (purged)
    point: PointRecord | None  # None: deleted, shown because a line starts from it
    branches: list[Line] = field(default_factory=list)


@dataclass
class Line:
    """Points taken one after the other, oldest first: the disk's first line (from its
    creation, capture or clone) or one a rollback started."""

    steps: list[Step]
    now: bool  # the disk's current line: after its last point comes the disk as it is


def lines(
    index: Index, txn: lmdb.Transaction, disk: DiskRecord, lineages: Iterable[LineageRecord]
) -> list[Line]:
    """The lines of `disk`'s history: its first line, with every rollback's line under
    the point it went back to. A rollback's line that no longer records its start (a
    disk fully hydrated after it no longer reads that point, and rolled back again since)
    comes after the first line on its own.

    Points in the trash are left out (`rpfs trash` lists them), except one that a line
    starts from: without it, the reader would not see where that line begins.
    """
    mine = {lin.id: lin for lin in lineages if disk.name in lin.disks}
    starts = {lin.id: (lin.parent, lin.parent_gen) for lin in mine.values()
              if lin.parent in mine}
    own = index.list_points(txn, disk.name)
    rolled = disk.origin is not None and parse_point_ref(disk.origin)[0] == disk.name
    if rolled and disk.lineage in mine and disk.lineage not in starts:
        # Hydrated since its rollback, the current line no longer reads its start: the
        # record still names it (by name alone if it was written before `origin_at`).
        at = disk.origin_at or next(((p.lineage, p.gen) for p in own if p.ref == disk.origin),
                                    None)
        if at is not None and at[0] in mine and at[0] != disk.lineage:
            starts[disk.lineage] = at
    names = {(e.point.lineage, e.point.gen): e.point.name for e in index.list_trash(txn, disk.name)}
    if rolled and disk.origin_at is not None:
        names.setdefault(disk.origin_at, parse_point_ref(disk.origin)[1])
    branches: dict[tuple[int, int], list[int]] = {}
    for lin, at in sorted(starts.items()):
        branches.setdefault(at, []).append(lin)

    def line(lin: int) -> Line:
        points = {p.gen: p for p in own if p.lineage == lin}  # each point has its own gen
        steps = []
        for gen in sorted(set(points) | {gen for (of, gen) in branches if of == lin}):
            point = points.get(gen)
            steps.append(Step(point.name if point else names.get((lin, gen), ""), point,
                              [line(child) for child in branches.get((lin, gen), [])]))
        return Line(steps, now=disk.writable and lin == disk.lineage)

    return [line(lin) for lin in sorted(mine) if lin not in starts]


@dataclass(frozen=True)
class History:
    """What `rpfs points --tree` draws of one disk."""

    origins: Origins
    lines: list[Line]


def history(
    index: Index, txn: lmdb.Transaction, disk: DiskRecord, lineages: Iterable[LineageRecord]
) -> History:
    """The origins and lines of `disk`, read in `txn` (`lineages`: all of the index's)."""
    return History(origins(index, txn, disk), lines(index, txn, disk, lineages))
