"""Serving the repository: mount (start the daemon, or be it with --foreground) and
umount, with the checks of the mount's access options."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

from ..errors import RpfsError
from ..perms import check_owner, open_log
from ..repo import repo_path
from ..serve.daemon import MountOptions, serve
from ..serve.mounts import unmount
from ..serve.nbd import parse_address
from ..serve.vfs import Access
from .logs import daemon_logging
from .replicate import serve_stdio

log = logging.getLogger("rpfs")

MOUNT_TIMEOUT = 60.0
MAX_ID = 2**32 - 2  # the largest uid or gid; 2**32 - 1 is (uid_t)-1, "none"
WARNING = "warning: "  # a line the daemon reports before 'ready' (see _read_report)


def _mount_options(args: argparse.Namespace) -> MountOptions:
    """--allow-other, --uid, --gid, --mode, --hydrate, --nonempty and --writeback, checked."""
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
        nonempty=args.nonempty, nbd=_nbd_address(args.nbd), writeback=args.writeback,
    )


def _nbd_address(text: str | None):
    """--nbd's address, checked; a warning when it lets other hosts in."""
    if text is None:
        return None
    address = parse_address(text)
    if address.exposed:
        print(f"rpfs: warning: NBD at {address} is reachable from other hosts and has no "
              "authentication: anyone who can connect reads (and writes) the disks",
              file=sys.stderr)
    return address


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
            *(["--nonempty"] if options.nonempty else []),
            *(["--writeback"] if options.writeback else []),
            *(["--nbd", str(options.nbd)] if options.nbd else [])]


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
    nbd = f", NBD at {options.nbd}" if options.nbd else ""
    print(f"mounted {root} at {mountpoint}{nbd} (daemon pid {proc.pid}, log {log_path})")
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


def cmd_serve(args: argparse.Namespace) -> int:
    """`serve --nbd`: the daemon in this process, NBD exports and no mount, until a signal;
    `serve --stdio`: the far side of a pull or push."""
    if args.stdio:
        return serve_stdio(args)
    root = repo_path(args.repo)
    options = MountOptions(nbd=_nbd_address(args.nbd), hydrate=args.hydrate)
    daemon_logging(root, to_terminal=True)

    def on_ready() -> None:
        print(f"serving {root} over NBD at {options.nbd} (pid {os.getpid()}); stop it with "
              "SIGTERM or Ctrl-C", flush=True)

    def on_warning(message: str) -> None:  # logged already (the terminal sees the log)
        pass

    failed: list[str] = []  # said once, as every command's error (main prints it)

    status = serve(root, None, options, on_ready, on_warning, failed.append)
    if failed:
        raise RpfsError(failed[0])
    return status


def _serve_foreground(
    root: Path, mountpoint: Path, ready_fd: int | None, options: MountOptions
) -> int:
    daemon_logging(root, to_terminal=ready_fd is None)

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


def cmd_umount(args: argparse.Namespace) -> int:
    print(unmount(repo_path(args.repo), Path(args.mountpoint)))
    return 0
