"""The sending side of replication: what a repository offers (its catalog), which point
a stream is relative to (its base), and the stream of one point. Reads only.

A point's stream holds its extent map relative to the base (the blocks whose content
differs, by `lineage.changed`; every block that holds data for a full stream) and the
chunk records the receiver needs, as stored in the packs. Which chunks those are, the
receiver says (`wanted`): it deduplicates against its whole repository. A stream file has
no receiver to ask, so it carries every chunk of the map the base does not read.

Only chunks the map just sent names are ever sent: a receiver cannot ask for any other
chunk of the repository (openzfs#14153: a forged resume token made a sender send data
the stream was not about).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import ChunkError, RpfsError
from ..index import ZERO, PointRecord, PointState
from ..lineage import changed, complete_point, reads, share_history
from ..progress import ProgressFn
from ..repo import CODEC, HASH, Repository
from .stream import (
    CHUNK,
    EXTENTS,
    EXTENTS_PER_RECORD,
    HEADER,
    MAP_END,
    META,
    VERSION,
    StreamError,
    Writer,
    encode_extents,
    identity,
)

log = logging.getLogger(__name__)

READ_BATCH = 256  # chunk records read with one get_many (adjacent ones in one read)


def repository_id(repo: Repository) -> str:
    """This repository's id, which every stream names as its source."""
    if repo.index.repository_id is None:  # only an index no writable open has seen yet
        raise RpfsError(f"{repo.root} has no repository id yet (it was made by an older "
                        f"rpfs): run 'rpfs -r {repo.root} info' once there, then again")
    return repo.index.repository_id


def catalog(repo: Repository, disks: list[str]) -> dict:
    """What the repository offers: each disk (all, or those named) with its points,
    oldest first, each with its identity and marks."""
    index = repo.index
    source = repository_id(repo)
    with index.read() as txn:
        records = [index.disk_named(txn, name) for name in disks] or index.list_disks(txn)
        out = []
        for disk in records:
            points = sorted(index.list_points(txn, disk.name), key=lambda p: p.created)
            out.append({
                "name": disk.name, "size": disk.size,
                "points": [{
                    "name": p.name, "identity": identity(source, p), "created": p.created,
                    "complete": p.state == PointState.COMPLETE, "lineage": p.lineage,
                    "gen": p.gen, "hold": p.hold, "description": p.description,
                } for p in points],
            })
    return {"repository": source, "block_size": repo.block_size, "disks": out}


def choose_base(index, txn, point: PointRecord, held: list[PointRecord]) -> PointRecord | None:
    """The point of `held` (what the receiver has of this disk) the stream of `point` is
    cheapest relative to: the nearest older generation of its own lineage, else the
    nearest newer one (backfill), else any that shares its history; None: a full stream."""
    same = [p for p in held if p.lineage == point.lineage and p.gen != point.gen]
    older = [p for p in same if p.gen < point.gen]
    if older:
        return max(older, key=lambda p: p.gen)
    if same:
        return min(same, key=lambda p: p.gen)
    chain = index.chain(txn, point.lineage, point.gen)
    for p in held:
        if share_history(chain, index.chain(txn, p.lineage, p.gen)):
            return p
    return None


def send_point(
    repo: Repository, out: Writer, ref: str, base_ref: str | None,
    wanted: Callable[[list[bytes]], list[bytes]] | None = None,
    progress: ProgressFn | None = None, announce: Callable[[int], None] | None = None,
) -> dict:
    """Write the stream of point `ref` relative to `base_ref` (None: full) to `out`.
    `wanted`: asks the receiver which of the map's chunks it lacks (a session); without
    it, every chunk the base does not read goes. `announce`: told the bytes of chunk
    records about to follow (the receiver's progress). Returns {point, base, extents, chunks,
    chunk_bytes}."""
    index = repo.index
    source = repository_id(repo)
    with index.read() as txn:
        point = complete_point(index, txn, ref)
        chain = index.chain(txn, point.lineage, point.gen)
        base = None
        if base_ref is not None:
            base = complete_point(index, txn, base_ref)
            base_chain = index.chain(txn, base.lineage, base.gen)
            if base.size != point.size or not share_history(base_chain, chain):
                raise RpfsError(f"{base.ref} is not of the history of {point.ref}: a stream "
                                "is relative to an earlier (or later) point of its disk")
            delta = {b: index.resolve(txn, chain, b)
                     for b in changed(index, txn, base_chain, chain)}
        else:
            base_chain = []
            delta = reads(index, txn, chain)
        if wanted is None:  # a stream file: the receiver holds what the base reads
            known = set(reads(index, txn, base_chain).values()) if base_chain else set()
    out.json(HEADER, {
        "format": "rpfs-stream", "version": VERSION, "repository": source,
        "block_size": repo.block_size, "hash": HASH, "codec": CODEC, "disk": point.disk,
        "size": point.size, "point": identity(source, point),
        "base": None if base is None else identity(source, base),
        "base_name": None if base is None else base.name,
    })
    out.json(META, {"name": point.name, "created": point.created,
                    "description": point.description, "hold": point.hold,
                    "expires": point.expires})
    blocks = sorted(delta)
    for i in range(0, len(blocks), EXTENTS_PER_RECORD):
        out.record(EXTENTS, encode_extents((b, delta[b]) for b in blocks[i:i + EXTENTS_PER_RECORD]))
    out.record(MAP_END)
    named = {value for value in delta.values() if value != ZERO}
    if wanted is None:
        send = sorted(named - known)
    else:
        send = wanted(sorted(named))
        if not set(send) <= named:  # the receiver asked beyond the map: refuse it all
            raise StreamError("the receiver asked for chunks the map it was sent does not "
                              "name; nothing more is sent")
    sent = _send_chunks(repo, out, send, progress, announce)
    log.info("disk %s: point %s sent (%s), %d blocks in its map, %d chunks (%d bytes)",
             point.disk, point.name, "full" if base is None else f"from {base.name}",
             len(delta), len(send), sent)
    return {"point": point.ref, "base": None if base is None else base.ref,
            "extents": len(delta), "chunks": len(send), "chunk_bytes": sent}


def _send_chunks(repo: Repository, out: Writer, digests: list[bytes],
                 progress: ProgressFn | None,
                 announce: Callable[[int], None] | None) -> int:
    """Write the records of `digests` as stored, read in pack order; their bytes."""
    index = repo.index
    with index.read() as txn:
        locs = []
        for value in digests:
            loc = index.get_chunk(txn, value)
            if loc is None:
                raise RpfsError(f"chunk {value.hex()[:16]} is not in the source repository "
                                "(a purge or gc ran meanwhile?); run the transfer again")
            locs.append((loc, value))
    locs.sort(key=lambda item: (item[0].pack, item[0].offset))
    total = sum(loc.length for loc, _ in locs)
    if announce is not None:
        announce(total)
    done = 0
    for i in range(0, len(locs), READ_BATCH):
        batch = locs[i:i + READ_BATCH]
        for (_, value), record in zip(
                batch, repo.store.get_many(batch, repo.locate, raw=True), strict=True):
            if isinstance(record, ChunkError):
                raise RpfsError(f"cannot send chunk {value.hex()[:16]}: {record}; run "
                                "'rpfs verify' on the source") from None
            out.record(CHUNK, record)
            done += len(record)
        if progress is not None:
            progress(done, total)
    return done
