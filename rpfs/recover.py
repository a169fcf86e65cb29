"""`rpfs init --from-store`: a repository recovered from its object store alone.

The store holds the packs (packs/NNNNNNNN.pack), `rpfs.json` (as init wrote it, updated
with each checkpoint pushed) and the index checkpoints the daemon and `store sync` pushed
(index/STAMP.mdb, checkpoint.push). Recovery takes the newest checkpoint that reads back
clean (checkpoint.probe: the file check, every page and record, the recorded config)
into an empty folder, with the config the store holds (the endpoint and cache as given
now), and makes it true of what the store holds, in one commit:

- a pack that was still pending when the host was lost is not in the store: every
  point (or trash entry) that reads a chunk in one is lost, and so is every point still
  archiving (its frozen blocks were in a local file). They go as a purge drops a point
  (lifecycle/purge.release), so the refcounts and pack figures stay exact, and chunk
  records left in missing packs with no reference go;
- writable disks: their local files and block maps were on the lost host. Each gets a
  new lineage (as a rollback does, livedisk.repoint) reading through its newest point
  that survived, else its origin (a clone's base), else nothing (empty), an empty local
  file and an all-ABSENT map; the report says which, per disk;
- a captured disk's head goes back to its newest surviving point (its next capture
  compares with that one);
- every pack in the store is recorded "stored", records of absent packs go, the pack
  counter is raised past the store's highest pack (a new pack must not take a stored
  name), and captures that were running are dropped (their processes are gone).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import perms
from .checkpoint import REMOTE, probe
from .disks.livedisk import create_local_file, repoint
from .errors import RpfsError
from .index import MAX_GEN, DiskRecord, Index, PointRecord, PointState
from .lifecycle.purge import reader_gens, release, truncate
from .repo import STORE_CONFIG, Config, _write_config
from .store.format import pack_number
from .store.s3 import S3Objects, StoreConfig
from .store.tiered import PACKS
from .upload import STORED

log = logging.getLogger(__name__)


def recover(root: Path, store: StoreConfig) -> dict:
    """Make the repository at `root` (missing or empty) from `store`; what was found."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise RpfsError(f"{root} exists and is not an empty directory; recover into a new one")
    objects = S3Objects(store)
    objects.check()
    try:
        raw = json.loads(objects.get(STORE_CONFIG))
    except FileNotFoundError:
        raise RpfsError(f"{store.url} holds no rpfs repository (no {STORE_CONFIG})") from None
    config = replace(Config(**raw), store=asdict(store))
    names = sorted(objects.list(REMOTE), reverse=True)
    if not names:
        raise RpfsError(f"{store.url} holds no index checkpoint: nothing was uploaded "
                        "before the host was lost")
    root.mkdir(mode=perms.DIR_MODE, parents=True, exist_ok=True)
    for sub in ("index", "packs", "locks", "disks"):
        (root / sub).mkdir(mode=perms.DIR_MODE, exist_ok=True)
    skipped = []
    target = root / "index" / "data.mdb"
    for name in names:
        objects.download(name, target)
        os.chmod(target, 0o600)
        found = probe(target, config.recorded())
        if found.good:
            break
        skipped.append((name, found.problem))
    else:
        target.unlink(missing_ok=True)
        raise RpfsError(f"no index checkpoint in {store.url} reads back clean: "
                        + "; ".join(f"{n}: {p}" for n, p in skipped))
    present = {}
    for key, size in objects.list(PACKS).items():
        pack = pack_number(key[len(PACKS):])
        if pack is not None:
            present[pack] = size
    index = Index(root / "index")
    try:
        with index.write() as txn:
            fixed = _repair(index, txn, present)
            for disk in index.list_disks(txn):
                if disk.writable:
                    create_local_file(root / disk.file, disk.size)  # before the commit
            points = len(index.list_points(txn))
    finally:
        index.close()
    _write_config(root, config)
    perms.enforce(root)
    log.info("repository recovered from %s, index checkpoint %s: %d points, lost %s",
             store.url, name, points, ", ".join(fixed.lost) or "none")
    return {"store": store.url, "checkpoint": name[len(REMOTE):], "points": points,
            "lost": fixed.lost, "disks": fixed.disks, "stray_chunks": fixed.stray,
            "missing_packs": fixed.missing, "skipped": skipped}


@dataclass
class _Fixed:
    lost: list[str] = field(default_factory=list)  # DISK@POINT dropped (trash ones too)
    disks: list[str] = field(default_factory=list)  # one line per writable disk
    missing: list[int] = field(default_factory=list)  # packs named but not in the store
    stray: int = 0  # chunks in missing packs still referenced (`check` names them)


def _repair(index: Index, txn, present: dict[int, int]) -> _Fixed:
    """Make the checkpoint's index true of the store's packs (see the module docstring)."""
    out = _Fixed()
    stats = index.pack_stats(txn)
    out.missing = sorted(set(stats) - set(present))
    bad = {d for d, loc in index.iter_chunks(txn) if loc.pack not in present}
    reads_bad = _bad_reads(index, txn, bad)
    lost = [p for p in index.list_points(txn)
            if p.state != PointState.COMPLETE or reads_bad(p.lineage, p.gen)]
    lost_trash = [t.point for t in index.list_trash(txn)
                  if t.point.state != PointState.COMPLETE
                  or reads_bad(t.point.lineage, t.point.gen)]
    gone = {_key(p) for p in lost}
    for disk in index.list_disks(txn):
        if disk.writable:
            out.disks.append(_bring_back(index, txn, disk, gone, reads_bad))
    for point in lost:
        index.delete_point(txn, point.disk, point.name)
        release(index, txn, point.lineage, point.gen)
    for point in lost_trash:
        index.delete_trash(txn, point)
        release(index, txn, point.lineage, point.gen)
    out.lost = sorted(p.ref + (" (in the trash)" if p in lost_trash else "")
                      for p in lost + lost_trash)
    for disk in index.list_disks(txn):
        if not disk.writable:
            _cut_head(index, txn, disk)
    for digest in bad:
        loc = index.get_chunk(txn, digest)
        if loc is not None and loc.refcount == 0:
            index.delete_chunk(txn, digest)
        elif loc is not None:
            out.stray += 1
            log.warning("chunk %s in pack %d, which is not in the store, is still "
                        "referenced", digest.hex()[:16], loc.pack)
    for capture_id, _ in index.list_captures(txn):
        index.drop_staged(txn, capture_id)
    for file_id in index.map_files(txn):  # the local files are new and empty: all ABSENT
        index.drop_map(txn, file_id)
    left = index.pack_stats(txn)
    for pack in index.pack_states(txn):
        if pack not in present and pack not in left:
            index.forget_pack(txn, pack)
    now = time.time()
    for pack, size in present.items():
        index.put_pack_state(txn, pack, STORED, size, now)
    index.raise_counter(txn, "pack", max(present, default=0))
    return out


def _key(point: PointRecord) -> tuple[str, str, int, int]:
    return point.disk, point.name, point.lineage, point.gen


def _bad_reads(index: Index, txn, bad: set[bytes]):
    """A test: does reading (lineage, gen) meet a chunk of `bad`? Only the blocks that
    have an extent naming one are resolved (one scan of the extents finds them)."""
    blocks: dict[int, set[int]] = {}
    if bad:
        for lineage in index.list_lineages(txn):
            for block, _, value in index.iter_extents(txn, lineage.id):
                if value in bad:
                    blocks.setdefault(lineage.id, set()).add(block)

    def reads_bad(lineage: int, gen: int) -> bool:
        chain = index.chain(txn, lineage, gen)
        candidates = set().union(*(blocks.get(lin, ()) for lin, _ in chain))
        return any(index.resolve(txn, chain, b) in bad for b in candidates)

    return reads_bad


def _bring_back(index: Index, txn, disk: DiskRecord, gone: set, reads_bad) -> str:
    """A writable disk, whose local file is lost, as of the newest state of its history
    that the store holds whole: its newest surviving point on its own lineages, else the
    base it was cloned (or rolled back) from, else empty. The line that says which."""
    chain = index.chain(txn, disk.lineage, MAX_GEN)
    mine = [p for p in index.list_points(txn, disk.name)
            if p.state == PointState.COMPLETE and _key(p) not in gone]
    for depth, (lineage, gen) in enumerate(chain):
        if depth:  # the base the lineage above reads: a point, or one deleted since
            at = index.point_at(txn, lineage, gen)
            if (at is None or _key(at) not in gone) and not reads_bad(lineage, gen):
                repoint(index, txn, disk.name, (lineage, gen), at)
                what = at.ref if at is not None else disk.origin or f"lineage {lineage}"
                if at is not None and at.disk == disk.name:
                    return f"disk {disk.name}: as of its point {at.ref} (newer writes were lost)"
                return (f"disk {disk.name}: as its origin {what} (its writes were lost; "
                        "no point of it was stored)")
        record = index.get_lineage(txn, lineage)
        if record is None or disk.name not in record.disks:
            break  # past its own history: an older point of another disk is not it
        ours = [p for p in mine if p.lineage == lineage and p.gen <= gen]
        if ours:
            newest = max(ours, key=lambda p: p.gen)
            repoint(index, txn, disk.name, (lineage, newest.gen), newest)
            return f"disk {disk.name}: as of its point {newest.ref} (newer writes were lost)"
    repoint(index, txn, disk.name, None, None)
    return (f"disk {disk.name}: empty (no point of it nor its origin was stored; its "
            "writes were lost)")


def _cut_head(index: Index, txn, disk: DiskRecord) -> None:
    """A captured disk whose newest points were lost: its head (the base of its next
    capture) goes back to the newest generation something still reads."""
    lineage = index.get_lineage(txn, disk.lineage)
    if lineage is None:
        return
    below = [g for g in reader_gens(index, txn, lineage) if g != MAX_GEN]
    newest = max(below, default=0)
    if lineage.head_gen > newest:
        truncate(index, txn, lineage, newest + 1)
        log.info("disk %s: head back to generation %d (newer points were lost)",
                 disk.name, newest)
