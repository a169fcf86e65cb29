"""The commands on writable disks, all through the disk service (the daemon's when one
serves the repository, else one in this process): disk create/delete, disks, clone,
hydrate, snapshot, rollback."""

from __future__ import annotations

import argparse
import sys

from ..disks.catalog import read_catalog
from ..index import PointState
from ..names import fmt_bytes, parse_point_ref, parse_size
from ..progress import progress_bar
from ..repo import Repository, repo_path
from ..serve.control import disk_service
from .marks import expiry_of
from .output import fmt_origins, print_json, print_table


def cmd_clone(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        disk = service.clone(source=args.source, name=args.name)
    print(f"disk {disk['name']}: cloned from {args.source} ({fmt_bytes(disk['size'])})")
    return 0


def cmd_disk_create(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        disk = service.create(name=args.name, size=parse_size(args.size))
    print(f"disk {disk['name']}: created, {fmt_bytes(disk['size'])}")
    return 0


def cmd_disk_delete(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        result = service.delete(name=args.name, force=args.force, with_points=args.with_points)
    points = result["points"]
    deleted = f"deleted with {len(points)} point(s): {', '.join(points)}" if points else "deleted"
    detached = f"; now independent of it: {', '.join(result['detached'])}" if result[
        "detached"] else ""
    print(f"disk {args.name}: {deleted}{detached}")
    return 0


def cmd_disks(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        disks = service.disks()
    if args.json:
        print_json(disks)
        return 0
    rows = [
        [
            d["name"], fmt_bytes(d["size"]),
            fmt_origins(d),
            "-" if d["hydrated_pct"] is None else f"{d['hydrated_pct']:.1f}%",
            d["state"] + (f", archiving stalled: {d['stalled']}" if d.get("stalled") else ""),
        ]
        for d in disks
    ]
    print_table(["DISK", "SIZE", "ORIGIN", "HYDRATED", "STATE"], rows)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    expires = expiry_of(args)
    with disk_service(repo_path(args.repo)) as service:
        points = service.snapshot(disks=args.disks, name=args.name,
                                  description=args.description, expires=expires)
    for p in points:
        if p["rides"]:
            print(f"{p['disk']}@{p['name']}: taken ({p['method']}; nothing written since the "
                  "point still archiving, complete with it)")
        else:
            print(f"{p['disk']}@{p['name']}: taken ({p['method']}, {p['frozen_blocks']} "
                  "blocks to archive)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    disk = parse_point_ref(args.point)[0]
    with Repository(root) as repo:
        points = read_catalog(repo, disk).points
    pending = [s.record for s in points
               if s.record.state == PointState.ARCHIVING and s.rides_on is None]
    for p in pending:  # the rollback waits for them: say why it takes a while
        print(f"rpfs: {p.disk}@{p.name} is still being archived ({p.archived_blocks} of "
              f"{p.frozen_blocks} blocks); the rollback waits for it", file=sys.stderr)
    with disk_service(root) as service:
        result = service.rollback(point=args.point)
    print(f"disk {result['disk']}: rolled back to {args.point} "
          f"({result['blocks_to_fetch']} blocks will be fetched again)")
    return 0


def cmd_hydrate(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service, progress_bar(
        f"hydrate {args.name}"
    ) as bar:
        result = service.hydrate(name=args.name, progress=bar)
    print(f"disk {args.name}: hydrated ({fmt_bytes(result['bytes_fetched'])} copied)")
    return 0

