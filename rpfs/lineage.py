"""Chain algebra: which blocks two chains of (lineage, gen) can differ in, and from that
the changed and allocated areas of points (VMware's QueryChangedDiskAreas and
QueryAllocatedBlocks), as byte extents in the `[{"start", "length"}]` shape that
`capture --changed` reads.

A chain (`Index.chain`) lists the (lineage, gen) pairs a read consults, newest first; a
block reads as its newest extent at or before the gen of the first lineage that has one,
and as zeros past the last. `can_differ` is the one answer to "which blocks can two chains
read differently": `changed` and rollback (`LiveDisk._changed_since`) resolve only its
candidates, and `allocated`, the difference from the empty chain, decides from the same
scan; each costs a scan of the extents where the chains part, not a resolution of every
block of the disk.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from .errors import RpfsError
from .index import ZERO, Index, PointRecord, PointState
from .names import parse_point_ref
from .repo import Repository

Chain = list[tuple[int, int]]


def can_differ(index: Index, txn: lmdb.Transaction, chain_a: Chain, chain_b: Chain) -> set[int]:
    """Blocks that may read differently through two chains (every block that does, and
    perhaps some that do not), from their extents alone.

    Past the tail the chains share, a block can differ only if it has an extent that one
    chain sees and the other does not: at or before its gen in a lineage only one chain
    reads, or, where both read one lineage to different gens, between those gens. Any
    other block finds the same extent (or none) through both chains.
    """
    a, b = list(chain_a), list(chain_b)
    while a and b and a[-1] == b[-1]:
        a.pop()
        b.pop()
    ranges = []  # (lineage, gen excluded, gen included)
    if a and b and a[-1][0] == b[-1][0]:  # paths up one tree of lineages meet only here
        (lineage, gen_a), (_, gen_b) = a.pop(), b.pop()
        ranges.append((lineage, min(gen_a, gen_b), max(gen_a, gen_b)))
    ranges += [(lineage, -1, gen) for lineage, gen in a + b]  # gen 0 extents count
    return {
        block
        for lineage, low, high in ranges
        for block, gen, _ in index.iter_extents(txn, lineage)
        if low < gen <= high
    }


def share_history(chain_a: Chain, chain_b: Chain) -> bool:
    """Whether two chains read one lineage somewhere: then one descends from a capture,
    clone or rollback the other does too, and `changed` between them means something."""
    return bool({lin for lin, _ in chain_a} & {lin for lin, _ in chain_b})


def reads_differ(
    index: Index, txn: lmdb.Transaction, chain_a: Chain, chain_b: Chain, block: int
) -> bool:
    """Does `block` read differently through the two chains? (Two resolutions.)"""
    return index.resolve(txn, chain_a, block) != index.resolve(txn, chain_b, block)


def changed(index: Index, txn: lmdb.Transaction, chain_a: Chain, chain_b: Chain) -> list[int]:
    """Sorted blocks whose content differs between two chains: the candidates of
    `can_differ`, each resolved both ways."""
    return sorted(
        block for block in can_differ(index, txn, chain_a, chain_b)
        if reads_differ(index, txn, chain_a, chain_b, block)
    )


def allocated(index: Index, txn: lmdb.Transaction, chain: Chain) -> list[int]:
    """Sorted blocks that hold data through a chain.

    These are the blocks that differ from the empty chain (through which every block reads
    as zeros), but resolving `can_differ`'s candidates costs a seek per allocated block on
    top of the scan. The scan alone decides: a lineage lists a block's extents newest gen
    first, so the first one at or before the chain's gen for that lineage, in the first
    lineage of the chain that has one, is what the block reads; an extent above the gen
    does not count and a ZERO extent hides older data. (Measured on 1 GiB of 4 KiB
    blocks, all written: 0.19 s, against 0.49 s for candidates and their resolution.)
    """
    return sorted(reads(index, txn, chain))


def reads(index: Index, txn: lmdb.Transaction, chain: Chain) -> dict[int, bytes]:
    """What each block that holds data reads through a chain (its chunk's digest), by
    the scan `allocated` describes."""
    return {block: value for block, _, value in _deciding(index, txn, chain) if value != ZERO}


def layers(index: Index, txn: lmdb.Transaction, chain: Chain) -> dict[int, tuple[int, bool]]:
    """Where each block a chain has an extent for comes from: (depth, holds data), depth
    1 for the chain's first lineage, 2 for the next (an origin), and so on; a block not
    listed reads as zeros from no layer. What an NBD export's `base:allocation` and
    `qemu:allocation-depth` report."""
    return {block: (depth, value != ZERO) for block, depth, value in _deciding(index, txn, chain)}


def _deciding(
    index: Index, txn: lmdb.Transaction, chain: Chain
) -> Iterator[tuple[int, int, bytes]]:
    """(block, depth, value) of the extent each block reads through a chain, by the scan
    `allocated` describes: depth 1 is the chain's first lineage."""
    decided: set[int] = set()
    for depth, (lineage, gen) in enumerate(chain, start=1):
        for block, written, value in index.iter_extents(txn, lineage):
            if written <= gen and block not in decided:
                decided.add(block)
                yield block, depth, value


def allocated_at(index: Index, txn: lmdb.Transaction, lineage: int, gen: int) -> int:
    """How many blocks hold data at (lineage, gen): the figure of the point there, the
    base a new point's figure starts from; counted from the extents if that point was
    deleted (a scan of the chain's extents, as `allocated` does)."""
    point = index.point_at(txn, lineage, gen)
    if point is not None:
        return point.allocated_blocks
    return len(allocated(index, txn, index.chain(txn, lineage, gen)))


def byte_extents(blocks: list[int], block_size: int, size: int) -> list[dict]:
    """Merge sorted block numbers into byte extents clipped to the disk size."""
    out: list[dict] = []
    for b in blocks:
        start = b * block_size
        length = min(block_size, size - start)
        if out and out[-1]["start"] + out[-1]["length"] == start:
            out[-1]["length"] += length
        else:
            out.append({"start": start, "length": length})
    return out


def complete_point(index: Index, txn: lmdb.Transaction, ref: str) -> PointRecord:
    """The point DISK@POINT names; an error if there is none or it is still archiving
    (its frozen blocks are not all in the index yet)."""
    disk, name = parse_point_ref(ref)
    point = index.point_named(txn, disk, name)
    if point.state != PointState.COMPLETE:
        raise RpfsError(f"point {ref} is still being archived; try again when it is complete")
    return point


def allocated_extents(repo: Repository, ref: str) -> list[dict]:
    """Byte extents of a point that hold data (every non-zero block, no zero one)."""
    index = repo.index
    with index.read() as txn:
        point = complete_point(index, txn, ref)
        blocks = allocated(index, txn, index.chain(txn, point.lineage, point.gen))
    return byte_extents(blocks, repo.block_size, point.size)


def changed_extents(repo: Repository, ref_a: str, ref_b: str) -> list[dict]:
    """Byte extents whose content differs between two points of one disk history."""
    index = repo.index
    with index.read() as txn:
        a, b = complete_point(index, txn, ref_a), complete_point(index, txn, ref_b)
        chain_a = index.chain(txn, a.lineage, a.gen)
        chain_b = index.chain(txn, b.lineage, b.gen)
        if a.size != b.size or not share_history(chain_a, chain_b):
            raise RpfsError(
                f"{ref_a} and {ref_b} do not share a history (one must descend from a "
                "common capture, clone or rollback)"
            )
        blocks = changed(index, txn, chain_a, chain_b)
    return byte_extents(blocks, repo.block_size, a.size)
