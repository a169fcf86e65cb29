"""`rpfs policy set|show|clear`: the stored per-disk policies, through the disk service
(the daemon's when one serves the repository, else one in this process)."""

from __future__ import annotations

import argparse
import sys

from ..lifecycle import clock
from ..lifecycle.retention import KEEP_OPTIONS
from ..repo import read_daemon_info, repo_path
from ..serve.control import disk_service
from .output import fmt_time, print_json, print_table


def cmd_policy_set(args: argparse.Namespace) -> int:
    # Parsed before anything runs: a bad duration changes nothing.
    every = None if args.every is None else clock.parse_duration(args.every)
    keep = {option: getattr(args, option) for option in KEEP_OPTIONS}
    root = repo_path(args.repo)
    with disk_service(root) as service:
        done = service.set_policy(disk=args.disk, every=every, **keep)
    shown = done["policy"]
    removed = [p["name"] for p in done["plan"] if not p["keep"]]
    print(f"{args.disk}: policy set: {shown['summary']}")
    if removed:
        print(f"{len(removed)} of {len(done['plan'])} points moved to the trash by its "
              "retention ('rpfs trash' lists them, 'rpfs undelete' brings one back)")
    if every is not None:
        if read_daemon_info(root):
            print(f"next scheduled point: {_when(shown['next_point'])}")
        else:
            print("rpfs: warning: no daemon serves this repository: scheduled points are "
                  "taken while 'rpfs mount' runs (see README: systemd)", file=sys.stderr)
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        shown = service.policies(disk=args.disk)
    if args.json:
        print_json(shown)
        return 0
    if not shown:
        print(f"disk {args.disk} has no policy" if args.disk else "no disk has a policy")
        return 0
    rows = [[p["disk"], p["summary"],
             "-" if p["every"] is None else _when(p["next_point"])] for p in shown]
    print_table(["DISK", "POLICY", "NEXT POINT"], rows)
    return 0


def cmd_policy_clear(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        done = service.clear_policy(disk=args.disk)
    print(f"{args.disk}: policy cleared (its points stay)" if done["cleared"]
          else f"{args.disk}: had no policy; nothing changed")
    return 0


def _when(next_point: float) -> str:
    """When a schedule's next point is due: a time, or now (it is overdue)."""
    return "now" if next_point <= clock.now() else fmt_time(next_point)
