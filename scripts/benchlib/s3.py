"""The `--s3` section: rpfs with its packs on an S3 store, against the same rpfs local and
restic with its S3 backend, all on the same SeaweedFS (tests/s3server.py: `weed server`
on 127.0.0.1, in the bench's temporary directory, stopped when the section ends).

Each run captures the sample's first image into a fresh local repository and into a fresh
store repository (its own prefix in the bucket), then reads the point back cold through
the mount (dd bs=1M, page cache dropped, as the local cold read of the main section): the
store repository's read cache emptied first (REPO/cache/* removed with no daemon running),
so every byte comes from ranged GETs; then, the cache emptied again, `rpfs restore` of the
point into a file (how restic reads a backup back). The store's capture is timed twice:
until the capture returns (the point is complete: its data durable locally, what the
issue's target is on) and until `rpfs store sync` has uploaded every pack ("capture until
stored"). restic backs the same image up to its own prefix and restores it with
--no-cache (nothing local). Every capture and backup starts with the page cache dropped;
every read is checked by sha256 against the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import mounts
from .measure import MB, BenchError, dd_read, drop_caches, run, timed

if TYPE_CHECKING:
    from .runner import Bench

CACHE_SIZE = "64M"  # the store repository's read cache: smaller than the data
RPFS_S3_METRICS = ["s3_capture_local_MBps", "s3_capture_MBps", "s3_capture_stored_MBps",
                   "s3_cold_read_local_MBps", "s3_cold_read_MBps", "s3_get_KiB",
                   "s3_restore_MBps"]
RESTIC_S3_METRICS = ["s3_capture_MBps", "s3_restore_MBps"]
DISK = "bench"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def start_server(root: Path):
    """The tests' SeaweedFS server under `root`, answering; a failure is a BenchError."""
    tests = str(Path(__file__).resolve().parents[2] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from s3server import S3Server

    root.mkdir(parents=True, exist_ok=True)
    server = S3Server(root, bucket="rpfs-bench")
    try:
        server.start()  # stops what it started if it fails
    except (RuntimeError, OSError, ImportError) as exc:
        raise BenchError(f"SeaweedFS did not start: {str(exc).splitlines()[0]}") from None
    return server


def bench_s3(bench: Bench) -> None:
    """rpfs local and on the store, then restic on the store, each a section of its own;
    the server is stopped whatever happens."""
    from .runner import apt_install

    sample, r = bench.sample, bench.results
    assert sample is not None
    try:
        server = start_server(bench.work / "s3")
    except BenchError as exc:
        r.note(f"s3: stopped early: {exc}")
        r.missing("rpfs", RPFS_S3_METRICS, f"not measured: {exc}")
        r.missing("restic", RESTIC_S3_METRICS, f"not measured: {exc}")
        return
    try:
        bench.say(f"s3: SeaweedFS at {server.endpoint}, up in {server.start_seconds:.1f}s")
        env = {**os.environ, **server.env()}
        digest = sha256_file(sample.base)
        with bench.section("s3 rpfs", RPFS_S3_METRICS, "rpfs"):
            bench_rpfs_s3(bench, server, env, digest)
        if not shutil.which("restic"):
            apt_install(bench, ["restic"])
        if not shutil.which("restic"):
            r.missing("restic", RESTIC_S3_METRICS, "not measured: no restic")
            return
        with bench.section("s3 restic", RESTIC_S3_METRICS, "restic"):
            bench_restic_s3(bench, server, env, digest)
    finally:
        server.stop()


def _check(bench: Bench, what: str, path: Path, digest: str) -> None:
    got = sha256_file(path)
    if got != digest:
        raise BenchError(f"{what}: CONTENT MISMATCH: sha256 {got[:16]}… of {path}, "
                         f"the image's is {digest[:16]}…")


def _cold_read(bench: Bench, repo: Path, env: dict, digest: str) -> tuple[float, dict]:
    """dd MB/s of the point through a fresh mount, page cache dropped; checked by sha256.
    With a store: the daemon's `store status` after the read (its GETs)."""
    mnt = bench.work / "mnt-rpfs-s3"
    with mounts.rpfs_mount(bench.rpfs_cmd, repo, mnt, env=env):
        path = mnt / "points" / DISK / "p1.img"
        drop_caches()
        rate = dd_read(path, bench.opts.size)
        status = {}
        if (repo / "cache").exists():
            status = json.loads(run([*bench.rpfs_cmd, "-r", repo, "store", "status", "--json"],
                                    env=env).stdout)
        _check(bench, f"rpfs point read through {mnt}", path, digest)
    return rate, status


def _empty_cache(repo: Path) -> None:
    """Remove every cached pack and segment of a store repository (no daemon running)."""
    for folder in (repo / "cache" / "packs", repo / "cache" / "segments"):
        for entry in folder.iterdir():
            entry.unlink()


def bench_rpfs_s3(bench: Bench, server, env: dict, digest: str) -> None:
    opts, r, sample = bench.opts, bench.results, bench.sample
    size_mb = opts.size / MB
    local, store = bench.work / "rpfs-s3-local", bench.work / "rpfs-s3-store"
    cap_local, cap, cap_stored, read_local, read, get_kib, uploaded, restores = (
        [], [], [], [], [], [], [], [])
    for k in range(opts.runs):
        bench.say(f"s3 rpfs: run {k + 1}/{opts.runs}: capture locally, then into the store "
                  "and store sync")
        for repo in (local, store):
            shutil.rmtree(repo, ignore_errors=True)
        run([*bench.rpfs_cmd, "-r", local, "init"], env=env)
        run([*bench.rpfs_cmd, "-r", store, "init", "--store", f"s3://{server.bucket}/rpfs-{k}",
             "--s3-endpoint", server.endpoint, "--cache-size", CACHE_SIZE], env=env)
        capture = ["capture", DISK, sample.base, "--name", "p1"]
        drop_caches()  # each capture reads the image from disk, not the one before's cache
        cap_local.append(size_mb / timed([*bench.rpfs_cmd, "-r", local, *capture], env=env))
        drop_caches()
        t0 = time.perf_counter()
        run([*bench.rpfs_cmd, "-r", store, *capture], env=env)
        t1 = time.perf_counter()
        sync = json.loads(run([*bench.rpfs_cmd, "-r", store, "store", "sync", "--json"],
                              env=env).stdout)
        t2 = time.perf_counter()
        if sync.get("error") or sync["pending_packs"]:
            raise BenchError(f"store sync left {sync['pending_packs']} packs pending: "
                             f"{sync.get('error')}")
        cap.append(size_mb / (t1 - t0))
        cap_stored.append(size_mb / (t2 - t0))
        uploaded.append(sync["bytes"])
        bench.say(f"s3 rpfs: run {k + 1}/{opts.runs}: cold reads, local, then from the store "
                  "with its cache emptied")
        read_local.append(_cold_read(bench, local, env, digest)[0])
        _empty_cache(store)
        rate, status = _cold_read(bench, store, env, digest)
        read.append(rate)
        if not status["gets"] or status["get_bytes"] < opts.size * 0.2:
            raise BenchError(f"the cold read from the store made {status['gets']} GETs of "
                             f"{status['get_bytes']} bytes: not through the store")
        get_kib.append(status["get_bytes"] / status["gets"] / 1024)
        _empty_cache(store)
        restored = bench.work / "rpfs-s3-restored.img"
        restored.unlink(missing_ok=True)
        drop_caches()
        seconds = timed([*bench.rpfs_cmd, "-r", store, "restore", f"{DISK}@p1", restored],
                        env=env) - bench.startup_s
        restores.append(size_mb / max(seconds, 1e-3))
        _check(bench, "rpfs restore", restored, digest)
        restored.unlink()
    packs = f"{sum(uploaded) / len(uploaded) / MB:.0f} MB of packs"
    r.add("rpfs", "s3_capture_local_MBps", cap_local,
          "`rpfs capture` of the first image into a local repository (the reference)")
    r.add("rpfs", "s3_capture_MBps", cap,
          f"`rpfs capture` into a repository with --store (--cache-size {CACHE_SIZE}), until "
          "it returns: the point is complete, its data durable locally (the target's figure)")
    r.add("rpfs", "s3_capture_stored_MBps", cap_stored,
          f"the same capture until `rpfs store sync` finished uploading it ({packs})")
    r.add("rpfs", "s3_cold_read_local_MBps", read_local,
          "dd bs=1M of the point through the mount, page cache dropped, local repository")
    r.add("rpfs", "s3_cold_read_MBps", read,
          "the same from the store repository with its read cache emptied: every byte by "
          "ranged GETs (sha256 checked)")
    r.add("rpfs", "s3_get_KiB", get_kib, "mean bytes per GET during that read")
    r.add("rpfs", "s3_restore_MBps", restores,
          "`rpfs restore` of the point from the store into a file, its cache emptied, page "
          "cache dropped; zero blocks as holes, fsync at the end; wall time less "
          "cli_startup_s (sha256 checked)")
    local_cap = r.get("rpfs", "s3_capture_local_MBps")
    stored = r.get("rpfs", "s3_capture_stored_MBps")
    if local_cap and stored:
        r.note(f"s3: capture until stored / local capture = {stored / local_cap:.2f} (not a "
               "target: the issue's point is complete once durable locally; the target "
               "'capture to the store ≥ 0.8 × local' is on s3_capture_MBps)")


def bench_restic_s3(bench: Bench, server, env: dict, digest: str) -> None:
    from .runner import link_source

    opts, sample = bench.opts, bench.sample
    src, target = bench.work / "peer-src", bench.work / "restic-s3-restore"
    src.mkdir(exist_ok=True)
    cache = bench.work / "restic-s3-cache"
    backups, restores = [], []
    for k in range(opts.runs):
        bench.say(f"s3 restic: run {k + 1}/{opts.runs}: backup to the store, cold restore")
        renv = {**env, "RESTIC_PASSWORD": "rpfs-bench", "RESTIC_CACHE_DIR": str(cache),
                "RESTIC_REPOSITORY": f"s3:{server.endpoint}/{server.bucket}/restic-{k}"}
        shutil.rmtree(cache, ignore_errors=True)
        run(["restic", "init", "-q"], env=renv)
        link_source(src, sample.base)
        drop_caches()
        backups.append(opts.size / MB / timed(
            ["restic", "backup", "-q", "--host", "bench", "disk.img"], env=renv, cwd=src))
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        drop_caches()
        restores.append(opts.size / MB / timed(
            ["restic", "--no-cache", "restore", "-q", "latest", "--target", target],
            env=renv))
        _check(bench, "restic restore", target / "disk.img", digest)
        shutil.rmtree(target)
    r = bench.results
    r.add("restic", "s3_capture_MBps", backups,
          "`restic backup` of the first image to s3: on the same SeaweedFS, fresh repository")
    r.add("restic", "s3_restore_MBps", restores,
          "`restic --no-cache restore latest` into a file, page cache dropped (sha256 checked)")
