"""Purge: what dropping one reader of a lineage frees in the index.

An extent (block b, generation h) of a lineage is read by every reader of that lineage
whose generation lies in [h, the next generation that rewrote b). The readers of a
lineage are its points (complete, archiving or in the trash), the lineages that branch
from it (clones and rollbacks read it at their `parent_gen`) and, if it is a disk's
current lineage, that disk's head, at MAX_GEN (a writable disk's ABSENT blocks, the base
of a captured disk's next incremental capture). When a reader at generation g goes, the
only extents that can become unread are those with h in (the next surviving reader below
g, g]: one with h lower is read by that reader whenever g read it. Of those, an extent
stays if the next surviving reader above g still reads it (b not rewritten by then).
So a purge costs a scan of the extents written in that range (`Index.iter_gens`) and one
seek each, not a pass over the disk. A lineage left with no reader at all goes whole,
and its own reader of its origin with it.

Everything here runs in the caller's write transaction: one purge is one commit, so a
crash leaves the point either fully present or fully gone, with exact refcounts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import lmdb

from ..index import MAX_GEN, Index, LineageRecord, PointRecord

log = logging.getLogger(__name__)


@dataclass
class Released:
    """What a purge dropped from the index."""

    extents: int = 0
    lineages: int = 0


@dataclass
class Doomed:
    """What dropping one reader would drop, found without changing the index: the
    extents of lineages that keep other readers, and the lineages that go whole."""

    extents: list[tuple[int, int, int]] = field(default_factory=list)  # lineage, block, gen
    lineages: list[int] = field(default_factory=list)

    def decrements(self, index: Index, txn: lmdb.Transaction) -> Counter[bytes]:
        """How many references each chunk would lose: one per dropped extent naming it
        (two extents of one chunk, two references)."""
        out: Counter[bytes] = Counter()
        for lineage, block, gen in self.extents:
            value = index.lookup(txn, lineage, block, gen)
            if value:  # the extent itself (ZERO holds no reference)
                out[value] += 1
        for lineage in self.lineages:
            out.update(value for _, _, value in index.iter_extents(txn, lineage) if value)
        return out


def reader_gens(
    index: Index, txn: lmdb.Transaction, lineage: LineageRecord,
    gone: PointRecord | None = None, gone_lineages: Collection[int] = (),
) -> list[int]:
    """The generations at which something still reads `lineage`, ascending, not counting
    the point `gone` nor lineages in `gone_lineages` (a purge being planned)."""
    gens: set[int] = set()
    for disk in lineage.disks:
        gens.update(p.gen for p in index.list_points(txn, disk)
                    if p.lineage == lineage.id and p != gone)
        gens.update(t.point.gen for t in index.list_trash(txn, disk)
                    if t.point.lineage == lineage.id and t.point != gone)
        record = index.get_disk(txn, disk)
        if record is not None and record.lineage == lineage.id:
            gens.add(MAX_GEN)
    gens.update(lin.parent_gen for lin in index.list_lineages(txn)
                if lin.parent == lineage.id and lin.id not in gone_lineages)
    return sorted(gens)


def doomed(
    index: Index, txn: lmdb.Transaction, lineage: int, gen: int,
    gone: PointRecord | None = None,
) -> Doomed:
    """What no surviving reader would read once the reader of `lineage` at `gen` is gone:
    the caller removed it in `txn`, or names it as `gone` (a point still in the index,
    whose purge is being priced). Reads only."""
    out = Doomed()
    while True:
        record = index.get_lineage(txn, lineage)
        if record is None:
            return out
        gens = reader_gens(index, txn, record, gone, out.lineages)
        if not gens:  # nothing reads it any more: all of it goes, and its read of its origin
            out.lineages.append(lineage)
            if record.parent is None:
                return out
            lineage, gen = record.parent, record.parent_gen
            continue
        if gen in gens:
            return out
        below = max((g for g in gens if g < gen), default=-1)  # gen-0 extents count
        above = min((g for g in gens if g > gen), default=None)
        out.extents += [
            (lineage, block, written)
            for block, written in index.iter_gens(txn, lineage, below + 1, gen)
            if above is None or _rewritten_by(index, txn, lineage, block, written, above)
        ]
        return out


def release(index: Index, txn: lmdb.Transaction, lineage: int, gen: int) -> Released:
    """A reader of `lineage` at `gen` is gone (the caller removed it in `txn`): drop the
    extents no surviving reader reads, releasing their chunks' references."""
    plan = doomed(index, txn, lineage, gen)
    for lin, block, written in plan.extents:
        index.drop_extent(txn, lin, block, written)
    out = Released(extents=len(plan.extents), lineages=len(plan.lineages))
    for lin in plan.lineages:
        out.extents += index.delete_lineage(txn, lin)
        log.info("lineage %d: no reader left, dropped", lin)
    return out


def truncate(index: Index, txn: lmdb.Transaction, lineage: LineageRecord, gen: int) -> set[int]:
    """Undo a lineage's generations from `gen` on, which nothing may read any more (a
    snapshot that never finished archiving, points whose data was lost): their extents
    go, releasing their chunks, and the head is `gen` - 1 again, so the next point takes
    `gen` anew. Returns the blocks those extents were of."""
    blocks = index.drop_extents_since(txn, lineage.id, gen)
    lineage.head_gen = gen - 1
    index.put_lineage(txn, lineage)
    return blocks


def _rewritten_by(
    index: Index, txn: lmdb.Transaction, lineage: int, block: int, gen: int, reader: int
) -> bool:
    """Whether `reader` (a generation above `gen`) no longer reads this extent."""
    newer = index.next_rewrite(txn, lineage, block, gen)
    return newer is not None and newer <= reader


def refcount_errors(index: Index) -> list[str]:
    """Every way the stored references differ from a recount of the extents (empty when
    they are exact): a chunk whose refcount is not the number of extents naming it, an
    extent naming a chunk that is not stored, an extent missing from `gens` or the
    reverse, a pack whose accounted named or live records differ from a count of
    `chunks`, a chunk with refcount 0 missing from `zero` (GC would never free it) or the
    reverse. Staging rows hold no reference (a capture takes them at publish)."""
    with index.read() as txn:
        counts, problems = index.recount(txn)
        stored = {digest: loc.refcount for digest, loc in index.iter_chunks(txn)}
        kept, recounted = index.pack_stats(txn), index.count_packs(txn, index.db["chunks"])
        zero = {digest for digest, _ in index.zero_chunks(txn)}
    problems += [f"extents name chunk {d.hex()[:16]}, which is not stored"
                 for d in counts if d not in stored]
    problems += [f"chunk {d.hex()[:16]}: refcount {n}, named by {counts.get(d, 0)} extents"
                 for d, n in stored.items() if n != counts.get(d, 0)]
    problems += [f"pack {pack}: accounted {kept.get(pack)}, recounted {recounted.get(pack)}"
                 for pack in sorted(kept.keys() | recounted.keys())
                 if kept.get(pack) != recounted.get(pack)]
    unreferenced = {d for d, n in stored.items() if not n}
    problems += [f"chunk {d.hex()[:16]}: refcount 0 but not listed in zero"
                 for d in sorted(unreferenced - zero)]
    problems += [f"chunk {d.hex()[:16]}: listed in zero but referenced or not stored"
                 for d in sorted(zero - unreferenced)]
    return problems
