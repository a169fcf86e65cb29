"""The commands on the repository itself: init, config (its settings), and index restore
(its checkpoints)."""

from __future__ import annotations

import argparse
import sys

from .. import checkpoint, recover
from ..errors import RpfsError
from ..lifecycle.clock import fmt_duration, parse_duration
from ..names import fmt_bytes, parse_size
from ..repo import Repository, parse_trash_days, repo_path
from ..serve.control import disk_service
from ..store.s3 import StoreConfig, parse_url
from .output import fmt_time, print_json, print_table


def _store_config(args: argparse.Namespace, url: str) -> StoreConfig:
    parse_url(url)
    retry = parse_duration(args.s3_retry)
    return StoreConfig(url=url, endpoint=args.s3_endpoint, region=args.s3_region,
                       cache_size=parse_size(args.cache_size), retry_seconds=retry,
                       backlog_warn=parse_size(args.backlog_warn))


def cmd_init(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    if args.store and args.from_store:
        raise RpfsError("give --store (a new repository) or --from-store (recover one), "
                        "not both")
    if args.from_store:
        return _recover(args, root)
    days = parse_trash_days(args.trash_days)
    store = _store_config(args, args.store) if args.store else None
    with Repository.init(root, parse_size(args.block_size), args.reserve, days,
                         store) as repo:
        free, floor = repo.space.figures()
    where = f", packs in {store.url}, read cache {fmt_bytes(store.cache_size)}" if store \
        else ""
    print(f"initialised rpfs repository at {root} (block size {args.block_size}, "
          f"reserve {fmt_bytes(floor)} of {fmt_bytes(free)} free, {_trash(days)}{where})")
    return 0


def _recover(args: argparse.Namespace, root) -> int:
    report = recover.recover(root, _store_config(args, args.from_store))
    print(f"recovered the repository of {report['store']} into {root} from index "
          f"checkpoint {report['checkpoint']} ({report['points']} points)")
    for line in report["disks"]:
        print(line)
    if report["lost"]:
        print(f"lost (their data was not in the store yet): {', '.join(report['lost'])}")
    for name, problem in report["skipped"]:
        print(f"skipped newer checkpoint {name}: {problem}")
    if report["stray_chunks"]:
        print(f"rpfs: warning: {report['stray_chunks']} chunks still named in packs the "
              "store lacks (" + ", ".join(map(str, report["missing_packs"])) + "); 'rpfs "
              "check' names them", file=sys.stderr)
    return 0


def _trash(days: int) -> str:
    return "no trash: a delete purges at once" if days == 0 else f"trash period {days} days"


def cmd_config_show(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        config = service.config()
    if args.json:
        print_json(config)
        return 0
    reserve = "default" if config["reserve"] is None else config["reserve"]
    rows = [["block-size", fmt_bytes(config["block_size"])], ["hash", config["hash"]],
            ["codec", config["codec"]], ["reserve", str(reserve)],
            ["trash-days", f"{config['trash_days']} ({_trash(config['trash_days'])})"],
            ["gc-interval", _interval(config["gc_interval"], "the daemon's gc")],
            ["verify-interval", _interval(config["verify_interval"],
                                          "the daemon's rolling verify")]]
    print_table(["SETTING", "VALUE"], rows)
    return 0


def _interval(seconds: int, what: str) -> str:
    return "off" if not seconds else f"{fmt_duration(seconds)} (between runs of {what})"


def parse_setting(key: str, text: str) -> tuple[str, int]:
    """`config set KEY VALUE`: the rpfs.json key and its value (an interval is a duration
    such as 6h, or off)."""
    if key == "trash-days":
        return "trash_days", parse_trash_days(text)
    return key.replace("-", "_"), 0 if text in ("off", "0") else parse_duration(text)


def cmd_config_set(args: argparse.Namespace) -> int:
    key, value = parse_setting(args.key, args.value)
    with disk_service(repo_path(args.repo)) as service:
        service.set_setting(key=key, value=value)
    if key == "trash_days":
        print(f"trash-days set to {value} ({_trash(value)}; applies to the points in the "
              "trash too: 'rpfs trash' shows when each goes)")
    else:
        print(f"{args.key} set to {'off' if not value else fmt_duration(value)} (a running "
              "daemon follows it at its next look, within 5 minutes)")
    return 0


def cmd_index_restore(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    if args.list:
        rows = [
            [c.path.name, fmt_time(c.created), fmt_bytes(c.size),
             "-" if p.points is None else str(len(p.points)),
             "good" if p.good else f"bad: {p.problem}"]
            for c, p in checkpoint.survey(root)
        ]
        if not rows:
            print(f"no index checkpoints in {root / checkpoint.CHECKPOINTS}")
            return 0
        print_table(["CHECKPOINT", "TAKEN", "SIZE", "POINTS", "STATE"], rows)
        return 0
    r = checkpoint.restore(root, force=args.force, verify_data=args.verify_data)
    taken = fmt_time(r.checkpoint.created)
    print(f"restored the index from checkpoint {r.checkpoint.path.name} (taken {taken}; "
          f"points: {r.points})")
    if r.kept_at is not None:
        print(f"the index it replaced is kept at {r.kept_at} ({r.damage})")
    for c, problem in r.skipped:
        print(f"skipped newer checkpoint {c.path.name}: {problem}")
    if r.lost is None:
        print(f"lost: the points taken after {taken}; which ones cannot be known (neither "
              "the damaged index nor a newer checkpoint can be read)")
    else:
        print(f"lost (points newer than the checkpoint, per {' and '.join(r.lost_from)}): "
              f"{', '.join(r.lost) or 'none'}")
    for d in r.disks:
        line = (f"disk {d.name}: marked unclean (its next point compares every block); "
                f"blocks written after the checkpoint, kept: {d.kept_writes}")
        if d.dropped_points:
            line += (f"; dropped {', '.join(d.dropped_points)} (still being archived at the "
                     "checkpoint: its content is not known; its blocks stay in the disk)")
        print(line)
        if d.ambiguous:
            print(f"rpfs: warning: disk {d.name}: {d.ambiguous} blocks hold local bytes that "
                  "a rollback before the checkpoint had dropped, or writes made after it; "
                  "they stay dropped (read from the rollback's point): check the disk",
                  file=sys.stderr)
        if d.missing_file:
            print(f"rpfs: warning: disk {d.name}: its local file is missing (deleted after "
                  "the checkpoint?); delete the disk with 'rpfs disk delete'", file=sys.stderr)
    if r.orphans:
        print(f"local files of disks made after the checkpoint, kept: {', '.join(r.orphans)}")
    if r.bad_chunks:
        print(f"rpfs: warning: {len(r.bad_chunks)} of {r.chunks} chunks the index names are "
              f"not in the packs as it says: {', '.join(r.bad_chunks[:5])}"
              f"{' ...' if len(r.bad_chunks) > 5 else ''}; their blocks read as errors",
              file=sys.stderr)
    else:
        checked = "decoded and hashed" if args.verify_data else "checked against the packs"
        print(f"{r.chunks} chunks {checked}: all there")
    return 0
