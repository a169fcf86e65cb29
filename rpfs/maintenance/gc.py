"""`rpfs gc`: free the chunks nothing references and compact packs, online.

Every step is a short index transaction (at most SWEEP_BATCH or MOVE_BATCH records) and
takes no lock a reader or writer waits on, so VMs, captures and snapshots go on.

Freeing. The index lists every chunk with refcount 0 and since when (`zero`). A writer
(a capture, an archive batch) examines blocks first and names their chunks at its commit,
and may deduplicate against a chunk it saw referenced that drops to 0 meanwhile: GC
frees a chunk only if it dropped to 0 before the oldest running writer started (the
`fence`: this process's writers, `ingest.SESSIONS`, and every live capture's record). A
writer never deduplicates against a chunk with refcount 0 (it stores its own copy, and
`Ingest.register` makes that copy the chunk's), so a chunk freed after it started is one
it cannot name. Freeing is checked again inside each transaction.

Compaction. A pack whose live bytes are below `threshold` of its size is rewritten: the
records the index names in it are copied (raw, each checked on the way: a bad one is
copied as it is and marked bad) into new packs of GC's own, made durable, then the
chunks are pointed at their copies in short transactions, each chunk only if it is
still where it was (a capture may have healed or GC freed it meanwhile), then the pack
is retired and deleted. Readers need no lease: a reader that looked a chunk up before
the move and finds its pack gone looks it up again (`PackStore.get_many`'s relocate),
and the index names the copy before the pack goes. Packs a writer may still append to
are left alone: this process's open packs (`OPEN_PACKS`), every pack numbered above
the `pack` counter as a live capture found it when it started, and every pack numbered
above the counter as GC found it (a writer that started since).

Resuming. The compaction of a group of packs is recorded (the index note `gc`: the packs
and the packs their copies went to) once the copies are durable and before any chunk
moves; a run that finds the record finishes those packs from the copies' record headers,
copying nothing again. A kill before the record leaves copies nothing names, in packs the
next run deletes. Retired packs are listed (note `gc-retired`) until deleted.

The store (a repository with one, store/tiered.py). Packs are compacted in groups of up
to PACK_TARGET live bytes into a writer of their own, which is closed (its packs sealed)
and uploaded (upload.Uploader) after the note and before any chunk moves: the index never
names a local-only copy of data that was in the store. If the store does not take them,
the run stops there (the old packs stay; the next run uploads the copies and goes on). A
retired pack's local copies go at once (readers relocate); its object goes only when both
(a) an index checkpoint taken after its retirement is in the store (gc pushes one when
needed), so `init --from-store` from the newest never names a deleted pack, and (b) the
reader grace (`grace_seconds` of the store's config, on the lifecycle clock) has passed:
a reader in another process that looked a chunk up before the move may still GET the old
object. Those packs are listed in the note `store-retired` (pack, due time, and the time
after which a checkpoint no longer names it) in the transaction that forgets their
records; a later run, or the daemon's upkeep (`delete_objects`), deletes them once due.

The uploader and GC meet in the index (LMDB write transactions are serialised across
processes): the uploader records "uploading" only for a pack no retired list names, GC
forgets a retired pack's store record in the transaction that lists it in
`store-retired` (every retired pack of a store repository goes there, uploaded or not),
and the uploader records "stored" only if its "uploading" record is still there, else it
deletes the object it just put. So a pack GC deleted is never "stored" in the index, and
no object of it outlives GC's delete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import checkpoint, upload
from ..capture import reap_dead_captures
from ..errors import SPACE_ERRNOS, CorruptChunk, NoSpace, RpfsError
from ..fence import RETIRED, STORE_RETIRED, Fence, fence
from ..index import ChunkLoc, Index
from ..lifecycle import clock
from ..progress import ProgressFn
from ..repo import Repository
from ..store.format import decode_chunk
from ..store.packs import PACK_TARGET, PackWriter

log = logging.getLogger(__name__)

THRESHOLD = 0.8  # compact a pack whose live bytes are below this fraction of its size
SWEEP_BATCH = 256  # chunk records freed in one transaction
MOVE_BATCH = 256  # chunks pointed at their copies in one transaction
READ_RUN = 8 << 20  # bytes of adjacent records read at once when copying
ORPHAN_AGE = 600.0  # seconds a local file no disk names is left alone (a create in progress)
# After copying each run of records, sleep PAUSE × the time the run took. In the daemon,
# copying (reads, decode checks, appends) shares the GIL and the cores with the FUSE
# threads: back-to-back compaction raised a clone's 4 KiB read p99 3-12 × on 2 cores; with
# this pause 1.5-2.3 × (docs/performance.md, "Garbage collection").
PAUSE = 1.0
STATE = "gc"  # index note: the compaction in progress
TAILS = "gc-tails"  # index note: every pack up to this one had its tail looked at


@dataclass
class Result:
    dry_run: bool
    chunks_freed: int = 0
    bytes_freed: int = 0
    chunks_deferred: int = 0  # refcount 0, but a writer running since may name them
    packs_compacted: int = 0
    bytes_copied: int = 0
    packs_deleted: int = 0
    objects_deleted: int = 0  # of packs retired (this run or before) whose grace is over
    objects_waiting: int = 0  # retired packs whose objects wait for the grace or a checkpoint
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    tail_bytes: int = 0  # cut from packs past their last named record
    orphan_files: list[str] = field(default_factory=list)  # local files no disk names
    stopped: str | None = None  # why it stopped before the end (no space, the store)


class StoreFailed(RpfsError):
    """The store did not take compaction's copies: the run stops before moving chunks."""


def run(repo: Repository, threshold: float = THRESHOLD, dry_run: bool = False,
        progress: ProgressFn | None = None, uploader: upload.Uploader | None = None) -> dict:
    """One garbage collection; its figures (with `dry_run`, what it would do). With a
    store, gc uploads its copies through `uploader` (the disk service's, so the daemon's
    passes and gc take turns on one pack), else one of its own."""
    if not 0.0 <= threshold <= 1.0:
        raise RpfsError(f"bad --threshold {threshold}: a fraction from 0 to 1, e.g. 0.8")
    with repo.gc_lock():
        return _run(repo, threshold, dry_run, progress, uploader)


def _run(repo: Repository, threshold: float, dry_run: bool, progress: ProgressFn | None,
         uploader: upload.Uploader | None) -> dict:
    out = Result(dry_run, pack_bytes_before=sum(repo.store.sizes().values()))
    store = upload.backend(repo) is not None
    if not store or dry_run:
        uploader = None
    elif uploader is None:
        uploader = upload.Uploader(repo)
    if not dry_run:
        reap_dead_captures(repo, held="")
        out.stopped = _finish_compaction(repo, uploader)
    wall = fence(repo)
    freed = _sweep(repo, wall, out)
    candidates = [] if out.stopped else _candidates(repo, wall, threshold,
                                                     freed if dry_run else {})
    if dry_run:
        out.packs_compacted = sum(live > 0 for _, _, live in candidates)
        out.bytes_copied = sum(live for _, _, live in candidates)
        out.packs_deleted = len(candidates)
    else:
        _compact_all(repo, candidates, uploader, out, progress)
        out.packs_deleted = _delete_retired(repo)
        if store:
            out.objects_deleted, out.objects_waiting = delete_objects(repo)
    compacted = {pack for pack, _, _ in candidates}
    out.tail_bytes = _cut_tails(repo, wall, compacted, dry_run)
    out.orphan_files = _orphan_files(repo, dry_run)
    out.pack_bytes_after = sum(repo.store.sizes().values())
    log.info("gc%s: %d chunks freed (%d bytes), %d packs compacted (%d bytes copied), %d packs "
             "deleted, pack bytes %d -> %d", " (dry run)" if dry_run else "",
             out.chunks_freed, out.bytes_freed, out.packs_compacted, out.bytes_copied,
             out.packs_deleted, out.pack_bytes_before, out.pack_bytes_after)
    return vars(out)


def _compact_all(repo: Repository, candidates: list[tuple[int, int, int]],
                 uploader: upload.Uploader | None, out: Result,
                 progress: ProgressFn | None) -> None:
    """Compact and retire the candidates, a group at a time (one pack at a time without a
    store; with one, groups of up to PACK_TARGET live bytes, each into its own writer,
    whose packs are uploaded before the chunks move)."""
    total = sum(size for _, size, _ in candidates)
    done = 0
    writer = repo.store.writer(repo.allocate_pack)
    try:
        for group in _groups(candidates, PACK_TARGET if uploader else 0):
            try:
                out.bytes_copied += _compact(repo, [p for p, _, live in group if live],
                                             writer, uploader)
                out.packs_compacted += sum(live > 0 for _, _, live in group)
                _retire(repo.index, [pack for pack, _, _ in group])
            except StoreFailed as exc:
                out.stopped = str(exc)
                log.warning("gc stopped: %s; the old packs stay, the next gc goes on", exc)
                break
            except (NoSpace, OSError) as exc:
                if not isinstance(exc, NoSpace) and exc.errno not in SPACE_ERRNOS:
                    raise
                out.stopped = f"no space to compact pack {group[0][0]}: {exc}"
                log.warning("gc stopped: %s; what it did so far stands, the next gc goes "
                            "on", out.stopped)
                break
            if uploader is not None:  # the last one's packs are sealed and in the store
                writer = repo.store.writer(repo.allocate_pack)
            done += sum(size for _, size, _ in group)
            if progress:
                progress(done, total)
    finally:
        writer.close()


def _groups(candidates: list[tuple[int, int, int]], limit: int
            ) -> list[list[tuple[int, int, int]]]:
    """`candidates` in order, in groups of at most `limit` live bytes (a pack alone may
    hold more); `limit` 0: one pack a group."""
    out: list[list[tuple[int, int, int]]] = []
    held = 0
    for candidate in candidates:
        if not out or held + candidate[2] > limit:
            out.append([])
            held = 0
        out[-1].append(candidate)
        held += candidate[2]
    return out


def _sweep(repo: Repository, wall: Fence, out: Result) -> dict[int, int]:
    """Free the chunk records with refcount 0 since before the fence, a batch per
    transaction, each checked again in it; the bytes freed in each pack."""
    index = repo.index
    with index.read() as txn:
        zero = list(index.zero_chunks(txn))
    due = [digest for digest, since in zero if since < wall.since]
    out.chunks_deferred = len(zero) - len(due)
    freed: dict[int, int] = {}
    for start in range(0, len(due), SWEEP_BATCH):
        with index.write() if not out.dry_run else index.read() as txn:
            for digest in due[start:start + SWEEP_BATCH]:
                loc = index.get_chunk(txn, digest)
                since = index.zero_since(txn, digest)
                if loc is None or loc.refcount or since is None or since >= wall.since:
                    continue
                if not out.dry_run:
                    index.delete_chunk(txn, digest)
                out.chunks_freed += 1
                out.bytes_freed += loc.length
                freed[loc.pack] = freed.get(loc.pack, 0) + loc.length
    return freed


def _candidates(repo: Repository, wall: Fence, threshold: float, freed: dict[int, int]
                ) -> list[tuple[int, int, int]]:
    """(pack, size, live bytes) of each sealed pack worth compacting: live below
    `threshold` of its size, every pack at 1.0 (a pack nothing names has 0 live: it is
    only deleted), the emptiest first."""
    with repo.index.read() as txn:
        stats = repo.index.pack_stats(txn)
        going = {entry["pack"] for entry in repo.index.get_note(txn, STORE_RETIRED) or []}
    out = []
    for pack, size in repo.store.sizes().items():
        if not wall.sealed(pack) or pack in going:  # its object waits for the grace
            continue
        named = stats.get(pack)
        # Every named record is copied; `freed`: what a dry run's sweep would have freed.
        live = (named.named_bytes if named else 0) - freed.get(pack, 0)
        if threshold >= 1.0 or live < threshold * size or size == 0:
            out.append((pack, size, live))
    return sorted(out, key=lambda c: (c[2] / c[1] if c[1] else 0.0, c[0]))


def _compact(repo: Repository, packs: list[int], writer: PackWriter,
             uploader: upload.Uploader | None) -> int:
    """Copy the records the index names in `packs` to `writer`'s packs and point the
    chunks at them (see the module docstring); the bytes copied. NoSpace below the reserve
    (the copies since the writer's last mark are cut away: nothing names them); with a
    store, the writer is closed and its packs uploaded before any chunk moves (StoreFailed
    if the store does not take them)."""
    if not packs:
        return 0
    index, store = repo.index, repo.store
    moves: list[tuple[int, list[tuple[bytes, ChunkLoc, ChunkLoc]]]] = []
    try:
        for pack in packs:
            with index.read() as txn:
                named = {offset: (digest, loc) for offset, digest in store.digests(pack)
                         if (loc := index.get_chunk(txn, digest)) is not None
                         and (loc.pack, loc.offset) == (pack, offset)}
            copies: list[tuple[bytes, ChunkLoc, ChunkLoc]] = []
            for run in _runs([loc for _, loc in named.values()]):
                started = time.perf_counter()
                repo.space.check("gc's compaction")
                first, last = run[0], run[-1]
                buf = store.backend.read(pack, first.offset,
                                         last.offset + last.length - first.offset)
                for loc in run:
                    start = loc.offset - first.offset
                    record = buf[start:start + loc.length]
                    digest = named[loc.offset][0]
                    _check_copy(index, record, digest, repo.block_size, pack, loc)
                    copies.append((digest, loc, writer.append(record)))
                    repo.space.spend(len(record))
                time.sleep(PAUSE * (time.perf_counter() - started))
            moves.append((pack, copies))
        writer.sync()
    except BaseException:
        writer.discard()
        raise
    with index.write() as txn:  # from here on a kill resumes from the copies
        index.put_note(txn, STATE, {"packs": packs, "into": writer.created})
    writer.mark()
    if uploader is not None:
        writer.close()
        _upload_copies(repo, uploader, writer.created)
    for pack, copies in moves:
        _move(index, pack, copies)
    with index.write() as txn:
        index.delete_note(txn, STATE)
    return sum(new.length for _, copies in moves for _, _, new in copies)


def _upload_copies(repo: Repository, uploader: upload.Uploader, packs: list[int]) -> None:
    """Put compaction's sealed copies `packs` in the store; StoreFailed if any is not
    "stored" after it."""
    done = uploader.run(packs=packs)
    with repo.index.read() as txn:
        missing = [p for p in packs
                   if (repo.index.pack_state(txn, p) or {}).get("state") != upload.STORED]
    if missing:
        raise StoreFailed(f"the store did not take the copies of compacted packs (packs "
                          f"{', '.join(map(str, missing))}): "
                          f"{done.error or 'another uploader has them'}")


def _runs(locs: list[ChunkLoc]) -> list[list[ChunkLoc]]:
    """`locs` (in offset order) split into runs of adjacent records of at most READ_RUN."""
    out: list[list[ChunkLoc]] = []
    for loc in locs:
        if out and out[-1][-1].offset + out[-1][-1].length == loc.offset and (
                loc.offset + loc.length - out[-1][0].offset <= READ_RUN):
            out[-1].append(loc)
        else:
            out.append([loc])
    return out


def _check_copy(index: Index, record: bytes, digest: bytes, block_size: int, pack: int,
                loc: ChunkLoc) -> None:
    """Decode a record before copying it: a bad one is copied as it is (its readers fail
    as before) and marked bad, so the next writer of its content heals it."""
    try:
        decode_chunk(memoryview(record), digest, block_size, (str(pack), loc.offset),
                     full=True)
    except CorruptChunk as exc:
        log.warning("pack %d offset %d: chunk %s is bad (%s): copied as it is, marked bad",
                    pack, loc.offset, digest.hex()[:16], exc)
        with index.write() as txn:
            index.mark_bad(txn, digest, {"at": time.time(), "pack": pack,
                                         "offset": loc.offset, "error": str(exc)})


def _move(index: Index, pack: int, copies: list[tuple[bytes, ChunkLoc, ChunkLoc]]) -> None:
    """Point each chunk still at its old place in `pack` at its copy, a batch per
    transaction."""
    for start in range(0, len(copies), MOVE_BATCH):
        with index.write() as txn:
            for digest, old, new in copies[start:start + MOVE_BATCH]:
                loc = index.get_chunk(txn, digest)
                if loc is not None and (loc.pack, loc.offset) == (old.pack, old.offset):
                    index.move_chunk(txn, digest, new)


def _finish_compaction(repo: Repository, uploader: upload.Uploader | None) -> str | None:
    """A compaction a kill interrupted after its copies were durable: (with a store,
    upload the copies first, then) point the chunks still in the old packs at the copies,
    found by the copies' record headers; why it could not, if it could not."""
    index, store = repo.index, repo.store
    with index.read() as txn:
        state = index.get_note(txn, STATE)
    if state is None:
        return None
    packs = state["packs"] if "packs" in state else [state["pack"]]  # a note of one pack
    if uploader is not None:
        try:
            _upload_copies(repo, uploader, state["into"])
        except StoreFailed as exc:
            log.warning("gc stopped: %s; the compaction of packs %s waits", exc, packs)
            return str(exc)
    copied: dict[bytes, ChunkLoc] = {}
    for into in state["into"]:
        for offset, digest, length in store.records(into):
            copied.setdefault(digest, ChunkLoc(into, offset, length))
    with index.read() as txn:
        found = [(digest, loc, copied[digest]) for digest in copied
                 if (loc := index.get_chunk(txn, digest)) is not None and loc.pack in packs]
    log.info("gc: finishing the compaction of packs %s a kill interrupted (%d chunks to "
             "move)", packs, len(found))
    for pack in packs:
        _move(index, pack, [c for c in found if c[1].pack == pack])
    with index.write() as txn:
        index.delete_note(txn, STATE)
    _retire(index, packs)
    return None


def _cut_tails(repo: Repository, wall: Fence, skip: set[int], dry_run: bool) -> int:
    """Cut the bytes past the last record the index names from sealed packs (a killed
    writer's unregistered tail); packs in `skip` were compacted whole. A sealed pack
    changes only by gc, so each is looked at once: the note `gc-tails` is the highest
    pack looked at, below which every pack was. Only a backend that appends can cut;
    the bytes cut."""
    backend, index = repo.store.backend, repo.index
    if not backend.can_append:
        return 0
    with index.read() as txn:
        stats = index.pack_stats(txn)
        upto = index.get_note(txn, TAILS) or 0
    cut = 0
    for pack in sorted(p for p in stats if p > upto):
        if not wall.sealed(pack):
            break  # a writer's: the packs above it wait for the next run
        upto = pack
        size = backend.size(pack)
        if pack in skip or size <= stats[pack].named_bytes:
            continue
        with index.read() as txn:
            end = max((offset + length for offset, digest, length in repo.store.records(pack)
                       if (loc := index.get_chunk(txn, digest)) is not None
                       and (loc.pack, loc.offset) == (pack, offset)), default=0)
        if end and end < size:
            if not dry_run:
                backend.truncate(pack, end)
                log.info("pack %d: cut %d bytes past its last named record", pack, size - end)
            cut += size - end
    if not dry_run:
        with index.write() as txn:
            index.put_note(txn, TAILS, upto)
    return cut


def _orphan_files(repo: Repository, dry_run: bool) -> list[str]:
    """Remove the local disk files no disk record names and that nobody touched for
    ORPHAN_AGE (`disk create` makes its file just before the record that names it): what
    a crash between a disk's deletion and its file's left behind."""
    folder = repo.root / "disks"
    with repo.index.read() as txn:
        named = {d.file for d in repo.index.list_disks(txn) if d.writable}
    out = []
    for path in sorted(folder.glob("*.raw")) if folder.is_dir() else []:
        name = f"disks/{path.name}"
        if name in named or time.time() - path.stat().st_mtime < ORPHAN_AGE:
            continue
        if not dry_run:
            path.unlink(missing_ok=True)
            log.info("local file %s removed: no disk names it", name)
        out.append(name)
    return out


def _retire(index: Index, packs: list[int]) -> None:
    """List `packs` for deletion: the index names nothing in them any more."""
    with index.write() as txn:
        retired = set(index.get_note(txn, RETIRED) or [])
        index.put_note(txn, RETIRED, sorted(retired | set(packs)))


def _delete_retired(repo: Repository) -> int:
    """Delete the retired packs (each only if the index names nothing in it: a chunk
    healed into one meanwhile keeps it); how many. With a store, only their local copies
    go now: their objects are listed in `store-retired` for `delete_objects`."""
    index, tiered = repo.index, upload.backend(repo)
    with index.read() as txn:
        retired = index.get_note(txn, RETIRED) or []
        stats = index.pack_stats(txn)
    deleted = [pack for pack in retired if pack not in stats]
    for pack in deleted:
        if tiered is None:
            repo.store.delete(pack)
            log.info("pack %d deleted: nothing in it is named any more", pack)
        else:
            tiered.drop_local(pack)
    due = clock.now() + (tiered.objects.config.grace_seconds if tiered else 0.0)
    with index.write() as txn:
        left = [pack for pack in retired if pack not in deleted]
        if left:
            index.put_note(txn, RETIRED, left)
        else:
            index.delete_note(txn, RETIRED)
        for pack in deleted:
            index.forget_pack(txn, pack)
        if tiered is not None and deleted:
            waiting = index.get_note(txn, STORE_RETIRED) or []
            listed = {entry["pack"] for entry in waiting}
            index.put_note(txn, STORE_RETIRED, waiting + [
                {"pack": pack, "due": due} for pack in deleted if pack not in listed])
    if tiered is not None and deleted:
        log.info("packs %s retired: local copies removed, their objects go after the "
                 "reader grace", deleted)
    return len(deleted)


def delete_objects(repo: Repository) -> tuple[int, int]:
    """Delete the objects of the packs in `store-retired` whose grace is over and that no
    checkpoint in the store names (pushing one if none was taken since their retirement);
    (deleted, still waiting). A store failure is logged: they wait for the next run."""
    index, tiered = repo.index, upload.backend(repo)
    assert tiered is not None
    with index.read() as txn:
        waiting = index.get_note(txn, STORE_RETIRED) or []
    if any("at" not in entry for entry in waiting):
        with index.write() as txn:
            # "at": a time after the transaction that listed the pack committed: a
            # checkpoint taken later holds neither its chunks nor its store record
            at = time.time()
            waiting = [{"at": at, **entry} for entry in index.get_note(txn, STORE_RETIRED)]
            index.put_note(txn, STORE_RETIRED, waiting)
    due = [entry for entry in waiting if entry["due"] <= clock.now()]
    if not due:
        return 0, len(waiting)
    gone: list[int] = []
    try:
        pushed = checkpoint.newest_pushed(tiered)
        if pushed is None or pushed <= max(entry["at"] for entry in due):
            checkpoint.push(repo)
            pushed = checkpoint.newest_pushed(tiered)
        for entry in due:
            if pushed is not None and entry["at"] < pushed:
                repo.store.delete(entry["pack"])
                gone.append(entry["pack"])
                log.info("pack %d deleted from the store: retired, its reader grace over",
                         entry["pack"])
    except (OSError, RpfsError) as exc:
        log.warning("objects of retired packs not deleted now (the next gc tries again): %s",
                    exc)
    if gone:
        with index.write() as txn:
            waiting = [entry for entry in index.get_note(txn, STORE_RETIRED) or []
                       if entry["pack"] not in gone]
            if waiting:
                index.put_note(txn, STORE_RETIRED, waiting)
            else:
                index.delete_note(txn, STORE_RETIRED)
    return len(gone), len(waiting)
