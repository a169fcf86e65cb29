"""`rpfs info`, `rpfs check`, `rpfs gc` and `rpfs verify`: the repository as a whole,
through the disk service (the daemon's when one serves the repository, else one in this
process)."""

from __future__ import annotations

import argparse
import sys

from ..lifecycle.clock import parse_duration
from ..names import fmt_bytes
from ..progress import progress_bar
from ..repo import repo_path
from ..serve.control import disk_service
from .output import print_json

_INFO_ROWS = (  # key, label, how to show it
    ("disks", "disks", str), ("writable_disks", "writable disks", str),
    ("points", "points", str), ("trash_points", "points in the trash", str),
    ("packs", "packs", str),
    ("logical_bytes", "logical (all points)", fmt_bytes),
    ("allocated_bytes", "allocated (all points)", fmt_bytes),
    ("stored_bytes", "stored (live)", fmt_bytes),
    ("pack_bytes", "in pack files", fmt_bytes),
    ("dead_bytes", "dead (gc frees)", fmt_bytes),
    ("local_bytes", "local disk files", fmt_bytes),
    ("store_packs", "packs in the store", str),
    ("store_bytes", "in the store", fmt_bytes),
    ("store_retired_packs", "retired (deleted after the grace)", str),
    ("pending_packs", "packs pending upload", str),
    ("pending_bytes", "pending upload", fmt_bytes),
    ("cache_bytes", "in the read cache", fmt_bytes),
    ("dedup_ratio", "dedup ratio", lambda v: "-" if v is None else f"{v:.2f}x"),
    ("compression_ratio", "compression ratio", lambda v: "-" if v is None else f"{v:.2f}x"),
)


def cmd_info(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        figures = service.info()
    if args.json:
        print_json(figures)
        return 0
    rows = [row for row in _INFO_ROWS if row[0] in figures]  # the store's: with one only
    width = max(len(label) for _, label, _ in rows)
    for key, label, show in rows:
        print(f"{label + ':':<{width + 1}}  {show(figures[key])}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service, progress_bar("check") as bar:
        report = service.check(progress=bar)
    if args.json:
        print_json(report)
    else:
        checked = ", ".join(f"{n} {what}" for what, n in report["checked"].items())
        for finding in report["problems"]:
            print(f"problem: {finding['problem']}\n  what to do: {finding['fix']}")
        for item in report["reclaimable"]:
            print(f"reclaimable: {item}")
        print(f"checked {checked}: " + ("clean" if report["clean"] else
                                        f"{len(report['problems'])} problems"))
    return 0 if report["clean"] else 1


def cmd_verify(args: argparse.Namespace) -> int:
    limit = None if args.max_duration is None else parse_duration(args.max_duration)
    with disk_service(repo_path(args.repo)) as service, progress_bar("verify") as bar:
        report = service.verify(points=args.points or None, max_duration=limit, progress=bar)
    complete = report["sound"] and not report["unreadable"]
    if args.json:
        print_json(report)
        return 0 if complete else 1
    for entry in report["bad"]:
        print(f"bad chunk {entry['chunk'][:16]} (pack {entry['pack']} offset "
              f"{entry['offset']}): {entry['error']}")
        for reader in entry["readers"]:
            ranges = ", ".join(f"bytes {start}-{start + length - 1} ({fmt_bytes(length)})"
                               for start, length in reader["ranges"])
            trash = " (in the trash)" if reader["in_trash"] else ""
            print(f"  read by {reader['point']}{trash} at {ranges}")
        if not entry["readers"]:
            print("  read by no point")
    left = (f"; stopped at --max-duration, {report['packs_left']} packs left for the next run"
            if report["stopped_early"] else "")
    verdict = "sound" if report["sound"] else (
        f"{len(report['bad'])} bad chunks (reads of them fail; a capture or snapshot of the "
        "same content heals them)")
    unread = (f"; {report['unreadable']} chunks cannot be read now and are not verified (the "
              "next run tries them again)" if report["unreadable"] else "")
    print(f"verified {report['chunks_verified']} chunks ({fmt_bytes(report['bytes_verified'])})"
          f"{left}: {verdict}{unread}")
    return 0 if complete else 1


def cmd_gc(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service, progress_bar("gc") as bar:
        result = service.gc(threshold=args.threshold, dry_run=args.dry_run, progress=bar)
    if args.json:
        print_json(result)
        return 1 if result["stopped"] else 0
    would = "would free" if args.dry_run else "freed"
    print(f"{would} {result['chunks_freed']} chunks ({fmt_bytes(result['bytes_freed'])}); "
          f"{'would compact' if args.dry_run else 'compacted'} {result['packs_compacted']} "
          f"packs ({fmt_bytes(result['bytes_copied'])} copied), "
          f"{'would delete' if args.dry_run else 'deleted'} {result['packs_deleted']}")
    if result["chunks_deferred"]:
        print(f"{result['chunks_deferred']} unreferenced chunks wait for writers running "
              "since they became free (the next gc frees them)")
    print(f"pack files: {fmt_bytes(result['pack_bytes_before'])} -> "
          f"{fmt_bytes(result['pack_bytes_after'])}")
    if result["objects_deleted"] or result["objects_waiting"]:
        print(f"store: {result['objects_deleted']} objects of retired packs deleted, "
              f"{result['objects_waiting']} wait for the reader grace")
    if result["stopped"]:
        print(f"rpfs: error: gc stopped early: {result['stopped']}", file=sys.stderr)
        return 1
    return 0
