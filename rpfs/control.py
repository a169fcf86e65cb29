"""The daemon's control socket: disk commands from the CLI, run on the daemon's service.

REPO/control.sock, a Unix socket owned by root, mode 0600. One JSON request per
connection, `{"op": NAME, "args": {...}}`, answered by zero or more
`{"progress": [done, total]}` lines and then `{"ok": RESULT}` or `{"error": MESSAGE}`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from .errors import RpfsError, describe_os_error, is_expected
from .progress import ProgressFn
from .repo import Repository, read_daemon_info
from .service import DiskService

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
OPS = {"create", "clone", "delete", "hydrate", "disks", "snapshot", "rollback", "stalls"}
WITH_PROGRESS = {"hydrate"}
PROGRESS_INTERVAL = 0.2


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


async def serve_control(root: Path, service: DiskService) -> None:
    """Accept control connections until cancelled."""
    path = socket_path(root)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    try:
        await trio.serve_listeners(
            functools.partial(_handle, service), [trio.SocketListener(sock)]
        )
    finally:
        path.unlink(missing_ok=True)


async def _handle(service: DiskService, stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while not data.endswith(b"\n") and len(data) < 65536:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        try:
            request = json.loads(data)
            op, args = request["op"], dict(request.get("args", {}))
        except (ValueError, KeyError, TypeError):
            await _send(stream, {"error": "malformed control request"})
            return
        if op not in OPS:
            await _send(stream, {"error": f"unknown control operation {op!r}"})
            return
        token = trio.lowlevel.current_trio_token()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL or done >= total:
                last[0] = now
                trio.from_thread.run(_send, stream, {"progress": [done, total]}, trio_token=token)

        if op in WITH_PROGRESS:
            args["progress"] = progress
        method = getattr(service, op)
        try:
            result = await trio.to_thread.run_sync(functools.partial(method, **args))
        except RpfsError as exc:
            reply = {"error": str(exc)}
        except (TypeError, ValueError) as exc:
            reply = {"error": f"bad arguments for {op}: {exc}"}
        except Exception as exc:
            if is_expected(exc):  # a full disk, a failing device: the operator's to act on
                log.warning("control operation %s failed: %s", op, exc)
                reply = {"error": describe_os_error(exc, service.repo.root)}
            else:
                log.exception("control operation %s failed", op)
                reply = {"error": f"internal error in {op}: {exc}; this is a bug, the "
                                  f"traceback is in the daemon's log "
                                  f"{service.repo.root / 'rpfs.log'}"}
        else:
            reply = {"ok": result}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _send(stream, reply)


async def _send(stream: trio.SocketStream, message: dict) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


class RemoteService:
    """The CLI's proxy: `remote.clone(source=..., name=...)` runs in the daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, op: str):
        if op not in OPS:
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
        with sock, sock.makefile("rb") as replies:
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
        raise RpfsError(f"the rpfs daemon closed the control connection during {op}")


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
            service.close_all()
