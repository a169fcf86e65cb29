"""The replication commands: send, receive, pull, push, serve."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..errors import RpfsError
from ..lifecycle.policy import has_retention
from ..names import fmt_bytes
from ..progress import progress_bar
from ..replicate.receiver import receive_point
from ..replicate.remote import far_side
from ..replicate.sender import send_point
from ..replicate.session import Summary, answer, drive, greet, hello, telling
from ..replicate.stream import ANSWER, MAGIC, VERSION, Reader, Writer
from ..repo import Repository, repo_path
from ..serve.control import disk_service
from .output import print_json


def cmd_send(args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        raise RpfsError("a stream is binary: write it to a file (-o FILE) or a pipe")
    out_path = Path(args.output) if args.output else None
    if out_path is not None and out_path.exists():
        raise RpfsError(f"{out_path} exists; remove it or choose another -o")
    with Repository(repo_path(args.repo), readonly=True) as repo:
        if out_path is None:
            writer = Writer(sys.stdout.buffer)
            _send(repo, writer, args)
            return 0
        partial = out_path.with_name(out_path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                _send(repo, Writer(f), args)
                f.flush()
                os.fsync(f.fileno())
            os.rename(partial, out_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return 0


def _send(repo: Repository, writer: Writer, args: argparse.Namespace) -> None:
    writer.raw(MAGIC)
    with progress_bar(f"send {args.point}") as bar:
        sent = send_point(repo, writer, args.point, args.base, progress=bar)
    writer.trailer()
    print(f"{sent['point']}: {sent['extents']} blocks in the map, {sent['chunks']} chunks "
          f"({fmt_bytes(sent['chunk_bytes'])}) sent", file=sys.stderr)


def cmd_receive(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    if args.input is None and sys.stdin.isatty():
        raise RpfsError("give a stream on standard input (a pipe from 'rpfs send') or -i FILE")
    with contextlib.ExitStack() as stack:
        if args.input is None:
            src, where, total = sys.stdin.buffer, "the stream on standard input", None
        else:
            try:
                src = stack.enter_context(open(args.input, "rb"))
            except OSError as exc:
                raise RpfsError(f"cannot read {args.input}: {exc.strerror}") from None
            where, total = f"stream file {args.input}", os.fstat(src.fileno()).st_size
        reader = Reader(src, where)
        reader.magic()
        with Repository(root) as repo, progress_bar("receive") as bar:
            point = receive_point(repo, reader, args.disk, progress=bar, total=total)
    _apply_policies(root, {point.disk})
    summary = {"points_published": [point.ref], "bytes_received": reader.bytes,
               "chunk_bytes_received": point.bytes_stored}
    if args.json:
        print_json(summary)
    else:
        print(f"{point.ref}: received, {point.blocks_written} blocks written, "
              f"{fmt_bytes(point.bytes_stored)} stored")
    return 0


def _apply_policies(root: Path, disks: set[str]) -> None:
    """The target's own retention, for each disk that received points."""
    with Repository(root) as repo:
        retains = [d for d in sorted(disks) if has_retention(repo, d)]
    if not retains:
        return
    with disk_service(root) as service:
        for disk in retains:
            plan = service.apply_policy(disk=disk)
            removed = [p["name"] for p in plan if not p["keep"]]
            if removed:
                print(f"disk {disk}: its policy's retention moved {len(removed)} points to "
                      f"the trash: {', '.join(removed)}", file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    root = repo_path(args.repo)
    with far_side(args.source, args.rsh, args.remote_rpfs) as far, Repository(root) as repo:
        hello(far.reader, far.writer, "pull", args.disks, args.last)
        summary = drive(repo, far.reader, far.writer, args.disks, args.last, progress_bar)
    summary.bytes_sent, summary.bytes_received = far.writer.bytes, far.reader.bytes
    _apply_policies(root, summary.disks())
    _report(summary, args.json)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    with far_side(args.target, args.rsh, args.remote_rpfs) as far, Repository(
            repo_path(args.repo), readonly=True) as repo, telling(far.writer):
        hello(far.reader, far.writer, "push", args.disks, args.last)
        theirs = answer(repo, far.reader, far.writer)
    summary = Summary(**{k: v for k, v in theirs.items() if k in Summary.__dataclass_fields__})
    summary.bytes_sent, summary.bytes_received = far.writer.bytes, far.reader.bytes
    _report(summary, args.json)
    return 0


def _report(summary: Summary, as_json: bool) -> None:
    if as_json:
        print_json(vars(summary))
        return
    published = summary.points_published
    print(f"points published: {', '.join(published) if published else 'none'}"
          f"; {summary.points_present} there already; {fmt_bytes(summary.bytes_received)} "
          f"received, {fmt_bytes(summary.bytes_sent)} sent")


def serve_stdio(args: argparse.Namespace) -> int:
    """The far side: speaks the protocol on stdin/stdout (nothing else may print there)."""
    channel_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray write must not reach it
    reader, writer = Reader(sys.stdin.buffer, "the stream from the near side"), Writer(channel_out)
    root = repo_path(args.repo)
    with telling(writer):
        request = greet(reader, writer)
        pushing = request["mode"] == "push"
        with Repository(root, readonly=not pushing) as repo:
            writer.json(ANSWER, {"version": VERSION})
            writer.flush()
            if not pushing:
                answer(repo, reader, writer)
                return 0
            last = request.get("last")
            summary = drive(repo, reader, writer, [str(d) for d in request.get("disks") or []],
                            last if isinstance(last, int) else None, progress_bar)
    _apply_policies(root, summary.disks())
    return 0
