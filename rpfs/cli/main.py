"""The `rpfs` command: the parser, the dispatch to a command, and what an error becomes
(a one-line message and an exit status; a bug's traceback goes to the repository's log).

The commands live by group (`repository`, `points`, `disks`, `mount`); they parse and
print, and the library answers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .. import __version__
from ..errors import RpfsError, describe_os_error, is_expected
from ..lifecycle.marks import DEFAULT_TAG
from ..lifecycle.retention import KEEP_OPTIONS
from ..lifecycle.trash import TRASH_DAYS
from ..repo import SETTINGS, repo_path
from .disks import (
    cmd_clone,
    cmd_disk_create,
    cmd_disk_delete,
    cmd_disks,
    cmd_hydrate,
    cmd_rollback,
    cmd_snapshot,
)
from .maintenance import cmd_check, cmd_gc, cmd_info, cmd_verify
from .marks import cmd_hold, cmd_point_describe, cmd_release
from .mount import cmd_mount, cmd_serve, cmd_umount
from .output import fmt_time
from .points import cmd_allocated, cmd_capture, cmd_changed, cmd_points, cmd_restore
from .policy import cmd_policy_clear, cmd_policy_set, cmd_policy_show
from .replicate import cmd_pull, cmd_push, cmd_receive, cmd_send
from .repository import cmd_config_set, cmd_config_show, cmd_index_restore, cmd_init
from .store import cmd_store_status, cmd_store_sync
from .trash import (
    KEEP_SPANS,
    cmd_point_delete,
    cmd_prune,
    cmd_trash,
    cmd_trash_purge,
    cmd_undelete,
)


def _command(sub: argparse._SubParsersAction, name: str, summary: str,
             common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary shows both in its group's list and atop its
    own --help."""
    return sub.add_parser(name, parents=[common], help=summary,
                          description=f"{summary[0].upper()}{summary[1:]}.")


def _point_options(p: argparse.ArgumentParser) -> None:
    """What capture and snapshot give a new point: a description and its own expiry."""
    p.add_argument("--description", default="", metavar="TEXT",
                   help="free text shown with the point in 'rpfs points'")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expire-in", metavar="DURATION",
                        help="the point goes to the trash this long from now (e.g. 10d; "
                             "s, m, h, d, w); prune leaves it alone")
    expiry.add_argument("--expire-at", metavar="INSTANT",
                        help="the point goes to the trash at this UTC time (e.g. "
                             "2027-01-31T00:00Z); prune leaves it alone")


def _keep_options(p: argparse.ArgumentParser) -> None:
    """The retention's options, which prune and policy set share."""
    for option, span in zip(KEEP_OPTIONS, KEEP_SPANS, strict=True):
        what = "N newest points" if span is None else (
            f"newest point of each of the N newest {span} that have points (UTC)")
        p.add_argument(f"--{option.replace('_', '-')}", type=int, metavar="N",
                       help=f"keep the {what}")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its arguments. Positionals are named DISK (an existing disk),
    DISK@POINT, NAME (a new one), SOURCE, TARGET and TEXT (free text); every one has a help
    text."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-r", "--repo", default=argparse.SUPPRESS,
        help="repository path (default: $RPFS_REPO, else /var/lib/rpfs)",
    )
    parser = argparse.ArgumentParser(
        prog="rpfs", description="Recovery points of VM disks, served as disk images over FUSE.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"rpfs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    extents_json = ('print the extents as one JSON list [{"start": bytes, "length": bytes}, '
                    "...], the form capture --changed reads")

    p = _command(sub, "init", "create a repository", common)
    p.add_argument("--block-size", default="64K",
                   help="block size, a power of two from 4K to 4M (default 64K)")
    p.add_argument("--reserve", metavar="SIZE|N%",
                   help="free space to keep on the repository's filesystem (default: the "
                        "smaller of 1%% and 256M)")
    p.add_argument("--trash-days", metavar="N", default=str(TRASH_DAYS),
                   help=f"days a deleted point stays in the trash, undeletable (default "
                        f"{TRASH_DAYS}; 0: no trash, a delete purges at once)")
    p.add_argument("--store", metavar="s3://BUCKET[/PREFIX]",
                   help="keep the packs in this S3 bucket (credentials: AWS_ACCESS_KEY_ID "
                        "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); the local folder keeps "
                        "the index, packs not uploaded yet and a read cache")
    p.add_argument("--from-store", metavar="s3://BUCKET[/PREFIX]",
                   help="recover the repository kept in this bucket into an empty folder: "
                        "the index from its newest good checkpoint there")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="the S3 endpoint (Ceph RGW, SeaweedFS, MinIO; default: AWS's)")
    p.add_argument("--s3-region", metavar="NAME",
                   help="the region to sign with (default $AWS_REGION, else us-east-1)")
    p.add_argument("--cache-size", metavar="SIZE", default="20G",
                   help="bound of the local read cache of stored packs (default 20G)")
    p.add_argument("--s3-retry", metavar="DURATION", default="1m",
                   help="how long a request to the store is retried before it fails: a "
                        "read of uncached data then fails with EIO (default 1m)")
    p.add_argument("--backlog-warn", metavar="SIZE", default="8G",
                   help="bytes waiting for upload past which 'store status' warns "
                        "(default 8G)")
    p.set_defaults(func=cmd_init)

    p = _command(sub, "config", "show or change the repository's settings", common)
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = _command(config_sub, "show", "show the repository's settings", common)
    q.add_argument("--json", action="store_true",
                   help="print them as a JSON object: block_size, hash, codec, reserve "
                        "(null: the default), trash_days, gc_interval and verify_interval "
                        "(seconds; 0: off)")
    q.set_defaults(func=cmd_config_show)
    q = _command(config_sub, "set", "change a setting (it applies to the trash already)",
                 common)
    q.add_argument("key", metavar="KEY", choices=list(SETTINGS.values()),
                   help="the setting: trash-days (days a deleted point stays undeletable; 0 "
                        "turns the trash off), gc-interval, verify-interval (how often the "
                        "daemon runs gc, and a 10-minute turn of verify: a duration such as "
                        "1d, or off)")
    q.add_argument("value", metavar="VALUE", help="its new value")
    q.set_defaults(func=cmd_config_set)

    p = _command(sub, "capture", "capture an image or device as a point", common)
    p.add_argument("disk", metavar="DISK", help="disk name (created by its first capture)")
    p.add_argument("source", metavar="SOURCE",
                   help="raw image file, block device, or NBD export (nbd://HOST[:PORT]/"
                        "EXPORT, nbd+unix:///EXPORT?socket=PATH)")
    p.add_argument("--name", help="point name (default: UTC timestamp)")
    p.add_argument("--changed", metavar="FILE",
                   help='read only these extents: JSON [{"start": bytes, "length": bytes}, ...]')
    p.add_argument("--bitmap", metavar="NAME",
                   help="an NBD source's dirty bitmap: read only the extents it marks (what "
                        "changed since the disk's previous point)")
    _point_options(p)
    p.set_defaults(func=cmd_capture)

    p = _command(sub, "points", "list recovery points", common)
    p.add_argument("disk", nargs="?", metavar="DISK", help="only this disk's points")
    p.add_argument("--json", action="store_true",
                   help="print the points as a JSON list of their records, each with "
                        "allocated_bytes and block_size (and stalled, if its archive waits)")
    p.add_argument("--tree", action="store_true",
                   help="draw each disk's history: every rollback's branch under the point "
                        "it went back to, 'now' where the disk is, branches left by a later "
                        "rollback marked (abandoned)")
    p.set_defaults(func=cmd_points)

    p = _command(sub, "point", "delete or describe points", common)
    point_sub = p.add_subparsers(dest="point_command", required=True, metavar="ACTION")
    q = _command(point_sub, "delete", "move points to the trash (or purge them at once)",
                 common)
    q.add_argument("points", nargs="+", metavar="DISK@POINT", help="a point to delete")
    q.add_argument("--purge", action="store_true",
                   help="drop them at once instead of keeping them in the trash")
    q.add_argument("--wait", action="store_true",
                   help="wait for points still being archived to complete, then delete "
                        "(an error if their archive is stalled, e.g. by a full disk)")
    q.set_defaults(func=cmd_point_delete)
    q = _command(point_sub, "describe", "set a point's description", common)
    q.add_argument("point", metavar="DISK@POINT", help="the point")
    q.add_argument("text", metavar="TEXT", help="its description (\"\" clears it)")
    q.set_defaults(func=cmd_point_describe)

    p = _command(sub, "hold", "keep a point from delete, prune and purge", common)
    p.add_argument("point", metavar="DISK@POINT", help="the point to hold")
    p.add_argument("--tag", default=DEFAULT_TAG,
                   help=f"who or what holds it, named in refusals (default: {DEFAULT_TAG})")
    p.set_defaults(func=cmd_hold)

    p = _command(sub, "release", "release a point's hold", common)
    p.add_argument("point", metavar="DISK@POINT", help="the held point")
    p.set_defaults(func=cmd_release)

    p = _command(sub, "prune", "move the points a retention policy does not keep to the trash",
                 common)
    p.add_argument("disk", metavar="DISK", help="the disk whose points to prune")
    _keep_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be kept and removed, and why; change nothing")
    p.add_argument("--json", action="store_true",
                   help="print the plan as a JSON list: disk, name, keep and rule of each "
                        "point, newest first")
    p.set_defaults(func=cmd_prune)

    p = _command(sub, "policy", "per-disk schedules of points and their retention", common)
    policy_sub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    q = _command(policy_sub, "set", "store a disk's policy (replacing its old one) and apply "
                 "its retention to the points it has now", common)
    q.add_argument("disk", metavar="DISK", help="the disk the policy is for")
    q.add_argument("--every", metavar="DURATION",
                   help="the daemon takes a point of this writable disk when its newest "
                        "point is this old (e.g. 1h; s, m, h, d, w)")
    _keep_options(q)
    q.epilog = ("The retention runs now and after each new point; see what it keeps first "
                "with 'rpfs prune DISK --dry-run' and the same --keep options.")
    q.set_defaults(func=cmd_policy_set)
    q = _command(policy_sub, "show", "list the stored policies", common)
    q.add_argument("disk", nargs="?", metavar="DISK", help="only this disk's")
    q.add_argument("--json", action="store_true",
                   help="print a JSON list: disk, every (seconds), the keep_* options, "
                        "next_point and summary of each")
    q.set_defaults(func=cmd_policy_show)
    q = _command(policy_sub, "clear", "drop a disk's policy (its points stay)", common)
    q.add_argument("disk", metavar="DISK", help="the disk whose policy to drop")
    q.set_defaults(func=cmd_policy_clear)

    p = _command(sub, "trash", "list deleted points, or purge them", common)
    p.add_argument("--json", action="store_true",
                   help="print the deleted points as a JSON list: disk, name, created, size, "
                        "bytes_stored, deleted_at and purge_after of each")
    p.set_defaults(func=cmd_trash)
    trash_sub = p.add_subparsers(dest="trash_command", metavar="ACTION")
    q = _command(trash_sub, "purge", "free what deleted points hold, now", common)
    which = q.add_mutually_exclusive_group()
    which.add_argument("points", nargs="*", default=[], metavar="DISK@POINT",
                       help="only these points (default: the whole trash)")
    which.add_argument("--expired", action="store_true",
                       help="only the points whose trash period is over")
    q.set_defaults(func=cmd_trash_purge)

    p = _command(sub, "undelete", "bring a deleted point back from the trash", common)
    p.add_argument("point", metavar="DISK@POINT", help="the point, under its old name")
    p.set_defaults(func=cmd_undelete)

    p = _command(sub, "restore", "write a point to a file or device", common)
    p.add_argument("point", metavar="DISK@POINT", help="the point to write")
    p.add_argument("target", metavar="TARGET", help="file or block device to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty target file")
    p.set_defaults(func=cmd_restore)

    p = _command(sub, "clone", "new writable disk from a point, at once", common)
    p.add_argument("source", metavar="SOURCE",
                   help="DISK@POINT, or a writable DISK (a point of it is taken first)")
    p.add_argument("name", metavar="NAME", help="name of the new disk")
    p.set_defaults(func=cmd_clone)

    p = _command(sub, "disk", "create or delete writable disks", common)
    disk_sub = p.add_subparsers(dest="disk_command", required=True, metavar="ACTION")
    q = _command(disk_sub, "create", "create an empty writable disk", common)
    q.add_argument("name", metavar="NAME", help="name of the new disk")
    q.add_argument("--size", required=True, help="size, e.g. 20G")
    q.set_defaults(func=cmd_disk_create)
    q = _command(disk_sub, "delete", "delete a disk and its points", common)
    q.add_argument("name", metavar="DISK", help="the disk to delete")
    q.add_argument("--force", action="store_true",
                   help="first copy what clones of it still read from it into them")
    q.add_argument("--with-points", action="store_true",
                   help="delete its points too (required when it has any)")
    q.set_defaults(func=cmd_disk_delete)

    p = _command(sub, "disks", "list disks", common)
    p.add_argument("--json", action="store_true",
                   help="print the disks as a JSON list: name, size, origin (the point "
                        "the content last started from: the clone's source or the rollback's "
                        "target), origin_deleted, cloned_from, cloned_from_deleted, "
                        "cloned_from_disk_deleted, rolled_back_to, rolled_back_to_deleted, "
                        "writable, created, hydrated_pct, state and stalled of each")
    p.set_defaults(func=cmd_disks)

    p = _command(sub, "snapshot", "instant point of writable disks (several: one instant)",
                 common)
    p.add_argument("disks", nargs="+", metavar="DISK",
                   help="a writable disk (several are taken at one instant)")
    p.add_argument("--name", help="point name (default: UTC timestamp)")
    _point_options(p)
    p.set_defaults(func=cmd_snapshot)

    p = _command(sub, "rollback", "bring a closed disk back to a point", common)
    p.add_argument("point", metavar="DISK@POINT",
                   help="the point to go back to (newer points stay, as a branch)")
    p.set_defaults(func=cmd_rollback)

    p = _command(sub, "changed", "extents that differ between points", common)
    p.add_argument("a", metavar="DISK@POINT", help="one point")
    p.add_argument("b", metavar="DISK@POINT", help="the other, of the same disk history")
    p.add_argument("--json", action="store_true", help=extents_json)
    p.set_defaults(func=cmd_changed)

    p = _command(sub, "allocated", "extents of a point that hold data", common)
    p.add_argument("point", metavar="DISK@POINT", help="the point")
    p.add_argument("--json", action="store_true", help=extents_json)
    p.set_defaults(func=cmd_allocated)

    p = _command(sub, "hydrate", "copy all of a clone's blocks locally", common)
    p.add_argument("name", metavar="DISK", help="the clone to copy into its local file")
    p.set_defaults(func=cmd_hydrate)

    nbd_help = ("serve the images over NBD too: unix:PATH, tcp:PORT (on 127.0.0.1) or "
                "tcp:HOST:PORT (unauthenticated: a warning unless HOST is loopback)")
    p = _command(sub, "mount", "serve the repository at MOUNTPOINT", common)
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="an empty directory (see --nonempty) to show the disk images in")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in this process")
    p.add_argument("--hydrate", action="store_true",
                   help="copy clones' missing blocks locally in the background")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in, as the image modes say (default: root only)")
    p.add_argument("--uid", help="owner of the images (name or number; default: root)")
    p.add_argument("--gid", help="group of the images (name or number; default: root)")
    p.add_argument("--mode", help="mode of disk images (default 0600; points: minus write)")
    p.add_argument("--nonempty", action="store_true",
                   help="mount over a directory that holds files (hiding them)")
    p.add_argument("--writeback", action="store_true",
                   help="let the kernel cache buffered writes to disk images until fsync, "
                        "close or a snapshot: much faster buffered writes, but their errors "
                        "(no space, past the end) come at fsync or close, and writes not "
                        "flushed are lost if the daemon dies (O_DIRECT writes, as QEMU's "
                        "cache=none, are not cached)")
    p.add_argument("--nbd", metavar="ADDRESS", help=nbd_help)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = _command(sub, "store", "the object store of a repository made with --store", common)
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = _command(store_sub, "sync", "upload every pack waiting for the store now, and an "
                 "index checkpoint", common)
    q.add_argument("--wait", action="store_true",
                   help="with a daemon: wait until it has uploaded them (without one, "
                        "sync always waits: it is the uploader)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=cmd_store_sync)
    q = _command(store_sub, "status", "pending bytes, cache use, requests and errors", common)
    q.add_argument("--json", action="store_true", help="print the figures as a JSON object")
    q.set_defaults(func=cmd_store_status)

    p = _command(sub, "info", "the repository's totals: points, stored, dead and pack bytes, "
                 "ratios", common)
    p.add_argument("--json", action="store_true", help="print the figures as a JSON object")
    p.set_defaults(func=cmd_info)

    p = _command(sub, "check", "check the index's consistency with itself and the packs "
                 "(read-only)", common)
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON: clean, checked, problems (problem, fix) "
                        "and reclaimable")
    p.set_defaults(func=cmd_check)

    p = _command(sub, "gc", "free unreferenced chunks and compact packs, online", common)
    p.add_argument("--threshold", type=float, default=0.8, metavar="FRACTION",
                   help="rewrite packs whose live bytes are below this fraction of their "
                        "size (default 0.8; 1 rewrites every pack)")
    p.add_argument("--dry-run", action="store_true", help="say what it would do; change nothing")
    p.add_argument("--json", action="store_true", help="print the figures as a JSON object")
    p.set_defaults(func=cmd_gc)

    p = _command(sub, "verify", "read stored chunks back and check them (rolling)", common)
    p.add_argument("points", nargs="*", metavar="DISK@POINT",
                   help="verify exactly the chunks these points read (default: the packs "
                        "verified longest ago, and chunks a read found corrupt)")
    p.add_argument("--max-duration", metavar="DURATION",
                   help="stop between packs after this long (e.g. 10m); the next run goes on")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON: sound, chunks/bytes/packs verified, "
                        "packs_left, stopped_early, and every bad chunk with its readers")
    p.set_defaults(func=cmd_verify)

    p = _command(sub, "index", "list or restore the index's checkpoints", common)
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = _command(index_sub, "restore", "put the newest good checkpoint back as the index",
                 common)
    q.add_argument("--list", action="store_true",
                   help="only list the checkpoints and whether each reads cleanly")
    q.add_argument("--force", action="store_true",
                   help="restore even though the index is not damaged")
    q.add_argument("--verify-data", action="store_true",
                   help="decode and hash every chunk, not only check its record header")
    q.set_defaults(func=cmd_index_restore)

    p = _command(sub, "send", "write a point's replication stream (to a file or a pipe)",
                 common)
    p.add_argument("point", metavar="DISK@POINT", help="the point to send")
    p.add_argument("--from", dest="base", metavar="DISK@POINT",
                   help="send only what differs from this point, which the receiver has")
    p.add_argument("-o", "--output", metavar="FILE", help="write the stream to this new file "
                   "(default: standard output, which must not be a terminal)")
    p.set_defaults(func=cmd_send)

    p = _command(sub, "receive", "publish the point of a stream from 'rpfs send'", common)
    p.add_argument("-i", "--input", metavar="FILE", help="read the stream from this file "
                   "(default: standard input)")
    p.add_argument("--disk", metavar="NAME", help="receive into this disk (default: the "
                   "source's disk name)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_receive)

    for name, where, what in (
            ("pull", "source", "fetch the points this repository lacks from another one"),
            ("push", "target", "send the points another repository lacks to it")):
        p = _command(sub, name, what, common)
        p.add_argument(where, metavar=where.upper(),
                       help="a repository path on this host, or ssh://[USER@]HOST[:PORT]/PATH")
        p.add_argument("disks", nargs="*", metavar="DISK", help="only these disks (default: all)")
        p.add_argument("--last", type=int, metavar="N",
                       help="only the newest N complete points of each disk (older ones it "
                            "lacks too: backfill)")
        p.add_argument("--rsh", metavar="CMD", help="run this instead of ssh")
        p.add_argument("--remote-rpfs", default="rpfs", metavar="CMD",
                       help="the rpfs command on the far host (default: rpfs)")
        p.add_argument("--json", action="store_true",
                       help="print the summary as JSON: points_published, bytes_sent, "
                            "bytes_received, ...")
        p.set_defaults(func=cmd_pull if name == "pull" else cmd_push)

    p = _command(sub, "serve", "serve the images over NBD without a mount (--nbd), or "
                 "answer a pull or push on standard input and output (--stdio: what ssh runs "
                 "on the far side)", common)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--nbd", metavar="ADDRESS", help=nbd_help)
    mode.add_argument("--stdio", action="store_true",
                      help="speak the replication protocol on stdin/stdout")
    p.add_argument("--hydrate", action="store_true",
                   help="with --nbd: copy clones' missing blocks locally in the background")
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "umount", "unmount and stop the daemon", common)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the repository is mounted")
    p.set_defaults(func=cmd_umount)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.repo = getattr(args, "repo", None)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="rpfs: %(message)s"
    )
    try:
        return args.func(args)
    except RpfsError as exc:
        print(f"rpfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rpfs: interrupted; nothing was committed by the interrupted step", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`rpfs points --json | grep -q ...`): not an
        # error to report. Point stdout at /dev/null so the exit flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except Exception as exc:
        root = repo_path(args.repo)
        if is_expected(exc):  # a full disk, a read-only mount, ...: not a bug
            print(f"rpfs: error: {describe_os_error(exc, root)}", file=sys.stderr)
            return 1
        return _internal_error(exc, root, args.verbose)


def _internal_error(exc: Exception, root: Path, verbose: bool) -> int:
    """A bug: one line here, the traceback in the repository's log (and here with -v)."""
    trace = traceback.format_exc()
    log_path: Path | None = root / "rpfs.log"
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{fmt_time(time.time())} ERROR rpfs: internal error in "
                    f"'rpfs {' '.join(sys.argv[1:])}' (pid {os.getpid()}):\n{trace}")
    except OSError:
        log_path = None  # no repository there, or it cannot be written: show it here
    if verbose or log_path is None:
        sys.stderr.write(trace)
    where = f"in {log_path}" if log_path else "above"
    print(f"rpfs: internal error: {type(exc).__name__}: {exc}; this is a bug, the traceback "
          f"is {where}", file=sys.stderr)
    return 1

