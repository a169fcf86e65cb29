"""`rpfs info` and `rpfs check`: the repository as a whole, through the disk service
(the daemon's when one serves the repository, else one in this process)."""

from __future__ import annotations

import argparse

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
    ("dedup_ratio", "dedup ratio", lambda v: "-" if v is None else f"{v:.2f}x"),
    ("compression_ratio", "compression ratio", lambda v: "-" if v is None else f"{v:.2f}x"),
)


def cmd_info(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        figures = service.info()
    if args.json:
        print_json(figures)
        return 0
    width = max(len(label) for _, label, _ in _INFO_ROWS)
    for key, label, show in _INFO_ROWS:
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
