"""Storage cost: what a point holds alone and what it shares (the seeds' "the sum of all
blocks that extend across all recovery points").

A point's `owned` bytes are what purging it alone would free now: the record lengths of
the chunks whose refcount would reach 0. It is priced by planning that purge
(`purge.doomed`, the same survivor rule and the same scan) without changing the index,
so the figure is exact: purge the point and the repository's live stored bytes
(`Index.live_stored_bytes`) drop by exactly that. Its `shared` bytes are those of the
other chunks it reads.

What each point reads is found once per lineage, not once per point: a disk's oldest
listed point of a lineage by a scan of its chain's extents (`lineage.reads`), each newer one
from the one before by the extents written between them (`Index.iter_gens`). So pricing
every point costs a scan of each lineage plus what each purge would scan.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import lmdb

from ..index import Index, PointRecord
from ..lineage import reads
from .purge import doomed


@dataclass(frozen=True)
class PointCost:
    """A point's stored bytes, split by who else holds them."""

    owned_bytes: int  # freed by purging this point alone
    shared_bytes: int  # of the chunks it reads that stay referenced after that purge
    pending_bytes: int = 0  # of the chunks it reads, those in packs not in the store yet


@dataclass
class Costs:
    """The cost of some points, and of each of their disks."""

    points: dict[tuple[str, str], PointCost] = field(default_factory=dict)  # (disk, name)
    disks: dict[str, int] = field(default_factory=dict)  # stored bytes of its points, deduped


def owned_chunks(index: Index, txn: lmdb.Transaction, point: PointRecord) -> set[bytes]:
    """The chunks whose last reference purging `point` would drop (it may be listed or
    in the trash). Costs what that purge would scan; changes nothing."""
    plan = doomed(index, txn, point.lineage, point.gen, gone=point)
    out = set()
    for digest, n in plan.decrements(index, txn).items():
        loc = index.get_chunk(txn, digest)
        if loc is not None and loc.refcount <= n:
            out.add(digest)
    return out


def costs(index: Index, txn: lmdb.Transaction, points: list[PointRecord],
          stored: set[int] | None = None) -> Costs:
    """Owned and shared bytes of each of `points`, and each disk's total over them; with
    `stored` (the packs in the object store), each point's bytes not in the store yet."""
    lengths: dict[bytes, tuple[int, int]] = {}  # chunk -> (record length, of it pending)

    def sizes(digest: bytes) -> tuple[int, int]:
        if digest not in lengths:
            loc = index.get_chunk(txn, digest)
            n = 0 if loc is None else loc.length
            lengths[digest] = (n, n if stored is not None and loc is not None
                               and loc.pack not in stored else 0)
        return lengths[digest]

    def length(digest: bytes) -> int:
        return sizes(digest)[0]

    def pending(digest: bytes) -> int:
        return sizes(digest)[1]

    out = Costs()
    per_disk: dict[str, set[bytes]] = {}
    groups: dict[tuple[str, int], list[PointRecord]] = {}
    for p in points:
        groups.setdefault((p.disk, p.lineage), []).append(p)
    for (disk, lineage), mine in groups.items():
        mine.sort(key=lambda p: p.gen)
        data = reads(index, txn, index.chain(txn, lineage, mine[0].gen))
        held = Counter(data.values())  # chunk -> blocks reading it, at the current gen
        held_bytes = sum(length(d) for d in held)
        held_pending = sum(pending(d) for d in held)
        seen = per_disk.setdefault(disk, set())
        seen.update(held)
        at = mine[0].gen
        for p in mine:
            added = set()  # a chunk counts for the disk if a point, not a purged one, reads it
            for block, gen in index.iter_gens(txn, lineage, at + 1, p.gen):
                old = data.pop(block, None)
                if old is not None:
                    held[old] -= 1
                    if not held[old]:
                        del held[old]
                        held_bytes -= length(old)
                        held_pending -= pending(old)
                value = index.lookup(txn, lineage, block, gen)
                if value:
                    data[block] = value
                    held[value] += 1
                    if held[value] == 1:
                        held_bytes += length(value)
                        held_pending += pending(value)
                        added.add(value)
            seen.update(d for d in added if d in held)
            at = p.gen
            owned = sum(length(d) for d in owned_chunks(index, txn, p))
            out.points[(p.disk, p.name)] = PointCost(owned, held_bytes - owned, held_pending)
    out.disks = {disk: sum(length(d) for d in seen) for disk, seen in per_disk.items()}
    return out
