"""The commands that mark one point, through the disk service (the daemon's when one
serves the repository, else one in this process): hold, release, point describe; and
the reading of `--expire-in` / `--expire-at`, which capture and snapshot share."""

from __future__ import annotations

import argparse

from ..lifecycle import clock
from ..repo import repo_path
from ..serve.control import disk_service


def expiry_of(args: argparse.Namespace) -> float | None:
    """The expiry `--expire-in DURATION` or `--expire-at INSTANT` gives (None: neither),
    read before anything runs, so a bad one changes nothing."""
    if args.expire_in is not None:
        return clock.parse_expire_in(args.expire_in)
    if args.expire_at is not None:
        return clock.parse_expire_at(args.expire_at)
    return None


def cmd_hold(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        point = service.hold(point=args.point, tag=args.tag)
    print(f"{args.point}: {point['done']}; delete, prune and purge refuse it until "
          f"'rpfs release {args.point}'")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        point = service.release(point=args.point)
    print(f"{args.point}: {point['done']}")
    return 0


def cmd_point_describe(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        point = service.describe(point=args.point, text=args.text)
    print(f"{args.point}: {point['done']}")
    return 0
