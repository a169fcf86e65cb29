"""`rpfs verify`: read stored chunks back and check them (record header, decode, BLAKE3).

Rolling: without points named, a run takes the packs verified longest ago (never
verified first, and first of all the chunks a read already found corrupt, `suspect/`),
reads every chunk the index names in each, records per pack when and with what result
(`verified`), and stops between packs once `max_duration` is spent, so the next run
goes on where this one stopped. With points named it verifies exactly the chunks they
read, and records no pack as verified (it did not read them whole).

A chunk that cannot be read now (an object store that is down) is no verdict: it is not
counted as verified, its pack is not recorded as verified (the next run takes it again),
and the report counts it (`unreadable`): "sound" says no chunk is bad, not that all were
read.

A chunk that fails is marked bad (`bad`). Nothing is rewritten: a read of it stays EIO,
and since a bad chunk is never deduplicated against (ingest.examine), the next capture
or snapshot that meets the same content stores a good copy, which `Ingest.register`
puts in its place: the chunk is healed, for every point that reads it. The report names
every point (also in the trash) and byte range that reads each bad chunk.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable

from ..errors import ChunkError, CorruptChunk
from ..index import ChunkLoc, Index, PointRecord
from ..lifecycle.clock import now
from ..names import ceil_div, parse_point_ref
from ..progress import ProgressFn
from ..repo import Repository
from ..store.packs import PackGone

log = logging.getLogger(__name__)

BATCH = 64  # chunks read in one get_many (coalesced into runs of adjacent records)


def verify(repo: Repository, points: list[str] | None = None,
           max_duration: float | None = None, progress: ProgressFn | None = None) -> dict:
    """Verify the repository (or the chunks `points` read); the report (see the module)."""
    index = repo.index
    started = time.monotonic()
    with index.read() as txn:
        chunks = dict(index.iter_chunks(txn))
        if points:
            wanted = _read_by(index, txn, [index.point_named(txn, *parse_point_ref(ref))
                                           for ref in points], repo.block_size)
            plan = [(None, batch) for _, batch in
                    _by_pack((d, chunks[d]) for d in wanted if d in chunks)]
        else:
            plan = _rolling_plan(index, txn, chunks)
        suspects = set(index.suspects(txn))
    total = sum(loc.length for _, batch in plan for _, loc in batch)
    done = verified_packs = checked = unreadable = 0
    bad: dict[bytes, dict] = {}
    stopped = False
    for pack, batch in plan:
        if max_duration is not None and time.monotonic() - started >= max_duration:
            stopped = True
            break
        found, unread = _verify_chunks(repo, batch)
        bad.update(found)
        unreadable += len(unread)
        checked += len(batch) - len(unread)
        done += sum(loc.length for d, loc in batch if d not in unread)
        whole = pack is not None and not unread
        with index.write() as txn:
            for digest, _ in batch:
                if digest in found:
                    index.mark_bad(txn, digest, found[digest])
                elif digest in suspects and digest not in unread:
                    index.clear_suspect(txn, digest)  # read again and sound
            if whole:
                index.put_verified(txn, pack, {"at": now(), "chunks": len(batch),
                                               "bad": sum(d in found for d, _ in batch)})
        verified_packs += whole
        if progress:
            progress(done, total)
    with index.read() as txn:
        every_bad = index.bad_chunks(txn)
        readers = _readers(index, txn, set(every_bad), repo.block_size)
    report = [{"chunk": digest.hex(), **info,
               "readers": readers.get(digest, []), "found_now": digest in bad}
              for digest, info in sorted(every_bad.items(), key=lambda b: b[0])]
    for entry in (e for e in report if e["found_now"]):
        log.warning("chunk %s (pack %d offset %d) found bad: %s; read by %s",
                    entry["chunk"][:16], entry["pack"], entry["offset"], entry["error"],
                    ", ".join(r["point"] for r in entry["readers"]) or "no point")
    return {"sound": not report, "chunks_verified": checked, "bytes_verified": done,
            "packs_verified": verified_packs,
            "packs_left": sum(1 for pack, _ in plan if pack is not None) - verified_packs,
            "stopped_early": stopped, "unreadable": unreadable, "bad": report}


def _rolling_plan(index: Index, txn, chunks: dict[bytes, ChunkLoc]
                  ) -> list[tuple[int | None, list[tuple[bytes, ChunkLoc]]]]:
    """The suspects first (as one batch that records no pack), then every pack's named
    chunks, the packs verified longest ago (or never) first."""
    suspects = [(d, chunks[d]) for d in index.suspects(txn) if d in chunks]
    last = index.verified(txn)
    packs = sorted(_by_pack(chunks.items()),
                   key=lambda entry: (last.get(entry[0], {}).get("at", -1.0), entry[0]))
    plan: list[tuple[int | None, list[tuple[bytes, ChunkLoc]]]] = []
    if suspects:
        plan.append((None, suspects))
    return plan + packs


def _by_pack(chunks: Iterable[tuple[bytes, ChunkLoc]]
             ) -> list[tuple[int, list[tuple[bytes, ChunkLoc]]]]:
    """(pack, its chunks in offset order) for each pack the chunks lie in, by pack."""
    out: dict[int, list[tuple[bytes, ChunkLoc]]] = defaultdict(list)
    for digest, loc in chunks:
        out[loc.pack].append((digest, loc))
    return [(pack, sorted(out[pack], key=lambda c: c[1].offset)) for pack in sorted(out)]


def _verify_chunks(repo: Repository, batch: list[tuple[bytes, ChunkLoc]]
                   ) -> tuple[dict[bytes, dict], set[bytes]]:
    """Read and check each chunk of `batch`; the bad ones, with what was wrong, and the
    ones that cannot be read now (ChunkUnavailable: no verdict, left for the next run)."""
    out = {}
    unread = set()
    for start in range(0, len(batch), BATCH):
        part = batch[start:start + BATCH]
        results = repo.store.get_many([(loc, digest) for digest, loc in part],
                                      relocate=repo.locate,  # moved by GC meanwhile
                                      full=True)  # BLAKE3 of every block
        for (digest, loc), result in zip(part, results, strict=True):
            if isinstance(result, PackGone) and repo.locate(digest) is None:
                continue  # gc freed it meanwhile: nothing reads it, nothing to judge
            if isinstance(result, CorruptChunk):
                out[digest] = {"at": now(), "pack": loc.pack, "offset": loc.offset,
                               "error": str(result)}
            elif isinstance(result, ChunkError):
                unread.add(digest)
                log.warning("chunk %s (pack %d): cannot be read now, not verified: %s",
                            digest.hex()[:16], loc.pack, result)
    return out, unread


def _read_by(index: Index, txn, points: Iterable[PointRecord], block_size: int) -> set[bytes]:
    """Every chunk the points read."""
    out: set[bytes] = set()
    for point in points:
        chain = index.chain(txn, point.lineage, point.gen)
        for block in range(ceil_div(point.size, block_size)):
            value = index.resolve(txn, chain, block)
            if value:
                out.add(value)
    return out


def _readers(index: Index, txn, digests: set[bytes], block_size: int
             ) -> dict[bytes, list[dict]]:
    """For each chunk of `digests`, the points (also in the trash) that read it, and the
    byte ranges of each: the blocks whose value (through the point's chain) is it. A
    scan of the extents finds the blocks that could; only those are resolved."""
    if not digests:
        return {}
    blocks = {block for lineage in index.list_lineages(txn)
              for block, _, value in index.iter_extents(txn, lineage.id) if value in digests}
    readers = [(p, False) for p in index.list_points(txn)]
    readers += [(e.point, True) for e in index.list_trash(txn)]
    out: dict[bytes, list[dict]] = defaultdict(list)
    for point, in_trash in readers:
        chain = index.chain(txn, point.lineage, point.gen)
        hits: dict[bytes, list[int]] = defaultdict(list)
        for block in sorted(b for b in blocks if b * block_size < point.size):
            value = index.resolve(txn, chain, block)
            if value in digests:
                hits[value].append(block)
        for digest, found in hits.items():
            out[digest].append({"point": point.ref, "in_trash": in_trash,
                                "ranges": _ranges(found, block_size)})
    return out


def _ranges(blocks: list[int], block_size: int) -> list[list[int]]:
    """[offset, length] byte ranges of sorted `blocks`, adjacent blocks merged."""
    out: list[list[int]] = []
    for block in blocks:
        if out and out[-1][0] + out[-1][1] == block * block_size:
            out[-1][1] += block_size
        else:
            out.append([block * block_size, block_size])
    return out
