"""`rpfs info`: the repository's totals, from the index's accounting and the pack sizes.

Nothing is scanned but the small records (disks, points, trash, per-pack stats) and the
list of packs: the live bytes are `packstats`' running sums, kept in the transactions
that change references, so the figures cost the same in a large repository as in a
small one. `rpfs check` recounts them from scratch.
"""

from __future__ import annotations

from .. import upload
from ..fence import STORE_RETIRED
from ..repo import Repository


def summary(repo: Repository) -> dict:
    """The repository's figures (bytes unless named otherwise).

    logical_bytes: the size of every point (what reading them all would return);
    allocated_bytes: of that, the blocks that hold data; stored_bytes: the pack records
    some point, trash entry or disk still references (after dedup and compression);
    pack_bytes: the pack files' sizes; dead_bytes: the difference, which GC frees;
    dedup_ratio: allocated bytes per distinct referenced block; compression_ratio:
    distinct referenced blocks' bytes per stored byte. With a store, also: store_packs,
    store_bytes (the objects in the bucket, a LIST of it, with the retired packs whose
    objects wait for the reader grace: store_retired_packs), pending_packs, pending_bytes
    (not uploaded yet), cache_bytes (the local read cache).
    """
    index, bs = repo.index, repo.block_size
    with index.read() as txn:
        disks = index.list_disks(txn)
        points = index.list_points(txn)
        trash = index.list_trash(txn)
        stats = index.pack_stats(txn)
    sizes = repo.store.sizes()
    pack_bytes = sum(sizes.values())
    stored = sum(s.live_bytes for s in stats.values())
    distinct = sum(s.live_chunks for s in stats.values()) * bs
    allocated = sum(p.allocated_blocks for p in points) * bs
    out = {
        "disks": len(disks),
        "writable_disks": sum(d.writable for d in disks),
        "points": len(points),
        "trash_points": len(trash),
        "packs": len(sizes),
        "logical_bytes": sum(p.size for p in points),
        "allocated_bytes": allocated,
        "stored_bytes": stored,
        "pack_bytes": pack_bytes,
        "dead_bytes": max(pack_bytes - stored, 0),
        "dedup_ratio": round(allocated / distinct, 3) if distinct else None,
        "compression_ratio": round(distinct / stored, 3) if stored else None,
        "local_bytes": sum(_allocated_on_disk(repo, d.file) for d in disks if d.writable),
    }
    tiered = upload.backend(repo)
    if tiered is not None:
        stored = tiered.stored_sizes()
        waiting = upload.pending(repo)
        with index.read() as txn:
            retired = index.get_note(txn, STORE_RETIRED) or []
        out.update(store_packs=len(stored), store_bytes=sum(stored.values()),
                   store_retired_packs=len(retired), pending_packs=len(waiting),
                   pending_bytes=sum(waiting.values()), cache_bytes=tiered.cache.used)
    return out


def _allocated_on_disk(repo: Repository, file: str) -> int:
    """The bytes a writable disk's sparse local file takes on the filesystem."""
    try:
        return (repo.root / file).stat().st_blocks * 512
    except FileNotFoundError:
        return 0  # `rpfs check` reports a missing local file
