"""`rpfs check`: is the index consistent with itself and with the packs? Read-only.

It recounts what the index keeps as running figures (chunk references from the extents,
`gens` against `extents`, each pack's named and live records) and follows every record
that names another: a chunk's location must lie inside its pack and land on a record
header naming that chunk; a point, a trash entry and a disk need their lineage, a
lineage its origin, a point's lineage must list the point's disk (purge finds a
lineage's readers through it), a writable disk its local file and a block map within it
of valid states (and no map of a file no disk names). Each finding says what is
wrong and what to do. What a crash leaves behind on purpose (records of chunks no
extent references, packs or local files nothing names, staging rows of dead captures)
is no inconsistency: it is listed as reclaimable, for GC. With a store: a pack the index
records as "stored" must be in the bucket; packs GC retired (its objects wait for the
reader grace) are neither checked nor listed.

Headers are checked, not payloads: `rpfs verify` decodes and hashes every record.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from .. import upload
from ..disks.blockmap import ABSENT, DIRTY, FROZEN, PAGE_BLOCKS, PRESENT
from ..fence import retired
from ..index import ChunkLoc
from ..lifecycle.purge import refcount_errors
from ..names import ceil_div
from ..progress import ProgressFn
from ..repo import Repository
from ..store.backend import PackMissing

INDEX_FIX = ("the index disagrees with itself: keep a copy of REPO/index, then 'rpfs index "
             "restore' puts back its newest good checkpoint; please report it with REPO/rpfs.log")
PACK_FIX = ("a pack was changed or cut outside rpfs (or its disk failed): the points "
            "reading these chunks read EIO there; 'rpfs verify' names them")

STORE_FIX = ("an object was deleted from the bucket outside rpfs: the chunks in it read EIO "
             "where no local copy is left; 'rpfs verify' names the points")

_STATES = bytes([ABSENT, PRESENT, DIRTY, FROZEN])  # the bytes a block map may hold


@dataclass
class Finding:
    """One inconsistency: what is wrong and what to do about it."""

    problem: str
    fix: str


@dataclass
class Report:
    problems: list[Finding] = field(default_factory=list)
    reclaimable: list[str] = field(default_factory=list)  # what GC frees; no problem
    checked: dict[str, int] = field(default_factory=dict)

    def add(self, fix: str, problems: list[str]) -> None:
        self.problems += [Finding(problem, fix) for problem in problems]

    def as_dict(self) -> dict:
        return {"clean": not self.problems, "checked": self.checked,
                "problems": [asdict(f) for f in self.problems],
                "reclaimable": self.reclaimable}


def check(repo: Repository, progress: ProgressFn | None = None) -> dict:
    """Check the repository (see the module's docstring); the report as a dict."""
    report = Report()
    report.add(INDEX_FIX, refcount_errors(repo.index))
    with repo.index.read() as txn:
        chunks = list(repo.index.iter_chunks(txn))
        _check_records(repo, txn, report)
    _check_packs(repo, chunks, report, progress)
    return report.as_dict()


def _check_records(repo: Repository, txn, report: Report) -> None:
    """Lineages, points, trash entries, disks, local files and staging rows."""
    index = repo.index
    lineages = {lin.id: lin for lin in index.list_lineages(txn)}
    disks = {d.name: d for d in index.list_disks(txn)}
    points = index.list_points(txn)
    trash = [entry.point for entry in index.list_trash(txn)]
    problems = []
    for lin in lineages.values():
        if lin.parent is not None and lin.parent not in lineages:
            problems.append(f"lineage {lin.id}: its origin, lineage {lin.parent}, is missing")
    for where, point in [("point", p) for p in points] + [("trash entry", p) for p in trash]:
        lin = lineages.get(point.lineage)
        if lin is None:
            problems.append(f"{where} {point.ref}: its lineage {point.lineage} is missing")
        elif point.disk not in lin.disks:
            problems.append(f"{where} {point.ref}: lineage {lin.id} does not list disk "
                            f"{point.disk} (a purge would not see it as a reader)")
        if point.disk not in disks:
            problems.append(f"{where} {point.ref}: its disk is missing")
    for disk in disks.values():
        if disk.lineage not in lineages:
            problems.append(f"disk {disk.name}: its lineage {disk.lineage} is missing")
        if disk.writable and not (repo.root / disk.file).exists():
            problems.append(f"disk {disk.name}: its local file {disk.file} is missing")
    problems += _check_maps(repo, txn, disks.values())
    report.add(INDEX_FIX, problems)
    named = {disk.file for disk in disks.values() if disk.writable}
    report.reclaimable += [f"local file {f} (no disk names it)"
                           for f in sorted(_local_files(repo)) if f not in named]
    for capture_id, info in index.list_captures(txn):
        if repo.disk_lock_free(info["disk"]):
            report.reclaimable.append(f"staging rows of capture {capture_id} of disk "
                                      f"{info['disk']} (its process is gone)")
    report.checked.update(lineages=len(lineages), disks=len(disks), points=len(points),
                          trash=len(trash))


def _check_maps(repo: Repository, txn, disks) -> list[str]:
    """Each writable disk's block map: pages within the disk, of valid states; and no
    pages of a local file no disk names."""
    index, problems = repo.index, []
    files = {d.file_id: d for d in disks if d.writable}
    for file_id, disk in files.items():
        pages = ceil_div(ceil_div(disk.size, repo.block_size), PAGE_BLOCKS)
        for page, value in index.map_pages(txn, file_id):
            if page >= pages or len(value) > PAGE_BLOCKS:
                problems.append(f"disk {disk.name}: block-map page {page} lies past the disk")
            elif value.translate(None, _STATES):
                problems.append(f"disk {disk.name}: block-map page {page} holds a state "
                                "that is none of absent, present, dirty, frozen")
    problems += [f"block-map pages of local file {file_id}, which no disk names"
                 for file_id in sorted(index.map_files(txn) - files.keys())]
    return problems


def _local_files(repo: Repository) -> list[str]:
    folder = repo.root / "disks"
    return [f"disks/{p.name}" for p in folder.glob("*.raw")] if folder.is_dir() else []


def _check_packs(repo: Repository, chunks: list[tuple[bytes, ChunkLoc]], report: Report,
                 progress: ProgressFn | None) -> None:
    """Every chunk's location against its pack's record headers, a pack at a time."""
    by_pack: dict[int, list[tuple[bytes, ChunkLoc]]] = defaultdict(list)
    for digest, loc in chunks:
        by_pack[loc.pack].append((digest, loc))
    sizes = repo.store.sizes()  # progress is in bytes
    total, done = sum(sizes.values()), 0
    report.add(STORE_FIX, _check_stored(repo))
    problems = []
    with repo.index.read() as txn:
        going = retired(repo.index, txn)
    for pack in sorted(sizes.keys() | by_pack.keys()):
        named = by_pack.get(pack, [])
        if pack not in sizes:
            problems.append(f"pack {pack} is missing: {len(named)} chunks named in it")
            continue
        if named or pack not in going:  # else GC deletes it (its object after the grace)
            with contextlib.suppress(PackMissing):  # deleted meanwhile: by GC, after the index
                problems += _check_pack(repo, pack, named, report)
        done += sizes[pack]
        if progress:
            progress(done, total)
    report.add(PACK_FIX, problems)
    report.checked.update(chunks=len(chunks), packs=len(sizes))
    dead = [loc for _, loc in chunks if not loc.refcount]
    if dead:
        report.reclaimable.append(f"{len(dead)} chunks of {sum(loc.length for loc in dead)} "
                                  "bytes that no extent references")


def _check_stored(repo: Repository) -> list[str]:
    """With a store: each pack the index records as "stored" is in the bucket."""
    tiered = upload.backend(repo)
    if tiered is None:
        return []
    with repo.index.read() as txn:
        states = repo.index.pack_states(txn)
    there = tiered.stored_sizes()
    return [f"pack {pack}: the index records it as in the store, but {tiered.location} "
            "holds no object of it" for pack, record in sorted(states.items())
            if record["state"] == upload.STORED and pack not in there]


def _check_pack(repo: Repository, pack: int, named: list[tuple[bytes, ChunkLoc]],
                report: Report) -> list[str]:
    """The chunks `named` in `pack` against its headers; what it holds beyond them."""
    store = repo.store
    size = store.backend.size(pack)
    headers = dict(store.digests(pack))  # offset -> digest, whole records only
    problems = []
    for digest, loc in named:
        if loc.offset + loc.length > size:
            problems.append(f"chunk {digest.hex()[:16]}: ends at {loc.offset + loc.length} "
                            f"in pack {pack} of {size} bytes")
        elif headers.get(loc.offset) != digest:
            found = headers.get(loc.offset)
            problems.append(
                f"chunk {digest.hex()[:16]}: pack {pack} offset {loc.offset} holds "
                + (f"chunk {found.hex()[:16]}" if found else "no record header"))
    unnamed = len(headers) - len({loc.offset for _, loc in named} & headers.keys())
    if not named:
        report.reclaimable.append(f"pack {pack} ({size} bytes): nothing the index names")
    elif unnamed:
        report.reclaimable.append(f"pack {pack}: {unnamed} records the index does not name")
    return problems
