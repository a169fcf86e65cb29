"""The daemon's control socket: disk commands from the CLI, run on the daemon's service.

REPO/control.sock, a Unix socket of mode 0600 owned by the repository directory's owner.
Only root and that owner may use it: the daemon checks each peer's credentials
(SO_PEERCRED) as well, so a loosened mode lets nobody else in. One JSON request per
connection, `{"op": NAME, "args": {...}}` on one line of at most 64 KiB, answered by zero
or more `{"progress": [done, total]}` lines and then `{"ok": RESULT}` or
`{"error": MESSAGE}`.

`OPERATIONS` lists every operation with the JSON type of each argument; a request that
does not match it exactly is refused before anything runs (the service then checks
names and ranges, as it does for the CLI without a daemon). Nothing a client sends, or
leaves unread, ends the daemon: every disk of every VM is served by it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from ..disks.service import DiskService
from ..errors import RpfsError, describe_os_error, is_expected
from ..lifecycle.retention import KEEP_OPTIONS
from ..progress import ProgressFn
from ..repo import Repository, read_daemon_info

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
PROGRESS_INTERVAL = 0.2
MAX_REQUEST = 64 << 10  # bytes of a request line, its newline included
MAX_CONTAINERS = 8  # JSON arrays and objects in a request; a real one has at most 3
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request line
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Arg:
    """The JSON type a request argument must have."""

    kind: str  # as the error message names it
    accepts: Callable[[object], bool]
    required: bool = True


# `type(v) is int`, not isinstance: JSON true is a bool, and bool is an int in Python.
STR = Arg("a string", lambda v: type(v) is str)
INT = Arg("an integer", lambda v: type(v) is int)
FLAG = Arg("true or false", lambda v: type(v) is bool, required=False)
OPTIONAL_STR = Arg("a string or null", lambda v: v is None or type(v) is str, required=False)
STR_LIST = Arg("a list of strings", lambda v: type(v) is list and all(type(s) is str for s in v))
OPTIONAL_INT = Arg("an integer or null", lambda v: v is None or type(v) is int, required=False)
TEXT = Arg("a string", lambda v: type(v) is str, required=False)
OPTIONAL_NUMBER = Arg("a number or null", lambda v: v is None or type(v) in (int, float),
                      required=False)
OPTIONAL_STR_LIST = Arg("a list of strings or null",
                        lambda v: v is None or STR_LIST.accepts(v), required=False)
# A retention's options, as prune and set_policy take them.
KEEP = dict.fromkeys(KEEP_OPTIONS, OPTIONAL_INT)


@dataclass(frozen=True)
class Operation:
    """A control operation: the service method it runs and the arguments a client may pass
    (only these: e.g. `hydrate`'s worker count is the daemon's to choose)."""

    run: Callable[..., object]  # called as run(service, **args)
    args: dict[str, Arg]
    progress: bool = False  # `run` takes a progress callback, reported to the client


OPERATIONS: dict[str, Operation] = {
    "create": Operation(DiskService.create, {"name": STR, "size": INT}),
    "clone": Operation(DiskService.clone, {"source": STR, "name": STR}),
    "delete": Operation(DiskService.delete, {"name": STR, "force": FLAG, "with_points": FLAG}),
    "hydrate": Operation(DiskService.hydrate, {"name": STR}, progress=True),
    "disks": Operation(DiskService.disks, {}),
    "snapshot": Operation(DiskService.snapshot, {"disks": STR_LIST, "name": OPTIONAL_STR,
                                                 "description": TEXT,
                                                 "expires": OPTIONAL_NUMBER}),
    "rollback": Operation(DiskService.rollback, {"point": STR}),
    "stalls": Operation(DiskService.stalls, {}),
    "delete_points": Operation(DiskService.delete_points, {"points": STR_LIST, "purge": FLAG,
                                                           "wait": FLAG}),
    "undelete": Operation(DiskService.undelete, {"point": STR}),
    "prune": Operation(DiskService.prune, {"disk": STR, "dry_run": FLAG, **KEEP}),
    "hold": Operation(DiskService.hold, {"point": STR, "tag": TEXT}),
    "release": Operation(DiskService.release, {"point": STR}),
    "describe": Operation(DiskService.describe, {"point": STR, "text": STR}),
    "list_trash": Operation(DiskService.list_trash, {}),
    "purge_trash": Operation(DiskService.purge_trash, {"points": OPTIONAL_STR_LIST,
                                                       "expired": FLAG}),
    "set_policy": Operation(DiskService.set_policy, {"disk": STR, "every": OPTIONAL_INT,
                                                     **KEEP}),
    "policies": Operation(DiskService.policies, {"disk": OPTIONAL_STR}),
    "clear_policy": Operation(DiskService.clear_policy, {"disk": STR}),
    "apply_policy": Operation(DiskService.apply_policy, {"disk": STR}),
    "info": Operation(DiskService.info, {}),
    "check": Operation(DiskService.check, {}, progress=True),
    "gc": Operation(DiskService.gc, {"threshold": OPTIONAL_NUMBER, "dry_run": FLAG},
                    progress=True),
    "verify": Operation(DiskService.verify, {"points": OPTIONAL_STR_LIST,
                                             "max_duration": OPTIONAL_NUMBER}, progress=True),
    "store_status": Operation(DiskService.store_status, {}),
    "store_sync": Operation(DiskService.store_sync, {"wait": FLAG}, progress=True),
    "config": Operation(DiskService.config, {}),
    "set_setting": Operation(DiskService.set_setting, {"key": STR, "value": INT}),
}


class ClientGone(Exception):
    """The client closed its end; not an error of the daemon (raised by `_send`)."""


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


async def serve_control(root: Path, service: DiskService) -> None:
    """Accept control connections until cancelled."""
    path = socket_path(root)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Not os.umask(): it is the whole process's, and a thread that makes a directory
    # meanwhile (a checkpoint's) would get 0600. The socket's moment at a wider mode is
    # inside the 0700 repository, and every peer's credentials are checked anyway.
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        await trio.serve_listeners(
            functools.partial(_handle, root, service), [trio.SocketListener(sock)]
        )
    finally:
        path.unlink(missing_ok=True)


async def _handle(root: Path, service: DiskService, stream: trio.SocketStream) -> None:
    """Serve one connection; no exception leaves it (it would end the daemon)."""
    async with stream:
        try:
            await _converse(root, service, stream)
        except ClientGone as exc:
            log.info("control client left before its reply: %s", exc)
        except Exception:
            log.exception("control connection failed; the daemon serves on")
            with contextlib.suppress(ClientGone):
                await _send(stream, {"error": "internal error in the rpfs daemon's control "
                                              "connection; see the daemon's log"})


async def _converse(root: Path, service: DiskService, stream: trio.SocketStream) -> None:
    refusal = _refusal(root, stream)
    try:
        line = await _receive_request(stream)
        if refusal is not None:
            raise RpfsError(refusal)
        if line is None:
            return
        name, op, args = parse_request(line)
    except RpfsError as exc:
        await _send(stream, {"error": str(exc)})
        return
    call = functools.partial(op.run, service, **args)
    if op.progress:
        call = functools.partial(call, progress=_progress_sender(stream))
    try:
        result = await trio.to_thread.run_sync(call)
    except RpfsError as exc:
        reply = {"error": str(exc)}
    except ClientGone:
        log.info("control client left during %s: stopped it", name)
        return
    except Exception as exc:
        if is_expected(exc):  # a full disk, a failing device: the operator's to act on
            log.warning("control operation %s failed: %s", name, exc)
            reply = {"error": describe_os_error(exc, service.repo.root)}
        else:
            log.exception("control operation %s failed", name)
            reply = {"error": f"internal error in {name}: {exc}; this is a bug, the "
                              f"traceback is in the daemon's log {root / 'rpfs.log'}"}
    else:
        reply = {"ok": result}
    try:
        await _send(stream, reply)
    except ClientGone:
        log.info("control client left before the reply to %s (%s)", name,
                 "done" if "ok" in reply else reply["error"])


def _refusal(root: Path, stream: trio.SocketStream) -> str | None:
    """Why the peer may not use the socket (logged with its pid and uid), or None.

    Root and the repository directory's owner may: they can reach every file of the
    repository anyway. The kernel took the credentials when the peer connected.
    """
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    try:
        owner = root.stat().st_uid
    except OSError:
        owner = 0
    if uid in (0, owner):
        return None
    log.warning("control connection refused: pid %d, uid %d (gid %d) is neither root nor "
                "the owner of %s (uid %d)", pid, uid, gid, root, owner)
    return (f"permission denied: only root and the owner of {root} (uid {owner}) may use "
            "its rpfs daemon")


async def _receive_request(stream: trio.SocketStream) -> bytes | None:
    """The request line without its newline; None if the client left without a byte."""
    data = bytearray()
    with trio.move_on_after(REQUEST_TIMEOUT):
        while len(data) < MAX_REQUEST:
            try:
                chunk = await stream.receive_some(MAX_REQUEST - len(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(f"while sending its request: {exc}") from None
            if not chunk:
                if data:
                    raise RpfsError("incomplete control request: it must end with a newline")
                return None
            end = chunk.find(b"\n")
            if end >= 0:
                return bytes(data + chunk[:end])
            data += chunk
        raise RpfsError(f"control request longer than {MAX_REQUEST} bytes")
    raise RpfsError(f"no complete control request within {REQUEST_TIMEOUT:.0f} s")


def parse_request(line: bytes) -> tuple[str, Operation, dict]:
    """(name, operation, arguments) of a request line that matches `OPERATIONS` exactly."""
    # json.loads recurses once per level of nesting (60 000 '[' raised RecursionError in
    # the daemon). Counting every '[' and '{', in strings too, bounds the depth at C
    # speed, and refuses no real request: no valid disk or point name holds one.
    if line.count(b"[") + line.count(b"{") > MAX_CONTAINERS:
        raise RpfsError(f"control request with more than {MAX_CONTAINERS} arrays and "
                        "objects ('[' and '{'); a real one has at most 3")
    try:
        request = json.loads(line)
    except ValueError:  # also bad UTF-8 and integers of more than 4300 digits
        raise RpfsError("malformed control request: not a line of JSON") from None
    if type(request) is not dict or "op" not in request or not request.keys() <= {"op", "args"}:
        raise RpfsError('malformed control request: expected {"op": NAME, "args": {...}}')
    name, args = request["op"], request.get("args", {})
    op = OPERATIONS.get(name) if type(name) is str else None
    if op is None:
        raise RpfsError(f"unknown control operation {_excerpt(name)}; "
                        f"known: {', '.join(OPERATIONS)}")
    if type(args) is not dict:
        raise RpfsError(f"the arguments of {name} must be a JSON object")
    for key, value in args.items():
        arg = op.args.get(key)
        if arg is None:
            raise RpfsError(f"{name} takes no argument {_excerpt(key)}")
        if not arg.accepts(value):
            raise RpfsError(f"argument {key} of {name} must be {arg.kind}, "
                            f"not {_excerpt(value)}")
    missing = [key for key, arg in op.args.items() if arg.required and key not in args]
    if missing:
        raise RpfsError(f"{name} needs the argument(s) {', '.join(missing)}")
    return name, op, args


def _excerpt(value: object, limit: int = 40) -> str:
    """`value` as JSON (as the client wrote it), cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress_sender(stream: trio.SocketStream) -> ProgressFn:
    """A progress callback for a worker thread: reports to the client a few times a
    second; raises ClientGone when the client has left, which stops the operation (as
    Ctrl-C of the same command without a daemon would)."""
    token = trio.lowlevel.current_trio_token()
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL or done >= total:
            last = now
            trio.from_thread.run(_send, stream, {"progress": [done, total]}, trio_token=token)

    return progress


async def _send(stream: trio.SocketStream, message: dict) -> None:
    try:
        await stream.send_all(json.dumps(message).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ClientGone(str(exc)) from None


class RemoteService:
    """The CLI's proxy: `remote.clone(source=..., name=...)` runs in the daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, op: str):
        if op not in OPERATIONS:
            raise AttributeError(op)
        return functools.partial(self._call, op)

    def _call(self, op: str, progress: ProgressFn | None = None, **args: object) -> object:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise RpfsError(
                f"cannot reach the rpfs daemon at {self.path}: {exc.strerror}; is it running?"
            ) from None
        gone = f"the rpfs daemon closed the control connection during {op}"
        with sock, sock.makefile("rb") as replies:
            try:
                sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
                for line in replies:
                    message = json.loads(line)
                    if "progress" in message:
                        if progress:
                            progress(*message["progress"])
                    elif "error" in message:
                        raise RpfsError(message["error"])
                    else:
                        return message.get("ok")
            except ConnectionError as exc:  # it died (or was killed) mid-conversation
                raise RpfsError(f"{gone} ({exc.strerror}); see its log") from None
        raise RpfsError(gone)


@contextlib.contextmanager
def disk_service(root: Path) -> Iterator[DiskService | RemoteService]:
    """The daemon's service if a daemon serves `root`, else a local one."""
    if read_daemon_info(root):
        yield RemoteService(socket_path(root))
        return
    with Repository(root) as repo:
        service = DiskService(repo)
        try:
            yield service
        finally:
            service.registry.close_all()
