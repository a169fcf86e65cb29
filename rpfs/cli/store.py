"""`store sync` and `store status`: the object store of a repository, through the disk
service (the daemon's, which uploads in the background, else in-process)."""

from __future__ import annotations

import argparse
import sys

from ..names import fmt_bytes
from ..progress import progress_bar
from ..repo import read_daemon_info, repo_path
from ..serve.control import disk_service
from .output import fmt_time, print_json


def cmd_store_sync(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    with disk_service(root) as service, progress_bar("upload") as bar:
        done = service.store_sync(wait=args.wait or not read_daemon_info(root),
                                  progress=bar)
    if args.json:
        print_json(done)
    elif done["started"]:
        print(f"the daemon is uploading {done['pending_packs']} packs "
              f"({fmt_bytes(done['pending_bytes'])}) now; 'rpfs store status' shows how it "
              "goes (--wait waits for it)")
    else:
        print(f"uploaded {done['packs']} packs ({fmt_bytes(done['bytes'])}) in "
              f"{done['seconds']:.1f} s; pending: {done['pending_packs']} packs "
              f"({fmt_bytes(done['pending_bytes'])})")
    if done["checkpoint_error"]:
        print(f"rpfs: error: no index checkpoint pushed to the store: "
              f"{done['checkpoint_error']}; a recovery from the store would not see the "
              "newest points (the daemon, or the next sync, tries again)", file=sys.stderr)
    if done["error"]:
        print(f"rpfs: error: upload stopped: {done['error']}; what is pending stays "
              "pending and is uploaded when the store answers", file=sys.stderr)
        return 1
    return 1 if done["checkpoint_error"] else 0


def cmd_store_status(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        s = service.store_status()
    if args.json:
        print_json(s)
        return 0
    rows = [
        ("store", s["store"] + (f" at {s['endpoint']}" if s["endpoint"] else "")),
        ("pending", f"{s['pending_packs']} packs ({fmt_bytes(s['pending_bytes'])})"),
        ("stored", f"{s['stored_packs']} packs ({fmt_bytes(s['stored_bytes'])})"),
        ("cache", f"{fmt_bytes(s['cache_bytes'])} of {fmt_bytes(s['cache_limit'])}"),
        ("requests", f"{s['gets']} GETs ({fmt_bytes(s['get_bytes'])}), "
                     f"{s['uploaded_packs']} packs uploaded ({fmt_bytes(s['uploaded_bytes'])})"),
        ("last error", "none" if not s["last_error"] else
         f"{s['last_error']} (at {fmt_time(s['last_error_at'])})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}}  {value}")
    if s["warning"]:
        print(f"rpfs: warning: {s['warning']}", file=sys.stderr)
    return 0
