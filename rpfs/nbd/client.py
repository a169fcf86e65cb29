"""An NBD client for capture: read an export, its allocation (`base:allocation`) and a
dirty bitmap (`qemu:dirty-bitmap:NAME`), from an `nbd://HOST[:PORT]/EXPORT` or
`nbd+unix:///EXPORT?socket=PATH` URI.

Our own code rather than libnbd: Debian's python3-libnbd is built for the system
interpreter and cannot be imported from rpfs's virtualenv, and there is no libnbd on
PyPI; what a capture needs (fixed-newstyle GO, structured replies, READ and
BLOCK_STATUS) is a few hundred lines over rpfs/nbd/proto.py, which the server shares.

Reads come from the capture's worker threads: the connection takes one request at a
time under a lock (a capture reads batches of several MiB, so a request's round trip is
small against its transfer). Errors are RpfsError naming the URI.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import RpfsError
from . import proto as p

Extent = tuple[int, int]  # (start, length) in bytes
READ_PIECE = 32 << 20  # the largest read request sent (the protocol's common maximum)
STATUS_PIECE = 1 << 30  # the largest BLOCK_STATUS request sent


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://"))


@dataclass(frozen=True)
class _Target:
    export: str
    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 10809


def _parse(uri: str) -> _Target:
    parts = urlsplit(uri)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if parts.netloc or not sockets:
            raise RpfsError(f"source {uri}: expected nbd+unix:///EXPORT?socket=PATH")
        return _Target(export, unix=sockets[0])
    if parts.scheme == "nbd" and parts.hostname:
        try:
            port = parts.port or 10809
        except ValueError:
            raise RpfsError(f"source {uri}: the port is not a number") from None
        return _Target(export, host=parts.hostname, port=port)
    raise RpfsError(f"source {uri}: expected nbd://HOST[:PORT]/EXPORT or "
                    "nbd+unix:///EXPORT?socket=PATH")


class NbdSource:
    """A capture source read over NBD (what source.Source is for files and devices)."""

    is_file = False

    def __init__(self, uri: str, bitmap: str | None = None) -> None:
        self.path = uri  # what messages name
        self.bitmap = bitmap
        self._lock = threading.Lock()
        self._cookie = 0
        target = _parse(uri)
        try:
            if target.unix is not None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(target.unix)
            else:
                self._sock = socket.create_connection((target.host, target.port))
        except OSError as exc:
            raise RpfsError(f"cannot connect to NBD source {uri}: {exc.strerror or exc}"
                            ) from None
        try:
            self.size, self._contexts = self._handshake(target.export)
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server may have gone first
            self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self._sock.close()

    # -- the wire -----------------------------------------------------------------------

    def _fail(self, what: str) -> RpfsError:
        return RpfsError(f"NBD source {self.path}: {what}; no point was created")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                got = self._sock.recv(min(n - len(buf), 1 << 20))
            except OSError as exc:
                raise self._fail(f"read error: {exc.strerror or exc}") from None
            if not got:
                raise self._fail("the server closed the connection")
            buf += got
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._fail(f"write error: {exc.strerror or exc}") from None

    def _option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final one (ACK or an error)."""
        self._send(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, echoed, kind, length = p.OPTION_REPLY.unpack(self._recv(p.OPTION_REPLY.size))
            if magic != p.REPLY_MAGIC or echoed != option:
                raise self._fail("the server broke the protocol (option reply)")
            replies.append((kind, self._recv(length)))
            if kind == p.REP_ACK or kind & p.REP_ERR:
                return replies

    def _handshake(self, export: str) -> tuple[int, dict[str, int]]:
        """Fixed newstyle: structured replies, the meta contexts, GO. (size, contexts)."""
        magic, opt, flags = p.GREETING.unpack(self._recv(p.GREETING.size))
        if magic != p.NBDMAGIC or opt != p.IHAVEOPT or not flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._fail("not a fixed-newstyle NBD server")
        self._send(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | (
            p.FLAG_C_NO_ZEROES if flags & p.FLAG_NO_ZEROES else 0)))
        if self._option(p.OPT_STRUCTURED_REPLY, b"")[-1][0] != p.REP_ACK:
            raise self._fail("the server does not offer structured replies")
        name = export.encode()
        wanted = [p.BASE_ALLOCATION] + ([p.DIRTY_BITMAP + self.bitmap] if self.bitmap else [])
        queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in wanted)
        replies = self._option(p.OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name
                               + struct.pack(">I", len(wanted)) + queries)
        contexts = {d[4:].decode(errors="replace"): struct.unpack_from(">I", d)[0]
                    for kind, d in replies if kind == p.REP_META_CONTEXT}
        if self.bitmap and p.DIRTY_BITMAP + self.bitmap not in contexts:
            raise self._fail(f"the export has no dirty bitmap {self.bitmap!r}")
        replies = self._option(p.OPT_GO, struct.pack(">I", len(name)) + name
                               + struct.pack(">HH", 1, p.INFO_BLOCK_SIZE))
        kind, data = replies[-1]
        if kind != p.REP_ACK:
            why = data.decode(errors="replace") or f"error {kind & ~p.REP_ERR}"
            raise self._fail(f"the server refused export {export!r}: {why}")
        info = [d for k, d in replies if k == p.REP_INFO and d[:2] == b"\0\0"]
        if not info or len(info[0]) != 12:
            raise self._fail("the server sent no export size")
        _, size, _ = struct.unpack(">HQH", info[0])
        return size, contexts

    def _request(self, kind: int, offset: int, length: int, flags: int = 0) -> int:
        self._cookie += 1
        self._send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, self._cookie, offset, length))
        return self._cookie

    def _chunks(self, cookie: int):
        """The structured reply chunks of request `cookie`: (type, payload) until DONE."""
        while True:
            magic, flags, kind, echoed, length = p.CHUNK.unpack(self._recv(p.CHUNK.size))
            if magic != p.STRUCTURED_REPLY_MAGIC or echoed != cookie:
                raise self._fail("the server broke the protocol (reply)")
            payload = self._recv(length)
            if kind & 0x8000:  # an error chunk
                error, n = struct.unpack_from(">IH", payload)
                message = payload[6 : 6 + n].decode(errors="replace")
                raise self._fail(f"error {error} from the server"
                                 + (f": {message}" if message else ""))
            yield kind, payload
            if flags & p.REPLY_FLAG_DONE:
                return

    # -- what a capture asks ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (zeros past the end of the export)."""
        end = min(offset + length, self.size)
        buf = bytearray(length)  # holes stay zero
        with self._lock:
            for at in range(offset, end, READ_PIECE):
                n = min(READ_PIECE, end - at)
                for kind, payload in self._chunks(self._request(p.CMD_READ, at, n)):
                    if kind == p.REPLY_TYPE_OFFSET_DATA:
                        (start,) = struct.unpack_from(">Q", payload)
                        data = payload[8:]
                        if not (at <= start and start + len(data) <= at + n):
                            raise self._fail("the server sent data outside the read")
                        buf[start - offset : start - offset + len(data)] = data
        return bytes(buf)

    def _extents(self, context: str, wanted) -> list[Extent]:
        """The byte ranges whose status under `context` `wanted` accepts."""
        context_id = self._contexts[context]
        out: list[Extent] = []
        pos = 0
        with self._lock:
            while pos < self.size:
                n = min(STATUS_PIECE, self.size - pos)
                got = 0
                for kind, payload in self._chunks(self._request(p.CMD_BLOCK_STATUS, pos, n)):
                    if kind != p.REPLY_TYPE_BLOCK_STATUS or struct.unpack_from(
                            ">I", payload)[0] != context_id:
                        continue
                    at = pos
                    for i in range(4, len(payload) - 7, 8):
                        length, status = struct.unpack_from(">II", payload, i)
                        length = min(length, self.size - at)
                        if wanted(status) and length:
                            if out and out[-1][0] + out[-1][1] == at:
                                out[-1] = (out[-1][0], out[-1][1] + length)
                            else:
                                out.append((at, length))
                        at += length
                    got = at - pos
                if got <= 0:
                    raise self._fail(f"no block status for {context} at {pos}")
                pos += got
        return out

    def data_extents(self) -> list[Extent]:
        """The ranges that may hold data: all but those `base:allocation` says read as
        zeros (a server without it: the whole export)."""
        if p.BASE_ALLOCATION not in self._contexts:
            return [(0, self.size)] if self.size else []
        return self._extents(p.BASE_ALLOCATION, lambda s: not s & p.STATE_ZERO)

    def dirty_extents(self) -> list[Extent]:
        """The ranges the dirty bitmap marks: all that changed since it was started."""
        assert self.bitmap is not None
        return self._extents(p.DIRTY_BITMAP + self.bitmap, lambda s: s & p.STATE_DIRTY)
