"""The commands that work on points in the repository directly (no daemon needed):
capture, points, restore, changed, allocated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..capture import capture
from ..disks.catalog import Catalog, PointStatus, read_catalog
from ..disks.point import open_point
from ..index import DiskRecord, LineageRecord, PointState
from ..lineage import allocated_extents, changed_extents
from ..names import check_name, fmt_bytes, parse_point_ref
from ..progress import progress_bar
from ..repo import Repository, read_daemon_info, repo_path
from ..restore import restore
from ..serve.control import RemoteService, disk_service, socket_path
from ..store.cache import ChunkCache
from .marks import expiry_of
from .output import fmt_time, print_json, print_table


def cmd_capture(args: argparse.Namespace) -> int:
    expires = expiry_of(args)  # before the repository opens: a bad one changes nothing
    with Repository(repo_path(args.repo)) as repo, progress_bar(f"capture {args.disk}") as bar:
        point = capture(
            repo,
            args.disk,
            Path(args.source),
            point=args.name,
            changed=Path(args.changed) if args.changed else None,
            progress=bar,
            description=args.description,
            expires=expires,
        )
    print(
        f"{point.ref}: {point.method}, {point.blocks_written} blocks written, "
        f"{fmt_bytes(point.bytes_stored)} stored"
    )
    with disk_service(repo_path(args.repo)) as service:  # the disk's policy, if it has one
        plan = service.apply_policy(disk=args.disk)
    removed = [p["name"] for p in plan if not p["keep"]]
    if removed:
        print(f"its policy's retention moved {len(removed)} points to the trash: "
              f"{', '.join(removed)}")
    return 0


def state_text(s: PointStatus) -> str:
    """The STATE column: complete, or how its archive stands (and why it waits)."""
    if s.record.state == PointState.COMPLETE:
        return "complete"
    stalled = f" (stalled: {s.stalled})" if s.stalled is not None else ""
    if s.rides_on is not None:
        return f"archiving with {s.rides_on.name}{stalled}"
    return f"archiving {s.archived_pct}%{stalled}"


def cmd_points(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    with Repository(root) as repo:
        stalls = _stalls(root)
        disk = None if args.disk is None else check_name(args.disk)
        catalog = read_catalog(repo, disk, stalls, with_costs=not args.tree)
    if args.tree:
        for d in catalog.disks:
            _print_tree(d, catalog)
        return 0
    if args.json:
        print_json([
            {**vars(s.record), "allocated_bytes": s.allocated_bytes,
             "block_size": catalog.block_size, **vars(s.cost),
             **({"stalled": s.stalled} if s.stalled is not None else {})}
            for s in catalog.points
        ])
        return 0
    rows = [
        [
            p.disk, p.name, fmt_time(p.created), fmt_bytes(p.size), str(p.blocks_written),
            fmt_bytes(s.allocated_bytes), fmt_bytes(p.bytes_stored),
            fmt_bytes(s.cost.owned_bytes), p.method, state_text(s),
            p.hold or "-", "-" if p.expires is None else fmt_time(p.expires), p.description,
        ]
        for s in catalog.points
        for p in [s.record]
    ]
    header = ["DISK", "POINT", "CREATED", "SIZE", "WRITTEN", "ALLOCATED", "STORED", "OWNED",
              "METHOD", "STATE", "HOLD", "EXPIRES", "DESCRIPTION"]
    print_table(header, rows)
    for d, total in sorted(catalog.disk_bytes.items()):
        print(f"{d}: {fmt_bytes(total)} stored by its points (after dedup)")
    return 0


def _stalls(root: Path) -> dict[str, str]:
    """Disks whose archive is stalled, and why: only a daemon archives in the background,
    and it keeps that in memory (its log may be on the full filesystem)."""
    return RemoteService(socket_path(root)).stalls() if read_daemon_info(root) else {}


def _print_tree(disk: DiskRecord, catalog: Catalog) -> None:
    """A disk's points by lineage; a rollback's or clone's lineage under its origin."""
    mine = {lin.id: lin for lin in catalog.lineages if disk.name in lin.disks}
    children: dict[tuple[int, int], list[LineageRecord]] = {}
    for lin in mine.values():
        if lin.parent in mine:
            children.setdefault((lin.parent, lin.parent_gen), []).append(lin)
    origin = f" (from {disk.origin})" if disk.origin else ""
    print(f"{disk.name}{origin}")

    def show(lin: LineageRecord, indent: str) -> None:
        label = "current" if lin.id == disk.lineage else "branch"
        print(f"{indent}[{label}: lineage {lin.id}]")
        for s in catalog.points:
            p = s.record
            if p.disk != disk.name or p.lineage != lin.id:
                continue
            print(f"{indent}  {p.name}  {fmt_time(p.created)}  {p.method}  {state_text(s)}")
            for child in children.pop((lin.id, p.gen), []):
                show(child, indent + "    ")
        for key in [k for k in children if k[0] == lin.id]:
            for child in children.pop(key):
                show(child, indent + "    ")

    for lin in sorted(mine.values(), key=lambda x: x.id):
        if lin.parent not in mine:
            show(lin, "  ")


def cmd_restore(args: argparse.Namespace) -> int:
    disk, name = parse_point_ref(args.point)
    with Repository(repo_path(args.repo)) as repo, ChunkCache(repo) as cache, \
            progress_bar(f"restore {args.point}") as bar:
        image = open_point(repo, cache, disk, name)
        restore(image, Path(args.target), args.force, bar)
    print(f"restored {args.point} to {args.target} ({fmt_bytes(image.size)})")
    return 0


def _print_extents(extents: list[dict], as_json: bool) -> None:
    if as_json:
        print_json(extents, indent=None)
        return
    for e in extents:
        print(f"{e['start']}\t{e['length']}")
    total = sum(e["length"] for e in extents)
    print(f"# {len(extents)} extents, {fmt_bytes(total)}", file=sys.stderr)


def cmd_changed(args: argparse.Namespace) -> int:
    with Repository(repo_path(args.repo)) as repo:
        result = changed_extents(repo, args.a, args.b)
    _print_extents(result, args.json)
    return 0


def cmd_allocated(args: argparse.Namespace) -> int:
    with Repository(repo_path(args.repo)) as repo:
        result = allocated_extents(repo, args.point)
    _print_extents(result, args.json)
    return 0
