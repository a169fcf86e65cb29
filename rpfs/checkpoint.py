"""Checkpoints of the index, and putting one back when the index is damaged.

The extent maps, points and block maps live only in the index, and LMDB keeps no
checksums: a damaged `data.mdb` cannot be repaired, only replaced. So the daemon and
`rpfs capture` keep the last KEEP checkpoints in REPO/index-checkpoints/: compact copies
taken from one read transaction (writers go on meanwhile), written to a temporary name,
fsynced, checked, renamed, the directory fsynced. A capture takes one after its point
commits; the daemon every INTERVAL seconds when the index changed, and when it stops.

`restore()` (`rpfs index restore`) puts the newest good checkpoint back, with nothing
else using the repository:

- every candidate and the damaged index are read in a forked child process (a damaged
  LMDB file can kill its reader with SIGBUS): "good" means the file check passes, LMDB
  follows every page, every record decodes and it was made with rpfs.json's config;
- points newer than the checkpoint are lost; it names those the damaged index or newer
  bad checkpoints still list, and says so when it cannot know;
- writable disks: their local files hold writes newer than the restored block map. Each
  disk is marked unclean (its next point compares every block, a rollback drops every
  local block), a snapshot that was still archiving is undone (its frozen blocks may have
  been overwritten since: its content is not known; its points, riders and extents go,
  its blocks become DIRTY again), and an ABSENT block whose local bytes differ from what
  it resolves to is a write made after the checkpoint: it becomes DIRTY, so no
  acknowledged write is lost. Only after a
  rollback before the checkpoint can such bytes also be stale ones the rollback dropped
  (it does not punch them); then the damaged index's block map decides when it can be
  read, else the block stays ABSENT (undoing a rollback silently is worse) and the report
  counts it;
- counters are raised past the pack and local-file numbers on disk (reusing one would
  clash with files made after the checkpoint), every chunk it names is checked against
  its pack record's header (optionally decoded and hashed), and the damaged index is
  renamed aside, never deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import mdbfile
from .disks.blockmap import ABSENT, DIRTY, FROZEN, PRESENT, BlockMap
from .errors import CorruptChunk, RpfsError
from .index import MAX_GEN, ZERO, DiskRecord, Index, IndexDamaged, PointState
from .lifecycle.purge import truncate
from .names import ceil_div
from .repo import STORE_CONFIG, Repository, config_bytes, load_config, lock_everything, pack_backend
from .source import Source, block_runs
from .store.backend import PackMissing, PackUnavailable
from .store.format import HEADER, MAGIC, digest, pack_name
from .store.local import fsync_dir
from .store.packs import PackStore
from .store.tiered import TieredBackend

log = logging.getLogger(__name__)

CHECKPOINTS = "index-checkpoints"
KEEP = 5  # checkpoints kept: the newest may be bad, an older one then serves
INTERVAL = 300.0  # the daemon takes one at most this often (seconds), if the index changed
_NAME = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z\.mdb")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    created: float
    size: int


def _created(name: str) -> float | None:
    """When the checkpoint named `name` was taken (None: not a checkpoint's name)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    stamp = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return stamp.timestamp() + int(match.group(2)) / 1e6


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """The checkpoints of the repository at `root`, newest first."""
    out = []
    for path in (root / CHECKPOINTS).glob("*.mdb"):
        created = _created(path.name)
        if created is None:
            continue
        with suppress(FileNotFoundError):  # pruned by another process meanwhile
            out.append(Checkpoint(path, created, path.stat().st_size))
    return sorted(out, key=lambda c: c.created, reverse=True)


def age(root: Path) -> float:
    """Seconds since the newest checkpoint was taken (infinite if there is none)."""
    found = list_checkpoints(root)
    return time.time() - found[0].created if found else float("inf")


@contextmanager
def _taking(folder: Path) -> Iterator[None]:
    """One taker of checkpoints at a time per repository (a capture and the daemon): a
    flock of the checkpoint directory itself."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def take(repo: Repository) -> Checkpoint:
    """Write a checkpoint of the index now and prune the oldest beyond KEEP.

    RpfsError if free space is below the reserve, if it cannot be written, or if the copy
    does not read back cleanly (the index is damaged: the older checkpoints are kept, the
    bad copy is not).
    """
    repo.space.check("an index checkpoint")  # the reserve is for the index's commits
    folder = repo.root / CHECKPOINTS
    folder.mkdir(mode=0o700, exist_ok=True)
    with _taking(folder):
        for stale in folder.glob(".*.tmp"):  # left by a taker that died (we hold the lock)
            stale.unlink()
        created = time.time()
        stamp = datetime.fromtimestamp(created, UTC)
        path = folder / f"{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond:06d}Z.mdb"
        tmp = folder / f".{path.name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                repo.index.copy_to(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            copy = Index(tmp, copy=True)
            try:
                copy.verify_records()
            finally:
                copy.close()
            os.rename(tmp, path)
            fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RpfsError(
                f"cannot write an index checkpoint in {folder}: {exc.strerror}"
            ) from None
        except IndexDamaged as exc:
            tmp.unlink(missing_ok=True)
            raise RpfsError(
                f"no index checkpoint taken: the copy of the index reads back damaged "
                f"({exc.detail}); the older checkpoints are kept"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for old in list_checkpoints(repo.root)[KEEP:]:
            old.path.unlink(missing_ok=True)
    log.info("index checkpoint %s taken (%d bytes)", path.name, path.stat().st_size)
    return Checkpoint(path, created, path.stat().st_size)


# -- copies in the object store (repositories with a store) -------------------------------

REMOTE = "index/"  # the object names' prefix of the checkpoints in the store
KEEP_REMOTE = 5  # checkpoints kept in the store
PUSH_MIN = 10.0  # seconds between two pushes after uploads (a stream of small points)
_pushed = {"at": 0.0}  # when this process last pushed one


def push(repo: Repository) -> str:
    """Take a checkpoint and upload it to the store as a new, immutable object (its name
    is its time), with rpfs.json as it is now (`config set` changes it after init), then
    drop the store's oldest beyond KEEP_REMOTE; the object's name. The copy comes from
    one read transaction (`take`): writers go on meanwhile."""
    tiered = repo.store.backend
    if not isinstance(tiered, TieredBackend):
        raise RpfsError(f"{repo.root} has no store to push index checkpoints to")
    taken = take(repo)
    name = REMOTE + taken.path.name
    try:
        tiered.objects.put(name, taken.path)
        tiered.objects.put(STORE_CONFIG, config_bytes(repo.config))
        _pushed["at"] = time.monotonic()
        for old in sorted(tiered.objects.list(REMOTE), reverse=True)[KEEP_REMOTE:]:
            tiered.objects.delete(old)
    except PackUnavailable as exc:  # the store is down: the local checkpoint stands
        raise RpfsError(f"index checkpoint {taken.path.name} taken, not pushed to the "
                        f"store: {exc.filename}: {exc.strerror}") from None
    log.info("index checkpoint %s pushed to %s", taken.path.name, tiered.location)
    return name


def push_due() -> bool:
    """Whether PUSH_MIN seconds have passed since this process last pushed one (the
    daemon's upload passes push at most that often)."""
    return time.monotonic() - _pushed["at"] >= PUSH_MIN


def newest_pushed(tiered: TieredBackend) -> float | None:
    """When the newest checkpoint in the store was taken (None: there is none)."""
    found = [t for name in tiered.objects.list(REMOTE)
             if (t := _created(name[len(REMOTE):])) is not None]
    return max(found, default=None)



def cover_new_point(repo: Repository) -> None:
    """After a capture's point commits: a checkpoint that holds it. A failure does not
    undo the point; it is logged, and the next checkpoint covers the point."""
    try:
        take(repo)
    except RpfsError as exc:
        log.warning("%s; the new point is not in a checkpoint yet", exc)


# -- probing (in a child process) ---------------------------------------------------------


@dataclass
class Probe:
    """What reading an index file showed."""

    problem: str | None  # None: it opens and reads cleanly
    points: list[str] | None = None  # DISK@POINT it lists (None: not readable at all)
    config: dict | None = None
    maps: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)  # lineage, file, states

    @property
    def good(self) -> bool:
        return self.problem is None


def probe(
    path: Path, expect: dict | None = None, block_size: int | None = None
) -> Probe:
    """Read the index data file at `path` in a child process, which a damaged file may
    kill. `expect`: the config it must have been made with. `block_size`: also salvage
    the block maps of its writable disks (name -> (lineage, file id, states))."""
    try:
        mdbfile.check(path)
        header = None
    except mdbfile.DataFileError as exc:
        header = str(exc)
        if not path.exists() or path.stat().st_size == 0:
            return Probe(header)

    def read(emit: Callable[[str, object], None]) -> None:
        index = Index(path, copy=True, check=header is None)
        emit("config", index.recorded)
        with index.read() as txn:
            emit("points", index.salvage_points(txn))
            for disk in index.list_disks(txn) if block_size else ():
                if disk.writable:
                    nblocks = ceil_div(disk.size, block_size)
                    states = BlockMap.stored(index, txn, disk.file_id, nblocks)
                    emit(f"map:{disk.name}", (disk.lineage, disk.file_id, bytes(states)))
        index.verify_records()
        index.walk()
        emit("ok", True)

    frames, ended = _in_child(read)
    problem = header or ended or (None if frames.get("ok") else "it could not be read")
    config = frames.get("config")
    if problem is None and expect is not None and config != expect:
        problem = f"it was made with {config}, rpfs.json says {expect}"
    found = Probe(problem, frames.get("points"), config)
    for name, value in frames.items():
        if name.startswith("map:"):
            found.maps[name[4:]] = value
    return found


def _in_child(fn: Callable[[Callable[[str, object], None]], None]) -> tuple[dict, str | None]:
    """Run fn(emit) in a forked child: what it emitted (name -> value) before it ended,
    and why it ended early (None if fn returned). The caller must have no threads."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into the caller's code
        try:
            os.close(rfd)
            with os.fdopen(wfd, "wb") as out:

                def emit(name: str, value: object) -> None:
                    pickle.dump((name, value), out)
                    out.flush()

                try:
                    fn(emit)
                except Exception as exc:
                    emit("error", exc.detail if isinstance(exc, IndexDamaged) else str(exc))
        finally:
            os._exit(0)
    os.close(wfd)
    frames: dict = {}
    with os.fdopen(rfd, "rb") as inp:
        while True:
            try:
                name, value = pickle.load(inp)
            except (EOFError, pickle.UnpicklingError):
                break
            frames[name] = value
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return frames, f"reading it killed the reader ({signal.Signals(os.WTERMSIG(status)).name})"
    return frames, frames.get("error")


def survey(root: Path) -> list[tuple[Checkpoint, Probe]]:
    """Every checkpoint, newest first, with what reading it showed (`--list`)."""
    expect = load_config(root).recorded()
    return [(c, probe(c.path, expect)) for c in list_checkpoints(root)]


# -- restore ------------------------------------------------------------------------------


@dataclass
class DiskFix:
    """What the restore did to one writable disk."""

    name: str
    kept_writes: int = 0  # ABSENT blocks whose local bytes are newer: now DIRTY
    ambiguous: int = 0  # local bytes a rollback may have dropped: left ABSENT
    dropped_points: list[str] = field(default_factory=list)  # were still archiving
    missing_file: bool = False


@dataclass
class RestoreReport:
    checkpoint: Checkpoint
    points: int  # in the restored index (without the dropped ones)
    damage: str  # what was wrong with the index it replaced
    kept_at: Path | None  # where that index now is
    skipped: list[tuple[Checkpoint, str]]  # newer checkpoints that were bad, and why
    lost: list[str] | None  # points newer than the checkpoint (None: cannot be known)
    lost_from: list[str]  # where `lost` was read
    disks: list[DiskFix]
    orphans: list[str]  # local files no restored disk names (disks made after it)
    chunks: int  # chunks checked against the packs
    bad_chunks: list[str]  # "PACK:OFFSET reason" of those that failed


def restore(root: Path, force: bool = False, verify_data: bool = False) -> RestoreReport:
    """Put the newest good checkpoint back as the index (see the module docstring)."""
    config = load_config(root)
    expect = config.recorded()
    fds = lock_everything(root)
    try:
        _check_unused(root / "index")
        skipped: list[tuple[Checkpoint, str]] = []
        chosen: tuple[Checkpoint, Probe] | None = None
        for candidate in list_checkpoints(root):
            found = probe(candidate.path, expect)
            if found.good:
                chosen = candidate, found
                break
            skipped.append((candidate, found))
        if chosen is None:
            why = "; ".join(f"{c.path.name}: {p.problem}" for c, p in skipped)
            raise RpfsError(
                f"no good index checkpoint in {root / CHECKPOINTS}"
                f"{f' ({why})' if why else ''}; the index cannot be restored from one"
            )
        live = probe(root / "index" / "data.mdb", block_size=config.block_size)
        if live.good and not force:
            raise RpfsError(
                f"the index {root / 'index'} is not damaged (it opens and reads cleanly); "
                f"restoring {chosen[0].path.name} would lose what changed since it was "
                "taken: pass --force to do it anyway"
            )
        sources = [("the index it replaces", live)] + [
            (f"newer checkpoint {c.path.name}", p) for c, p in skipped
        ]
        seen = [(where, p.points) for where, p in sources if p.points is not None]
        lost = sorted({ref for _, refs in seen for ref in refs} - set(chosen[1].points or ()))
        report = RestoreReport(
            checkpoint=chosen[0], points=0,
            damage=live.problem or "it was not damaged: --force", kept_at=None,
            skipped=[(c, p.problem) for c, p in skipped],
            lost=lost if seen else None, lost_from=[where for where, _ in seen],
            disks=[], orphans=[], chunks=0, bad_chunks=[],
        )
        _build(root, config.block_size, report, live, verify_data)
        return report
    finally:
        for fd in fds:
            os.close(fd)


def _check_unused(index_dir: Path) -> None:
    """No process has the index open: LMDB locks the first byte of lock.mdb in every
    process that has the index open, and swapping the file under one would corrupt it."""
    try:
        fd = os.open(index_dir / "lock.mdb", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        raise RpfsError(
            f"the index {index_dir} is open in another process (an rpfs command still "
            "runs); let it finish or stop it, then try again"
        ) from None
    finally:
        os.close(fd)


def _build(
    root: Path, block_size: int, report: RestoreReport, live: Probe, verify_data: bool
) -> None:
    """Make the new index beside the old one, fix it up, check it, swap it in."""
    work = root / "index.restoring"
    shutil.rmtree(work, ignore_errors=True)  # ours, left by an interrupted restore
    work.mkdir(mode=0o700)
    shutil.copyfile(report.checkpoint.path, work / "data.mdb")
    os.chmod(work / "data.mdb", 0o600)
    index = Index(work)
    try:
        with index.write() as txn:
            disks = [d for d in index.list_disks(txn) if d.writable]
            report.disks = [
                _fix_disk(root, index, txn, d, block_size, live.maps.get(d.name)) for d in disks
            ]
            packs = pack_backend(root, load_config(root)).list()
            index.raise_counter(txn, "pack", max(packs, default=0))
            index.raise_counter(txn, "file", _highest(root / "disks", ".raw"))
            report.points = len(index.list_points(txn))
        named = {d.file for d in disks}
        report.orphans = sorted(
            f"disks/{p.name}" for p in (root / "disks").glob("*.raw")
            if f"disks/{p.name}" not in named
        )
        report.chunks, report.bad_chunks = _check_packs(root, index, block_size, verify_data)
    finally:
        index.close()
    with open(work / "data.mdb", "rb") as f:  # the copied pages, not only the fixes
        os.fsync(f.fileno())
    fsync_dir(work)
    if (root / "index").exists():
        report.kept_at = root / f"index.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S}Z"
        os.rename(root / "index", report.kept_at)
    os.rename(work, root / "index")
    fsync_dir(root)
    log.info("index restored from checkpoint %s", report.checkpoint.path.name)


def _highest(folder: Path, suffix: str) -> int:
    """The highest number among the NNNNNNNN<suffix> files of `folder` (0 if none)."""
    stems = (p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))
    return max((int(stem) for stem in stems if stem.isdigit()), default=0)


def _fix_disk(
    root: Path, index: Index, txn, disk: DiskRecord, bs: int,
    newer: tuple[int, int, bytes] | None,
) -> DiskFix:
    """Make a writable disk's restored map keep every write its local file holds."""
    fix = DiskFix(disk.name)
    disk.clean = False
    index.put_disk(txn, disk)
    nblocks = ceil_div(disk.size, bs)
    states = BlockMap.stored(index, txn, disk.file_id, nblocks)
    before = bytes(states)
    pending = [p for p in index.list_points(txn, disk.name)
               if p.state != PointState.COMPLETE and p.lineage == disk.lineage]
    if pending:
        # Undo the snapshot: its points go, what it archived goes back to DIRTY.
        oldest = min(p.gen for p in pending)
        for point in pending:
            index.delete_point(txn, point.disk, point.name)
            fix.dropped_points.append(point.ref)
        for block in truncate(index, txn, index.get_lineage(txn, disk.lineage), oldest):
            if states[block] == PRESENT:
                states[block] = DIRTY
        states[:] = states.replace(bytes([FROZEN]), bytes([DIRTY]))
    try:
        src = Source.open(root / disk.file)
    except RpfsError:
        fix.missing_file = True
        return fix
    try:
        chain = index.chain(txn, disk.lineage, MAX_GEN)
        rolled_back = sum(disk.name in lin.disks for lin in index.list_lineages(txn)) > 1
        # The damaged index's map of the same lineage and file knows which blocks are local.
        known = newer[2] if newer is not None and newer[:2] == (disk.lineage, disk.file_id) else b""
        zero = bytes(bs)
        for first, end in block_runs(src.data_extents(), bs, nblocks):
            for block in range(first, end):
                if states[block] != ABSENT:
                    continue
                raw = src.read(block * bs, bs)
                if (ZERO if raw == zero else digest(raw)) == index.resolve(txn, chain, block):
                    states[block] = PRESENT
                elif not rolled_back or known[block : block + 1] not in (b"", bytes([ABSENT])):
                    states[block] = DIRTY
                    fix.kept_writes += 1
                else:
                    fix.ambiguous += 1
    finally:
        src.close()
    BlockMap.store_changed(index, txn, disk.file_id, before, states)
    return fix


def _check_packs(
    root: Path, index: Index, block_size: int, verify_data: bool
) -> tuple[int, list[str]]:
    """Check every chunk the index names against its pack record: there, with the header
    the index expects (with `verify_data`: also decoded and its BLAKE3 compared). The bad
    ones are marked for verify in `index`. A pack that cannot be read now (an I/O error)
    stops the check: its chunks are not known to be bad, and a retry may read them."""
    with index.read() as txn:
        chunks = sorted(index.iter_chunks(txn), key=lambda c: (c[1].pack, c[1].offset))
    store = PackStore(pack_backend(root, load_config(root)), block_size)
    bad: list[tuple[bytes, str]] = []
    try:
        for chunk_digest, loc in chunks:
            where = f"{pack_name(loc.pack)}:{loc.offset}"
            try:
                if verify_data:
                    store.get(loc, chunk_digest, full=True)
                    continue
                head = store.backend.read(loc.pack, loc.offset, HEADER.size)
            except PackMissing:
                bad.append((chunk_digest, f"{where} (the pack file is missing)"))
                continue
            except CorruptChunk as exc:
                bad.append((chunk_digest, f"{where} ({exc.reason})"))
                continue
            if len(head) < HEADER.size:
                bad.append((chunk_digest, f"{where} (past the end of the pack)"))
                continue
            magic, _, stored, length = HEADER.unpack(head)
            if magic != MAGIC or stored != chunk_digest or HEADER.size + length != loc.length:
                bad.append((chunk_digest, f"{where} (the record header does not match the index)"))
    finally:
        store.close()
    if bad:
        now = time.time()
        with index.write() as txn:
            for chunk_digest, _ in bad:
                index.mark_suspect(txn, chunk_digest, now)
    return len(chunks), [what for _, what in bad]
