"""The daemon's life: lock the repository, mount, tune the mount, serve, unmount.

It serves the images over FUSE (a mount point), over NBD (serve/nbd.py, an address), or
both, from one set of open disks, caches and locks. `rpfs mount` starts this in a child
process and returns when it reports ready (or relays its error); `rpfs serve --nbd`
runs it in the foreground without a mount; under systemd (`rpfs mount --foreground`,
contrib/systemd) it tells systemd too. SIGTERM, SIGINT and `fusermount3 -u` all end it
with a clean unmount. While
it serves it persists open disks' block maps, takes index checkpoints, moves expired
points to the trash, purges the trash of points whose trash period is over, and runs the
disks' policies (scheduled points and their retention) and, at the repository's
intervals, its own gc and a turn of rolling verify.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from .. import checkpoint, perms
from ..disks.service import DiskService
from ..errors import RpfsError
from ..lifecycle.clock import iso
from ..repo import Repository
from ..store.backend import PackUnavailable
from ..store.cache import ChunkCache
from ..store.s3 import StoreUnreachable
from .control import serve_control
from .fuse import Operations
from .handles import Images
from .mounts import is_dead, mount_at, table_path
from .nbd import Address, Exports, listen, serve_nbd
from .readqueue import ReadQueue
from .sdnotify import notify
from .vfs import Access, Tree

log = logging.getLogger(__name__)

SYNC_INTERVAL = 2.0  # seconds between block-map persists of open disks
READ_AHEAD_KB = 1024  # the default 128 KiB caps sequential reads well below the ceiling
EXPIRE_INTERVAL = 60.0  # seconds between checks of on-demand points' expiry
RELAYED_CORRECTIONS = 20  # repository mode corrections shown by `rpfs mount` (all are logged)
PURGE_EVERY = 300.0  # seconds between looks for points whose trash period is over
SCHEDULE_INTERVAL = 30.0  # seconds between turns of the policies' schedules and retention
UPKEEP_LOOK = 300.0  # seconds between looks at whether gc or verify is due
UPLOAD_EVERY = 2.0  # seconds between upload passes (repositories with a store)


M_ARENA_MAX = -8  # a mallopt parameter (glibc's malloc.h)


def limit_malloc_arenas() -> None:
    """Keep freed memory from piling up in per-thread malloc arenas (glibc).

    glibc gives threads that contend for malloc arenas of their own (up to 8 per core)
    and keeps what is freed in each; trio's worker threads come and go. Measured on a
    1 GiB point and its clone (cold reads, fio, copy-on-read, hydrate): peak RSS 183 MiB
    with the default, 98 MiB with two arenas, read speed the same within the noise. (A
    fixed 128 KiB mmap threshold saved 3 MiB more but cost ~10 % of cold sequential reads:
    every 1 MiB buffer became a fresh mmap.) Call before any thread starts.
    """
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: its allocator has its own ways
        log.debug("mallopt is not available; malloc keeps its defaults")


def tune_readahead(mountpoint: Path) -> None:
    """Raise the mount's readahead so buffered sequential reads come in 1 MiB pieces.

    The mount must already answer requests (it stats its own root to find its bdi).
    """
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.warning("cannot set %s to %d KiB: %s", path, READ_AHEAD_KB, exc)


@dataclass(frozen=True)
class MountOptions:
    """How the daemon serves: see Access for who may use the mount."""

    access: Access = field(default_factory=Access)
    hydrate: bool = False  # copy every clone's missing blocks locally in the background
    nonempty: bool = False  # mount over a directory that holds files (hiding them)
    nbd: Address | None = None  # NBD exports listen here too
    # the kernel caches buffered writes to disk images until fsync, close or a snapshot
    writeback: bool = False


def _check_mountpoint(root: Path, mountpoint: Path, nonempty: bool) -> None:
    """Refuse a mount point the daemon cannot serve.

    Inside the repository (or at it), the daemon's own opens of repository files would
    come back to its own mount: it waits on itself for ever (D state), and `rpfs disks`
    and `umount` with it; under `disks/` a clone's new local file gets EROFS. With the
    repository inside the mount point, the mount hides the repository from everyone,
    the daemon included. A directory that holds files would have them hidden while
    mounted, which FUSE 3 does silently: only with `--nonempty`.
    """
    mount = mount_at(table_path(mountpoint))  # the table: a dead mount fails any stat
    if mount is not None:
        dead = mount.is_rpfs and is_dead(mount.path)
        raise RpfsError(
            f"{mountpoint} is already a mount point"
            f"{' (rpfs, its daemon is gone)' if dead else ''}; "
            f"{'rpfs umount' if dead else 'unmount'} it first, or choose another"
        )
    if not mountpoint.is_dir():
        raise RpfsError(f"mount point {mountpoint} is not a directory; create it first")
    mnt, repo = mountpoint.resolve(), root.resolve()
    if _within(mnt, repo):
        where = "is the repository" if mnt.samefile(repo) else "is inside the repository"
        raise RpfsError(f"mount point {mnt} {where} {repo}; choose a directory outside it")
    if _within(repo, mnt):
        raise RpfsError(
            f"the repository {repo} is inside the mount point {mnt}, which would hide it; "
            "choose a mount point outside it"
        )
    if not nonempty and any(mnt.iterdir()):
        raise RpfsError(
            f"mount point {mnt} is not empty (the mount would hide its files); empty it, "
            "choose another, or pass --nonempty"
        )


def _within(inner: Path, outer: Path) -> bool:
    """True if resolved `inner` is `outer` or lies under it, also through a bind mount
    of it (the same directory at another path): directories are compared by device and
    inode, not by name."""
    st = os.stat(outer)
    return any(os.path.samestat(os.stat(p), st) for p in (inner, *inner.parents))


async def _sync_periodically(service: DiskService) -> None:
    """Persist block-map changes (e.g. copy-on-read) of open disks every few seconds.

    A sync that fails (a full disk) keeps its changes for the next one: it must not end
    the daemon, and says so once per disk until a sync succeeds again.
    """
    failing: set[str] = set()
    while True:
        await trio.sleep(SYNC_INTERVAL)
        failed = await trio.to_thread.run_sync(service.registry.sync_changed)
        for name, exc in failed.items():
            if name not in failing:
                log.warning("disk %s: cannot persist its block map (tried again every "
                            "%g s): %s", name, SYNC_INTERVAL, exc)
        # A failed sync keeps its pages, so its disk is tried (and listed) again next time.
        failing = set(failed)


async def _every(interval: float, job: Callable[[], object], what: str) -> None:
    """Run blocking `job` in a worker thread now and then every `interval` seconds.

    A turn that fails is tried again at the next one: it must not end the daemon, which
    serves every disk. An operator's error (a full disk) or an object store that does not
    answer (a gc's LIST) is one warning line, a bug a traceback.
    """
    while True:
        try:
            await trio.to_thread.run_sync(job)
        except (RpfsError, PackUnavailable) as exc:  # the operator's, or the store down
            log.warning("%s failed (tried again in %g s): %s", what, interval, exc)
        except Exception:
            log.exception("%s failed; tried again in %g s", what, interval)
        await trio.sleep(interval)


class _Checkpoints:
    """The daemon's index checkpoints: every so often and at the end, if it changed."""

    CHECK_EVERY = 30.0  # seconds between looks at the index

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.copied: int | None = None  # txn id of the index at the last checkpoint

    def take_if_changed(self, min_age: float) -> None:
        txnid = self.repo.index.last_txnid()
        if txnid == self.copied or checkpoint.age(self.repo.root) < min_age:
            return
        try:
            if self.repo.config.store is not None:
                checkpoint.push(self.repo)  # takes one, and uploads it
            else:
                checkpoint.take(self.repo)
            self.copied = txnid  # read before the copy: a commit meanwhile is copied again
        except RpfsError as exc:
            log.warning("%s; trying again in %.0f s", exc, self.CHECK_EVERY)

    def take_if_due(self) -> None:
        """Take one when the newest is older than checkpoint.INTERVAL and the index
        changed since: new points are covered within minutes, an idle repository costs
        nothing (the daemon asks every CHECK_EVERY seconds)."""
        self.take_if_changed(checkpoint.INTERVAL)


class _TrashPurge:
    """The daemon's purge of the trash: the points whose trash period is over go, at
    start and every PURGE_EVERY seconds (a day's precision needs no more), so a
    repository served by a daemon frees their space without anyone running `rpfs trash
    purge`. The period is read at each look (`rpfs config set` changes it in the daemon).
    """

    def __init__(self, service: DiskService) -> None:
        self.service = service
        self.held: set[str] = set()  # disks whose expired points a failure holds back

    def purge_once(self) -> None:
        try:
            purged, held = self.service.purge_expired()
        except RpfsError as exc:  # e.g. the index's filesystem is full
            log.warning("cannot purge the expired trash: %s; trying again in %.0f s", exc,
                        PURGE_EVERY)
            return
        for point in purged:
            log.info("disk %s: point %s: trash period of %d days over since %s: %s",
                     point["disk"], point["name"], self.service.trash_days,
                     iso(point["purge_after"]),
                     "purged when its open image closes" if point["purge_on_close"]
                     else "purged")
        for disk, why in held.items():  # said once, until it went through
            if disk not in self.held:
                log.warning("disk %s: its expired points stay in the trash for now (%s); "
                            "tried again every %.0f s", disk, why, PURGE_EVERY)
        self.held = set(held)


class _Schedules:
    """The daemon's turns of the stored policies (lifecycle/policy.py): at start and every
    SCHEDULE_INTERVAL seconds, each policy's retention, then its scheduled point if one
    is due. A disk whose turn fails (a full disk, a name taken) is said once, until a turn
    of it goes through; the other disks go on."""

    def __init__(self, service: DiskService) -> None:
        self.service = service
        self.failing: set[str] = set()

    def turn(self) -> None:
        failed = self.service.run_policies()
        for disk, why in failed.items():
            if disk not in self.failing:
                log.warning("disk %s: its policy's turn failed (tried again every %.0f s): "
                            "%s", disk, SCHEDULE_INTERVAL, why)
        self.failing = set(failed)


def _upkeep(service: DiskService) -> None:
    """One look at the daemon's own gc and verify (see maintenance/schedule.py)."""
    ran = service.upkeep()
    if "gc" in ran:
        result = ran["gc"]
        log.info("the daemon's gc: %d chunks freed, %d packs compacted, %d deleted, pack "
                 "bytes %d -> %d%s", result["chunks_freed"], result["packs_compacted"],
                 result["packs_deleted"], result["pack_bytes_before"],
                 result["pack_bytes_after"],
                 f"; stopped: {result['stopped']}" if result["stopped"] else "")
    if "verify" in ran:
        report = ran["verify"]
        if report["sound"]:
            log.info("the daemon's verify: %d chunks sound%s", report["chunks_verified"],
                     f", {report['packs_left']} packs for the next turn"
                     if report["stopped_early"] else "")
        else:
            log.warning("the daemon's verify: %d bad chunks ('rpfs verify' names the points "
                        "that read them)", len(report["bad"]))
        if report["unreadable"]:
            log.warning("the daemon's verify: %d chunks cannot be read now, not verified "
                        "(the next turn takes their packs first)", report["unreadable"])


async def _serve(
    root: Path, mountpoint: Path | None, service: DiskService, checkpoints: _Checkpoints,
    nbd: tuple[Address, list[socket.socket], Exports] | None, on_ready,
) -> None:
    async with trio.open_nursery() as nursery:
        stopped = trio.Event()

        async def ready() -> None:
            if mountpoint is not None:
                # pyfuse3.main() is now reading requests: a stat of the root is answered,
                # so the kernel has had FUSE_INIT, which resets readahead; tune it after.
                await trio.to_thread.run_sync(tune_readahead, mountpoint)
            on_ready()
            notify("READY=1")

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("received %s: %s", signal.Signals(signum).name,
                             f"unmounting {mountpoint}" if mountpoint else "stopping")
                    stopped.set()
                    if mountpoint is not None:
                        pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(serve_control, root, service)
        nursery.start_soon(_sync_periodically, service)
        nursery.start_soon(_every, EXPIRE_INTERVAL, service.expire, "the expiry check")
        nursery.start_soon(_every, _Checkpoints.CHECK_EVERY, checkpoints.take_if_due,
                           "the index checkpoint")
        nursery.start_soon(_every, PURGE_EVERY, _TrashPurge(service).purge_once,
                           "the purge of the expired trash")
        nursery.start_soon(_every, SCHEDULE_INTERVAL, _Schedules(service).turn,
                           "the policies' turn")
        nursery.start_soon(_every, UPKEEP_LOOK, functools.partial(_upkeep, service),
                           "the daemon's gc and verify")
        if service.uploader is not None:
            nursery.start_soon(_every, UPLOAD_EVERY, service.upload_pass, "the upload pass")
        if nbd is not None:
            await nursery.start(serve_nbd, *nbd)  # listening before it reports ready
        nursery.start_soon(ready)
        if mountpoint is not None:
            await pyfuse3.main()
        else:
            await stopped.wait()
        notify("STOPPING=1")  # a signal, or an unmount from outside
        if service.uploader is not None:
            service.uploader.stopping.set()  # a pass ends after the pack it is on
        nursery.cancel_scope.cancel()


def serve(
    root: Path,
    mountpoint: Path | None,
    options: MountOptions,
    on_ready: Callable[[], None],
    on_warning: Callable[[str], None],
    on_error: Callable[[str], None],
) -> int:
    """Serve `root` at `mountpoint` (FUSE) and/or `options.nbd` until unmounted or
    signalled; returns the exit status.

    Before it is ready, the daemon reports what the operator should know (a repository
    file mode it corrected) to `on_warning`, besides its log.
    """
    # Resolved, as the mount table writes it: `rpfs umount` compares the two.
    mountpoint = mountpoint.resolve() if mountpoint is not None else None
    limit_malloc_arenas()
    try:
        repo = Repository(root)
    except RpfsError as exc:
        on_error(str(exc))
        return 1
    try:
        repo.index.verify_records()  # a damaged record fails the mount, not a request
        unreachable = None
        try:
            repo.check_store()  # credentials, bucket, endpoint: now, not at the first read
        except StoreUnreachable as exc:
            # The endpoint answered at init: no answer now is an outage, and the disks'
            # local files, the cache and what is pending still serve (a host restarting
            # during an outage keeps its VMs).
            unreachable = str(exc)
        lock_fd = repo.daemon_lock()
        try:
            if mountpoint is not None:
                _check_mountpoint(root, mountpoint, options.nonempty)
        except RpfsError:
            os.close(lock_fd)
            raise
    except RpfsError as exc:
        repo.close()
        on_error(str(exc))
        return 1
    served = {"mountpoint": str(mountpoint)} if mountpoint is not None else {}
    if options.nbd is not None:
        served["nbd"] = str(options.nbd)
    repo.record_daemon(lock_fd, {"pid": os.getpid(), **served})
    if unreachable is not None:
        log.warning("%s; serving what is here: reads of data not cached fail with EIO, and "
                    "uploads wait, until it answers", unreachable)
        on_warning(f"warning: {unreachable}; mounted anyway: reads of data not cached fail "
                   "with EIO and uploads wait until the store answers")
    corrected = perms.enforce(root)  # each is logged; the operator sees the first few
    for message in corrected[:RELAYED_CORRECTIONS]:
        on_warning(message)
    if len(corrected) > RELAYED_CORRECTIONS:
        on_warning(f"and {len(corrected) - RELAYED_CORRECTIONS} more mode corrections: see "
                   f"{root / 'rpfs.log'}")
    sockets: list[socket.socket] = []
    if options.nbd is not None:
        try:
            sockets = listen(options.nbd)
        except OSError as exc:  # the address is in use, or not ours to take
            os.close(lock_fd)
            repo.close()
            on_error(f"cannot listen for NBD at {options.nbd}: {exc.strerror or exc}")
            return 1
    cache = ChunkCache(repo)
    service = DiskService(repo, cache, background=True)
    images = Images(repo, cache, service.registry)
    reads = ReadQueue()  # one reader thread for the mount and NBD
    if mountpoint is not None:
        ops = Operations(Tree(repo.index, images, options.access), images, reads,
                         writeback=mountpoint if options.writeback else None)
        if options.writeback:
            # The kernel holds acknowledged writes: a point must contain them.
            service.flush_cached_writes = ops.flush_cached_writes
        service.registry.on_removed = ops.forget_disk
        service.registry.on_point_changed = ops.forget_point
        # default_permissions: the kernel checks the modes Access gives (root passes anyway).
        fuse_options = set(pyfuse3.default_options) | {
            "fsname=rpfs", "subtype=rpfs", "default_permissions"}
        if options.access.allow_other:
            fuse_options.add("allow_other")
        try:
            pyfuse3.init(ops, str(mountpoint), fuse_options)
        except RuntimeError as exc:
            for sock in sockets:
                sock.close()
            cache.close()
            os.close(lock_fd)
            repo.close()
            on_error(f"cannot mount at {mountpoint}: {exc}")
            return 1
    nbd = (options.nbd, sockets, Exports(images, reads)) if options.nbd is not None else None
    log.info("serving repository %s%s%s%s (pid %d)", root,
             f" at {mountpoint}" if mountpoint else "",
             " with the kernel's writeback cache" if mountpoint and options.writeback else "",
             f" over NBD at {options.nbd}" if options.nbd else "", os.getpid())
    service.registry.resume_archiving()
    if options.hydrate:
        service.start_background_hydration()
    checkpoints = _Checkpoints(repo)
    try:
        trio.run(_serve, root, mountpoint, service, checkpoints, nbd, on_ready)
    finally:
        if mountpoint is not None:
            pyfuse3.close(unmount=True)
        reads.close()
        service.registry.close_all()
        cache.close()
        checkpoints.take_if_changed(0)  # the state the disks were closed in
        repo.close()
        os.close(lock_fd)
        if mountpoint is not None:
            log.info("unmounted %s", mountpoint)
        else:
            log.info("stopped serving NBD at %s", options.nbd)
    return 0
