"""The commands that work on points in the repository directly (no daemon needed):
capture, points, restore, changed, allocated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import upload
from ..capture import capture
from ..disks.catalog import Catalog, PointStatus, read_catalog
from ..disks.history import Line
from ..disks.point import open_point
from ..index import DiskRecord, PointState
from ..lifecycle.policy import has_retention
from ..lineage import allocated_extents, changed_extents
from ..names import check_name, fmt_bytes, parse_point_ref
from ..progress import progress_bar
from ..repo import Repository, read_daemon_info, repo_path
from ..restore import restore
from ..serve.control import RemoteService, disk_service, socket_path
from ..store.cache import ChunkCache
from .marks import expiry_of
from .output import fmt_origins, fmt_time, print_json, print_table


def cmd_capture(args: argparse.Namespace) -> int:
    expires = expiry_of(args)  # before the repository opens: a bad one changes nothing
    with Repository(repo_path(args.repo)) as repo, progress_bar(f"capture {args.disk}") as bar:
        point = capture(
            repo,
            args.disk,
            args.source,
            point=args.name,
            changed=Path(args.changed) if args.changed else None,
            progress=bar,
            description=args.description,
            expires=expires,
            bitmap=args.bitmap,
        )
        retains = has_retention(repo, args.disk)
        waiting = sum(upload.pending(repo).values())
    print(
        f"{point.ref}: {point.method}, {point.blocks_written} blocks written, "
        f"{fmt_bytes(point.bytes_stored)} stored"
    )
    if waiting:
        print(f"{fmt_bytes(waiting)} of packs wait for upload to the store: "
              + ("the daemon uploads them in the background" if read_daemon_info(repo.root)
                 else "mount the repository (its daemon uploads in the background) or run "
                      "'rpfs store sync'"))
    if not retains:
        return 0
    with disk_service(repo_path(args.repo)) as service:  # the daemon's, if one runs
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
        catalog = read_catalog(repo, disk, stalls, with_costs=not args.tree,
                               with_history=args.tree)
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
            p.hold or "-", "-" if p.expires is None else fmt_time(p.expires),
            *([_in_store(s)] if catalog.has_store else []), p.description,
        ]
        for s in catalog.points
        for p in [s.record]
    ]
    header = ["DISK", "POINT", "CREATED", "SIZE", "WRITTEN", "ALLOCATED", "STORED", "OWNED",
              "METHOD", "STATE", "HOLD", "EXPIRES", *(["STORE"] if catalog.has_store else []),
              "DESCRIPTION"]
    print_table(header, rows)
    for d, total in sorted(catalog.disk_bytes.items()):
        print(f"{d}: {fmt_bytes(total)} stored by its points (after dedup)")
    return 0


def _in_store(s: PointStatus) -> str:
    """Whether every chunk the point reads is in the object store, or how much is not."""
    assert s.cost is not None
    pending = s.cost.pending_bytes
    return "in the store" if not pending else f"{fmt_bytes(pending)} pending"


def _stalls(root: Path) -> dict[str, str]:
    """Disks whose archive is stalled, and why: only a daemon archives in the background,
    and it keeps that in memory (its log may be on the full filesystem)."""
    return RemoteService(socket_path(root)).stalls() if read_daemon_info(root) else {}


def _print_tree(disk: DiskRecord, catalog: Catalog) -> None:
    """A disk's history: its points oldest first, each rollback's branch indented under
    the point it went back to, ending in `now` (the disk as it is) or `(abandoned)` (a
    later rollback left it); a captured disk is its points alone. The point columns are
    aligned across the whole tree."""
    found = catalog.histories[disk.name]
    status = {s.record.name: s for s in catalog.points if s.record.disk == disk.name}
    rows: list[tuple[str, list[str]]] = []  # (indented text, columns of a point)

    def show(line: Line, indent: str) -> None:
        for step in line.steps:
            if step.point is None:
                rows.append((indent + (f"{step.name} (deleted)" if step.name else
                                       "(a deleted point)"), []))
            else:
                s = status[step.name]
                rows.append((indent + step.name, [fmt_time(s.record.created), s.record.method,
                                                  state_text(s)]))
            for branch in step.branches:
                rows.append((f"{indent}  rolled back to {step.name or 'it'}:", []))
                show(branch, indent + "  ")
        if disk.writable:
            rows.append((indent + ("now" if line.now else "(abandoned)"), []))

    for i, line in enumerate(found.lines):
        if i:  # its start is no longer recorded (see history.lines)
            rows.append(("  rolled back to a point no longer recorded:", []))
        show(line, "  " if not i else "    ")
    origins = fmt_origins(found.origins.as_json())
    print(disk.name if origins == "-" else f"{disk.name}: {origins}")
    cells = [[text, *cols] for text, cols in rows if cols]
    widths = [max(len(c) for c in col) for col in zip(*cells, strict=True)]
    for text, cols in rows:
        if not cols:
            print(text)
            continue
        print("  ".join(c.ljust(w) for c, w in zip([text, *cols], widths, strict=True)).rstrip())


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
