"""The `rpfs` command: parse arguments, call the library, print results. No storage logic."""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import logging
import os
import pwd
import re
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__, checkpoint
from ..capture import capture
from ..disks.point import open_point
from ..errors import RpfsError, describe_os_error, is_expected
from ..index import DiskRecord, LineageRecord, PointRecord
from ..lineage import allocated_extents, changed_extents
from ..names import check_name, fmt_bytes, parse_point_ref, parse_size
from ..perms import check_owner, open_log
from ..progress import progress_bar
from ..repo import Repository, read_daemon_info, repo_path
from ..restore import restore
from ..serve.control import RemoteService, disk_service, socket_path
from ..serve.daemon import MountOptions, serve
from ..serve.mounts import unmount
from ..serve.vfs import Access
from ..store.cache import ChunkCache

log = logging.getLogger("rpfs")

MOUNT_TIMEOUT = 60.0
MAX_ID = 2**32 - 2  # the largest uid or gid; 2**32 - 1 is (uid_t)-1, "none"
WARNING = "warning: "  # a line the daemon reports before 'ready' (see _read_report)


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# -- commands --------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    with Repository.init(root, parse_size(args.block_size), args.reserve) as repo:
        free, floor = repo.space.figures()
    print(f"initialised rpfs repository at {root} (block size {args.block_size}, "
          f"reserve {fmt_bytes(floor)} of {fmt_bytes(free)} free)")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    with Repository(repo_path(args.repo)) as repo, progress_bar(f"capture {args.disk}") as bar:
        point = capture(
            repo,
            args.disk,
            Path(args.source),
            point=args.name,
            changed=Path(args.changed) if args.changed else None,
            progress=bar,
        )
    print(
        f"{point.ref}: {point.method}, {point.blocks_written} blocks written, "
        f"{fmt_bytes(point.bytes_stored)} stored"
    )
    return 0


def _state(p: PointRecord, points: list[PointRecord], stalls: dict[str, str]) -> str:
    if p.state == "complete":
        return "complete"
    stalled = f" (stalled: {stalls[p.disk]})" if p.disk in stalls else ""
    if p.rides:
        pending = [q for q in points if q.disk == p.disk and q.lineage == p.lineage
                   and q.state == "archiving" and not q.rides and q.gen < p.gen]
        if pending:
            return f"archiving with {pending[0].name}{stalled}"
    return f"archiving {100 * p.archived_blocks // max(1, p.frozen_blocks)}%{stalled}"


def cmd_points(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    with Repository(root) as repo, repo.index.read() as txn:
        stalls = _stalls(root)
        disk = None
        if args.disk is not None:
            disk = repo.index.get_disk(txn, check_name(args.disk))
            if disk is None:
                raise RpfsError(f"no disk named {args.disk!r}; 'rpfs points' lists all disks")
        points = repo.index.list_points(txn, args.disk)
        bs = repo.block_size
        if args.tree:
            disks = [disk] if disk else repo.index.list_disks(txn)
            for d in disks:
                _print_tree(d, repo.index.list_lineages(txn), points, stalls)
            return 0
    if args.json:
        out = [
            {**vars(p), "allocated_bytes": p.allocated_blocks * bs, "block_size": bs,
             **({"stalled": stalls[p.disk]} if p.state != "complete" and p.disk in stalls
                else {})}
            for p in points
        ]
        print(json.dumps(out, indent=1))
        return 0
    rows = [
        [
            p.disk, p.name, fmt_time(p.created), fmt_bytes(p.size), str(p.blocks_written),
            fmt_bytes(p.allocated_blocks * bs), fmt_bytes(p.bytes_stored), p.method,
            _state(p, points, stalls),
        ]
        for p in points
    ]
    header = ["DISK", "POINT", "CREATED", "SIZE", "WRITTEN", "ALLOCATED", "STORED", "METHOD",
              "STATE"]
    print_table(header, rows)
    return 0


def _stalls(root: Path) -> dict[str, str]:
    """Disks whose archive is stalled, and why: only a daemon archives in the background,
    and it keeps that in memory (its log may be on the full filesystem)."""
    return RemoteService(socket_path(root)).stalls() if read_daemon_info(root) else {}


def _print_tree(
    disk: DiskRecord, lineages: list[LineageRecord], points: list[PointRecord],
    stalls: dict[str, str],
) -> None:
    """A disk's points by lineage; a rollback's or clone's lineage under its origin."""
    mine = {lin.id: lin for lin in lineages if disk.name in lin.disks}
    children: dict[tuple[int, int], list[LineageRecord]] = {}
    for lin in mine.values():
        if lin.parent in mine:
            children.setdefault((lin.parent, lin.parent_gen), []).append(lin)
    origin = f" (from {disk.origin})" if disk.origin else ""
    print(f"{disk.name}{origin}")

    def show(lin: LineageRecord, indent: str) -> None:
        label = "current" if lin.id == disk.lineage else "branch"
        print(f"{indent}[{label}: lineage {lin.id}]")
        for p in (p for p in points if p.disk == disk.name and p.lineage == lin.id):
            state = _state(p, points, stalls)
            print(f"{indent}  {p.name}  {fmt_time(p.created)}  {p.method}  {state}")
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
        print(json.dumps(disks, indent=1))
        return 0
    rows = [
        [
            d["name"], fmt_bytes(d["size"]), d["origin"] or "-",
            "-" if d["hydrated_pct"] is None else f"{d['hydrated_pct']:.1f}%",
            d["state"] + (f", archiving stalled: {d['stalled']}" if d.get("stalled") else ""),
        ]
        for d in disks
    ]
    print_table(["DISK", "SIZE", "ORIGIN", "HYDRATED", "STATE"], rows)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service:
        points = service.snapshot(disks=args.disks, name=args.name)
    for p in points:
        if PointRecord(**p).rides:
            print(f"{p['disk']}@{p['name']}: taken ({p['method']}; nothing written since the "
                  "point still archiving, complete with it)")
        else:
            print(f"{p['disk']}@{p['name']}: taken ({p['method']}, {p['frozen_blocks']} "
                  "blocks to archive)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    disk = parse_point_ref(args.point)[0]
    with Repository(root) as repo, repo.index.read() as txn:
        pending = [p for p in repo.index.list_points(txn, disk)
                   if p.state == "archiving" and not p.rides]
    for p in pending:  # the rollback waits for them: say why it takes a while
        print(f"rpfs: {p.disk}@{p.name} is still being archived ({p.archived_blocks} of "
              f"{p.frozen_blocks} blocks); the rollback waits for it", file=sys.stderr)
    with disk_service(root) as service:
        result = service.rollback(point=args.point)
    print(f"disk {result['disk']}: rolled back to {args.point} "
          f"({result['blocks_to_fetch']} blocks will be fetched again)")
    return 0


def _print_extents(extents: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(extents))
        return
    for e in extents:
        print(f"{e['start']}\t{e['length']}")
    total = sum(e["length"] for e in extents)
    print(f"# {len(extents)} extents, {fmt_bytes(total)}", file=sys.stderr)


def cmd_changed(args: argparse.Namespace) -> int:
    with Repository(repo_path(args.repo)) as repo:
        result = changed_extents(repo.index, args.a, args.b, repo.block_size)
    _print_extents(result, args.json)
    return 0


def cmd_allocated(args: argparse.Namespace) -> int:
    with Repository(repo_path(args.repo)) as repo:
        result = allocated_extents(repo.index, args.point, repo.block_size)
    _print_extents(result, args.json)
    return 0


def cmd_hydrate(args: argparse.Namespace) -> int:
    with disk_service(repo_path(args.repo)) as service, progress_bar(
        f"hydrate {args.name}"
    ) as bar:
        result = service.hydrate(name=args.name, progress=bar)
    print(f"disk {args.name}: hydrated ({fmt_bytes(result['bytes_fetched'])} copied)")
    return 0


def _mount_options(args: argparse.Namespace) -> MountOptions:
    """--allow-other, --uid, --gid, --mode, --hydrate and --nonempty, checked."""
    given = [f"--{name}" for name in ("uid", "gid", "mode") if getattr(args, name) is not None]
    if given and not args.allow_other:
        raise RpfsError(
            f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --allow-other: "
            "without it only the daemon's user can use the mount, whatever its modes"
        )
    access: dict[str, int] = {}
    if args.uid is not None:
        access["uid"] = _account_id(args.uid, "--uid")
    if args.gid is not None:
        access["gid"] = _account_id(args.gid, "--gid")
    if args.mode is not None:
        if not re.fullmatch(r"0?[0246]{3}", args.mode):  # octal read and write bits only
            raise RpfsError(
                f"invalid --mode {args.mode!r}: give octal read/write bits for disk images, "
                "e.g. 0640 (point images get the same minus write)"
            )
        access["mode"] = int(args.mode, 8)
    return MountOptions(
        access=Access(allow_other=args.allow_other, **access), hydrate=args.hydrate,
        nonempty=args.nonempty,
    )


def _account_id(value: str, option: str) -> int:
    """The user (--uid) or group (--gid) named by `value`, a name or a number.

    A number must fit the kernel's 32-bit ids, short of (uid_t)-1, which means "no id":
    a larger one made the daemon fail its first stat and hang on its own mount, and -1
    makes the images unreachable even for root. ASCII digits only (str.isdigit takes
    '²', which int() refuses, and other scripts' digits).
    """
    kind = "user" if option == "--uid" else "group"
    if re.fullmatch(r"[0-9]+", value):
        if int(value) > MAX_ID:
            raise RpfsError(f"invalid {option} {value}: a {kind} number is at most {MAX_ID}")
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise RpfsError(
            f"no {kind} named {value!r} ({option} takes a {kind} name or number)"
        ) from None


def _mount_args(options: MountOptions) -> list[str]:
    """`options` as arguments of `rpfs mount`, for the daemon process."""
    access = options.access
    args = ["--allow-other", "--uid", str(access.uid), "--gid", str(access.gid),
            "--mode", f"{access.mode:04o}"] if access.allow_other else []
    return [*args, *(["--hydrate"] if options.hydrate else []),
            *(["--nonempty"] if options.nonempty else [])]


def cmd_mount(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    mountpoint = Path(args.mountpoint).absolute()
    options = _mount_options(args)
    if args.foreground:
        return _serve_foreground(root, mountpoint, args.ready_fd, options)
    read_fd, write_fd = os.pipe()
    log_path = root / "rpfs.log"
    if root.is_dir():
        check_owner(root)  # before its log is opened
    stderr = os.fdopen(open_log(root), "ab") if root.is_dir() else subprocess.DEVNULL
    cmd = [sys.executable, "-m", "rpfs.cli", "-r", str(root), "mount", "--foreground",
           "--ready-fd", str(write_fd), *_mount_args(options), "--", str(mountpoint)]
    proc = subprocess.Popen(
        cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=stderr, start_new_session=True,
    )
    os.close(write_fd)
    if stderr is not subprocess.DEVNULL:
        stderr.close()
    message = _read_report(read_fd, proc)
    if message != "ready":
        raise RpfsError(message)
    print(f"mounted {root} at {mountpoint} (daemon pid {proc.pid}, log {log_path})")
    return 0


def _read_report(fd: int, proc: subprocess.Popen) -> str:
    """The daemon's report on the pipe: 'ready' or an error message, the last line; the
    lines 'warning: ...' before it are printed to stderr as they come."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        os.set_blocking(fd, False)
        while time.monotonic() < deadline:
            try:
                chunk = pipe.read(4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                data += chunk
                *lines, data = data.split(b"\n")
                for line in map(bytes.decode, lines):
                    if not line.startswith(WARNING):
                        return line.strip()
                    print(f"rpfs: {line.removeprefix(WARNING)}", file=sys.stderr)
            elif chunk == b"":  # EOF: the daemon exited without a word
                proc.wait()
                return f"the rpfs daemon exited with status {proc.returncode}; see its log"
            time.sleep(0.02)
    return f"the rpfs daemon (pid {proc.pid}) did not report ready in {MOUNT_TIMEOUT:.0f}s"


def _serve_foreground(
    root: Path, mountpoint: Path, ready_fd: int | None, options: MountOptions
) -> int:
    # Spawned by `rpfs mount`, stderr already is the log file; in a terminal, log to both.
    handlers: list[logging.Handler] = [_StderrLog()]
    if ready_fd is None and root.is_dir():
        handlers.append(file_log(root))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def report(line: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, line.encode() + b"\n")
            os.close(ready_fd)

    def on_error(message: str) -> None:
        log.error("%s", message)
        report(message)

    def on_warning(message: str) -> None:  # already logged (to stderr, in a terminal)
        if ready_fd is not None:
            os.write(ready_fd, f"{WARNING}{message}\n".encode())

    def on_ready() -> None:
        report("ready")

    return serve(root, mountpoint, options, on_ready, on_warning, on_error)


class _Unfailing(logging.Handler):
    """A log handler that outlives a log it cannot write (the log is on the repository's
    filesystem, which may be full): one line on stderr per outage instead of a
    '--- Logging error ---' traceback per message, and a count once it writes again.
    Stalled archives are also shown by `rpfs disks` and `rpfs points`."""

    lost = 0  # messages that could not be written since the last that could
    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        self.lost += 1
        if self.lost == 1:
            with contextlib.suppress(Exception):  # stderr may be that same full log
                sys.stderr.write(f"rpfs: cannot write the log: {sys.exc_info()[1]}; "
                                 "messages are lost until it can\n")
                sys.stderr.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.failed = False
        super().emit(record)  # the stream or file handler's
        if self.lost and not self.failed:
            lost, self.lost = self.lost, 0
            with contextlib.suppress(Exception):
                self.stream.write(f"rpfs: the log could not be written for {lost} message(s) "
                                  "before this one; some may be missing\n")
                self.flush()


class _StderrLog(_Unfailing, logging.StreamHandler):
    pass


def file_log(root: Path) -> logging.Handler:
    """The daemon's handler of REPO/rpfs.log: created 0600, and outliving a full disk."""
    return _StderrLog(os.fdopen(open_log(root), "a"))


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


def cmd_umount(args: argparse.Namespace) -> int:
    print(unmount(repo_path(args.repo), Path(args.mountpoint)))
    return 0


# -- parsing -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("init", parents=[common], help="create a repository")
    p.add_argument("--block-size", default="64K", help="block size, 4K..4M (default 64K)")
    p.add_argument("--reserve", metavar="SIZE|N%",
                   help="free space to keep on the repository's filesystem (default: the "
                        "smaller of 1%% and 256M)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("capture", parents=[common], help="capture an image or device as a point")
    p.add_argument("disk", help="disk name (created by its first capture)")
    p.add_argument("source", help="raw image file or block device")
    p.add_argument("--name", help="point name (default: UTC timestamp)")
    p.add_argument("--changed", metavar="FILE",
                   help='read only these extents: JSON [{"start": bytes, "length": bytes}, ...]')
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("points", parents=[common], help="list recovery points")
    p.add_argument("disk", nargs="?", help="only this disk's points")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tree", action="store_true", help="show branches left by rollbacks")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("restore", parents=[common], help="write a point to a file or device")
    p.add_argument("point", metavar="DISK@POINT")
    p.add_argument("target", help="file or block device to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty target file")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("clone", parents=[common], help="new writable disk from a point, at once")
    p.add_argument("source", metavar="DISK@POINT|DISK",
                   help="a point, or a writable disk (a point of it is taken first)")
    p.add_argument("name", help="name of the new disk")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("disk", parents=[common], help="create or delete writable disks")
    disk_sub = p.add_subparsers(dest="disk_command", required=True, metavar="ACTION")
    q = disk_sub.add_parser("create", parents=[common], help="an empty writable disk")
    q.add_argument("name")
    q.add_argument("--size", required=True, help="size, e.g. 20G")
    q.set_defaults(func=cmd_disk_create)
    q = disk_sub.add_parser("delete", parents=[common], help="delete a disk and its points")
    q.add_argument("name")
    q.add_argument("--force", action="store_true",
                   help="first copy what clones of it still read from it into them")
    q.add_argument("--with-points", action="store_true",
                   help="delete its points too (required when it has any)")
    q.set_defaults(func=cmd_disk_delete)

    p = sub.add_parser("disks", parents=[common], help="list disks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_disks)

    p = sub.add_parser("snapshot", parents=[common],
                       help="instant point of writable disks (several: one instant)")
    p.add_argument("disks", nargs="+", metavar="DISK")
    p.add_argument("--name", help="point name (default: UTC timestamp)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("rollback", parents=[common], help="bring a closed disk back to a point")
    p.add_argument("point", metavar="DISK@POINT")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("changed", parents=[common], help="extents that differ between points")
    p.add_argument("a", metavar="DISK@POINT")
    p.add_argument("b", metavar="DISK@POINT")
    p.add_argument("--json", action="store_true", help='[{"start": bytes, "length": bytes}]')
    p.set_defaults(func=cmd_changed)

    p = sub.add_parser("allocated", parents=[common], help="extents of a point that hold data")
    p.add_argument("point", metavar="DISK@POINT")
    p.add_argument("--json", action="store_true", help='[{"start": bytes, "length": bytes}]')
    p.set_defaults(func=cmd_allocated)

    p = sub.add_parser("hydrate", parents=[common], help="copy all of a clone's blocks locally")
    p.add_argument("name")
    p.set_defaults(func=cmd_hydrate)

    p = sub.add_parser("mount", parents=[common], help="serve the repository at MOUNTPOINT")
    p.add_argument("mountpoint")
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
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("index", parents=[common], help="the index's checkpoints")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = index_sub.add_parser("restore", parents=[common],
                             help="put the newest good checkpoint back as the index")
    q.add_argument("--list", action="store_true",
                   help="only list the checkpoints and whether each reads cleanly")
    q.add_argument("--force", action="store_true",
                   help="restore even though the index is not damaged")
    q.add_argument("--verify-data", action="store_true",
                   help="decode and hash every chunk, not only check its record header")
    q.set_defaults(func=cmd_index_restore)

    p = sub.add_parser("umount", parents=[common], help="unmount and stop the daemon")
    p.add_argument("mountpoint")
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

