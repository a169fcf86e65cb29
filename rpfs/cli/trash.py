"""The commands that delete points and manage the trash, through the disk service (the
daemon's when one serves the repository, so its open images are respected; else one in
this process): point delete, trash, trash purge, undelete."""

from __future__ import annotations

import argparse

from ..lifecycle.retention import KEEP_OPTIONS
from ..names import fmt_bytes
from ..repo import repo_path
from ..serve.control import disk_service
from .output import fmt_time, print_json, print_table

TRASH_OFF = "(the trash is off: trash-days is 0)"  # why a delete purged at once
ON_CLOSE = "purged when its image open in the mount closes"  # a purge an open image defers
# What each option's buckets are, for its help (UTC, as every bucket is; weeks are ISO's).
KEEP_SPANS = (None, "hours", "days", "ISO weeks", "months", "years")


def cmd_point_delete(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        done = service.delete_points(points=args.points, purge=args.purge, wait=args.wait)
    for point in done:
        where = "moved to the trash ('rpfs undelete' brings it back)"
        if point["purged"]:
            where = "deleted and purged" if args.purge else f"deleted and purged {TRASH_OFF}"
            if point["purge_on_close"]:
                where = f"deleted; {ON_CLOSE}"
        print(f"{point['disk']}@{point['name']}: {where}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    keep = {option: getattr(args, option) for option in KEEP_OPTIONS}
    with disk_service(repo_path(args.repo)) as service:
        plan = service.prune(disk=args.disk, dry_run=args.dry_run, **keep)
        trash_off = service.config()["trash_days"] == 0
    if args.json:
        print_json(plan)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    rows = [[p["name"], "keep" if p["keep"] else verb, p["rule"]] for p in plan]
    print_table(["POINT", "DECISION", "RULE"], rows)
    removed = sum(not p["keep"] for p in plan)
    if args.dry_run:
        print(f"{removed} of {len(plan)} points would go to the trash (--dry-run: nothing "
              "changed)")
    elif trash_off:
        print(f"{removed} of {len(plan)} points deleted and purged {TRASH_OFF}")
    else:
        print(f"{removed} of {len(plan)} points moved to the trash ('rpfs undelete' brings "
              "one back)")
    return 0


def cmd_undelete(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        point = service.undelete(point=args.point)
    print(f"{point['disk']}@{point['name']}: back from the trash")
    return 0


def cmd_trash(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        held = service.list_trash()
    if args.json:
        print_json(held)
        return 0
    if not held:
        print("the trash is empty")
        return 0
    rows = [
        [f"{p['disk']}@{p['name']}", fmt_time(p["created"]), fmt_bytes(p["bytes_stored"]),
         fmt_time(p["deleted_at"]),
         "when its open image closes" if p["purge_on_close"] else fmt_time(p["purge_after"])]
        for p in held
    ]
    print_table(["POINT", "CREATED", "STORED", "DELETED", "PURGED AFTER"], rows)
    return 0


def cmd_trash_purge(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        purged = service.purge_trash(points=args.points or None, expired=args.expired)
    for point in purged:
        print(f"{point['disk']}@{point['name']}: "
              f"{ON_CLOSE if point['purge_on_close'] else 'purged'}")
    if not purged:
        print("nothing to purge")
    return 0
