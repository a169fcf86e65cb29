"""Changed and allocated areas of points, as byte extents (VMware's QueryChangedDiskAreas
and QueryAllocatedBlocks), in the `[{"start", "length"}]` shape `capture --changed` reads."""

from __future__ import annotations

from .errors import RpfsError
from .index import ZERO, Index, PointRecord
from .names import parse_point_ref


def _extents(blocks: list[int], block_size: int, size: int) -> list[dict]:
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


def _point(index: Index, txn, ref: str) -> PointRecord:
    disk, name = parse_point_ref(ref)
    point = index.get_point(txn, disk, name)
    if point is None:
        raise RpfsError(f"no point {ref}; 'rpfs points' lists them")
    if point.state != "complete":
        raise RpfsError(f"point {ref} is still being archived; try again when it is complete")
    return point


def allocated(index: Index, ref: str, block_size: int) -> list[dict]:
    """Extents of the point that hold data (every non-zero block, no zero one)."""
    with index.read() as txn:
        point = _point(index, txn, ref)
        chain = index.chain(txn, point.lineage, point.gen)
        nblocks = -(-point.size // block_size)
        blocks = [b for b in range(nblocks) if index.resolve(txn, chain, b) != ZERO]
    return _extents(blocks, block_size, point.size)


def changed(index: Index, ref_a: str, ref_b: str, block_size: int) -> list[dict]:
    """Extents whose content differs between two points of one disk history."""
    with index.read() as txn:
        a, b = _point(index, txn, ref_a), _point(index, txn, ref_b)
        chain_a = index.chain(txn, a.lineage, a.gen)
        chain_b = index.chain(txn, b.lineage, b.gen)
        if a.size != b.size or not {lin for lin, _ in chain_a} & {lin for lin, _ in chain_b}:
            raise RpfsError(
                f"{ref_a} and {ref_b} do not share a history (one must descend from a "
                "common capture, clone or rollback)"
            )
        nblocks = -(-a.size // block_size)
        blocks = [
            blk for blk in range(nblocks)
            if index.resolve(txn, chain_a, blk) != index.resolve(txn, chain_b, blk)
        ]
    return _extents(blocks, block_size, a.size)
