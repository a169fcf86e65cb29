"""Uploading sealed packs to the object store (repositories with a store only).

A pack is uploaded once no writer appends to it any more (`fence.sealed`, the rule GC
uses) and the index names records in it. Each upload is three steps, each durable before
the next, so a kill anywhere repeats at most the last PUT of one pack under its own name
(immutable: the same bytes again) and loses nothing:

1. `stored` record "uploading" with this process's pid (another uploader leaves a pack
   whose uploader is alive alone; a dead one's is taken over), unless GC retired the pack;
   a PUT that fails drops the record again (the next pass, of any process, retries);
2. the PUT of the whole file (obstore streams it in parts);
3. `stored` record "stored", then the local file is renamed into the cache; unless GC
   retired the pack during the PUT (it dropped the record): then the object just put is
   deleted, so none outlives GC's delete (maintenance/gc.py, "The store").

The daemon runs a pass every few seconds (serve/daemon.py) and `rpfs store sync` one on
demand. A pass that cannot reach the store stops at its first failure and says why:
what is pending stays pending, and the next pass tries again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .fence import fence, retired
from .names import fmt_bytes
from .progress import ProgressFn
from .repo import Repository
from .store.backend import PackMissing, PackUnavailable
from .store.format import pack_name
from .store.s3 import StoreRefused
from .store.tiered import TieredBackend, object_name

log = logging.getLogger(__name__)

UPLOADING, STORED = "uploading", "stored"


@dataclass
class Pass:
    """What one upload pass did."""

    packs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None  # why it stopped early (the store unreachable, refused)
    uploaded: list[int] = field(default_factory=list)


def backend(repo: Repository) -> TieredBackend | None:
    """The repository's tiered backend, None for a local repository."""
    b = repo.store.backend
    return b if isinstance(b, TieredBackend) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending(repo: Repository) -> dict[int, int]:
    """Pack -> bytes of every pack not in the store yet (its local file is all there is)."""
    tiered = backend(repo)
    if tiered is None:
        return {}
    out = {}
    for pack in tiered.pending.list():
        try:
            out[pack] = tiered.pending.size(pack)
        except OSError:
            continue  # moved into the cache meanwhile
    return out


class Uploader:
    """Uploads a repository's sealed packs; one pass at a time per process."""

    def __init__(self, repo: Repository) -> None:
        tiered = backend(repo)
        if tiered is None:
            raise ValueError(f"{repo.root} has no store")
        self.repo = repo
        self.tiered = tiered
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.totals = Pass()
        self.stopping = threading.Event()  # the daemon is stopping: no next pack
        # packs were uploaded since the last index checkpoint was pushed (set under the
        # pass's lock, so a `store sync` that finds nothing left to upload still sees it)
        self.unpushed = False

    def run(self, packs: list[int] | None = None, progress: ProgressFn | None = None) -> Pass:
        """Upload every sealed, named, pending pack (or just `packs`, which the caller
        knows are sealed: GC's copies); stops at the first store failure."""
        with self._lock:
            t0 = time.monotonic()
            out = Pass()
            todo = self._todo() if packs is None else sorted(packs)
            total = sum(self._size(p) for p in todo)
            for pack in todo:
                if self.stopping.is_set():
                    break
                try:
                    size = self._upload(pack)
                except (PackUnavailable, StoreRefused) as exc:
                    out.error = _said(exc)
                    self.last_error, self.last_error_at = out.error, time.time()
                    log.warning("upload of pack %s stopped: %s (it stays pending; the "
                                "next pass tries again)", pack_name(pack), out.error)
                    break
                if size is None:
                    continue
                out.packs += 1
                out.bytes += size
                out.uploaded.append(pack)
                if progress is not None:
                    progress(out.bytes, total)
            else:
                self.last_error = None
            out.seconds = time.monotonic() - t0
            self.unpushed = self.unpushed or bool(out.packs)
            self.totals.packs += out.packs
            self.totals.bytes += out.bytes
            return out

    def _size(self, pack: int) -> int:
        try:
            return self.tiered.pending.size(pack)
        except OSError:
            return 0

    def _todo(self) -> list[int]:
        """The pending packs an upload may take now: sealed and named by the index (a
        pack nothing names is a crash's leftover, for GC to delete)."""
        local = self.tiered.pending.list()
        if not local:
            return []
        wall = fence(self.repo)
        with self.repo.index.read() as txn:
            named = set(self.repo.index.pack_stats(txn))
        return [p for p in local if wall.sealed(p) and p in named]

    def _upload(self, pack: int) -> int | None:
        """One pack through the three steps; its size, None if another uploader has it,
        it is stored already, or GC retired it."""
        index = self.repo.index
        path = self.tiered.pending.path(pack)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        with index.write() as txn:
            state = index.pack_state(txn, pack)
            if state is not None and state["state"] == STORED:
                stored = True
            elif pack in retired(index, txn) or (
                    state is not None and state.get("pid") not in (None, os.getpid())
                    and _alive(state["pid"])):
                return None
            else:
                stored = False
                index.put_pack_state(txn, pack, UPLOADING, size, time.time(), os.getpid())
        if not stored:
            log.info("uploading pack %s (%d bytes) to %s", pack_name(pack), size,
                     self.tiered.location)
            try:
                self.tiered.upload(pack)
            except (FileNotFoundError, PackMissing):  # GC deleted the local file first
                if path.exists():
                    raise
                return None
            except (PackUnavailable, StoreRefused):  # no PUT under way: anyone may retry
                with index.write() as txn:
                    state = index.pack_state(txn, pack)
                    if state is not None and state.get("pid") == os.getpid():
                        index.drop_pack_state(txn, pack)
                raise
            with index.write() as txn:
                kept = index.pack_state(txn, pack) is not None
                if kept:
                    index.put_pack_state(txn, pack, STORED, size, time.time())
            if not kept:
                log.info("pack %s: retired by gc during its upload; its object is deleted",
                         pack_name(pack))
                self.tiered.objects.delete(object_name(pack))
                return None
        self.tiered.stored(pack)
        return None if stored else size


def _said(exc: Exception) -> str:
    """An upload's failure in one line: the object and why (a StoreRefused says both)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def status(repo: Repository, uploader: Uploader | None) -> dict:
    """`rpfs store status`: what is pending, stored and cached, the requests so far in
    this process (the daemon's, when it answers), and the last upload failure."""
    tiered = backend(repo)
    if tiered is None:
        raise StoreRefused(f"{repo.root} keeps its packs locally: it has no store "
                           "(rpfs init --store makes one that has)")
    waiting = pending(repo)
    with repo.index.read() as txn:
        states = repo.index.pack_states(txn)
    stored = {p: r for p, r in states.items() if r["state"] == STORED}
    limit = tiered.objects.config.backlog_warn
    backlog = sum(waiting.values())
    out = {
        "store": tiered.location,
        "endpoint": repo.config.store.get("endpoint") if repo.config.store else None,
        "pending_packs": len(waiting),
        "pending_bytes": backlog,
        "stored_packs": len(stored),
        "stored_bytes": sum(r["size"] for r in stored.values()),
        "cache_bytes": tiered.cache.used,
        "cache_limit": tiered.cache.limit,
        "gets": tiered.gets,
        "get_bytes": tiered.get_bytes,
        "cache_misses": tiered.cache.misses,
        "uploaded_packs": uploader.totals.packs if uploader else 0,
        "uploaded_bytes": uploader.totals.bytes if uploader else 0,
        "last_error": uploader.last_error if uploader else None,
        "last_error_at": uploader.last_error_at if uploader else None,
        "backlog_warn": limit,
        "warning": None,
    }
    if backlog > limit:
        out["warning"] = (f"{fmt_bytes(backlog)} wait for upload, more than the "
                          f"backlog's warning bound {fmt_bytes(limit)}: "
                          + (f"the store fails ({out['last_error']})" if out["last_error"]
                             else "the store is slower than the writes"))
    return out
