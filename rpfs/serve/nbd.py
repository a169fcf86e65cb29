"""NBD exports of the daemon's images: translate the protocol (rpfs/nbd/proto.py) to image
handles (handles.Images), nothing more.

Exports are `points/DISK/POINT` (read-only) and `disks/NAME` (read-write), opened through
the same Images the FUSE mount uses, so an NBD client shares open disks, the chunk cache
and the disk locks with it: an open export counts as an open image (rollback and delete
refuse it), a write is the same LiveDisk.write a FUSE write is, and a snapshot's barrier
covers both. Block status answers come from disks/status.py.

One trio task per connection reads requests and starts a task for each (at most
IN_FLIGHT at once), which runs the blocking handle call in a worker thread behind the
exports' one CapacityLimiter and sends its reply whole under the connection's send lock:
replies may overtake each other, as the protocol allows. A client that breaks the
protocol gets the error reply the specification gives where there is one; where there
is none (a bad request magic, a malformed greeting) its connection is closed. Nothing a
client sends ends the server or another client's connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import ChunkError, RpfsError
from ..index import IndexDamaged
from ..names import ceil_div
from ..nbd import proto as p
from .handles import INLINE_READ_MAX, INLINE_WRITE_MAX, Handle, Images
from .readqueue import ReadQueue, takes

log = logging.getLogger(__name__)

T = TypeVar("T")
IN_FLIGHT = 16  # requests of one connection handled at once
THREADS = 4  # worker threads for every connection's blocking calls
MAX_OPTION = 64 << 10  # option data longer than this is refused (and the client cut off)
MAX_STATUS_BLOCKS = 1 << 20  # blocks one BLOCK_STATUS request looks at, at most
ZERO_PIECE = 1 << 20  # a WRITE_ZEROES with NO_HOLE writes zeros in pieces of this size
# CAN_MULTI_CONN: one process, one state for every connection (a FLUSH persists all).
EXPORT_FLAGS = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_CACHE | (
    p.FLAG_CAN_MULTI_CONN)
WRITABLE_FLAGS = p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FAST_ZERO
# The command flags each command may carry (FUA any: the protocol says accept it).
ALLOWED_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_DF, p.CMD_WRITE: 0, p.CMD_FLUSH: 0, p.CMD_TRIM: 0, p.CMD_CACHE: 0,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
}


class _Hangup(Exception):
    """The client closed the connection, or must be cut off (the protocol gives no reply)."""


@dataclass(frozen=True)
class Address:
    """Where the exports listen: a unix socket, or TCP (loopback unless a host is given)."""

    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 10809

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"tcp:{self.host}:{self.port}"

    @property
    def exposed(self) -> bool:
        """Whether others than this host may connect (NBD has no authentication)."""
        if self.path is not None:
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name
            return self.host != "localhost"


def parse_address(text: str) -> Address:
    """`unix:PATH`, `tcp:PORT`, `tcp:HOST:PORT` (an IPv6 HOST in brackets)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Address(path=Path(rest))
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if port.isdigit() and 0 < int(port) < 65536:
            return Address(host=host, port=int(port))
    raise RpfsError(f"--nbd {text!r}: expected unix:PATH, tcp:PORT or tcp:HOST:PORT")


@dataclass(frozen=True)
class _Export:
    """An export's name, parsed: a point (disk, point) or a writable disk (disk, None)."""

    disk: str
    point: str | None

    @classmethod
    def parse(cls, name: str) -> _Export | None:
        parts = name.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "points":
            return cls(parts[1], parts[2])
        if len(parts) == 2 and parts[0] == "disks":
            return cls(parts[1], None)
        return None

    @property
    def writable(self) -> bool:
        return self.point is None


@dataclass(frozen=True)
class _Context:
    """A negotiated meta context: what BLOCK_STATUS reports under `id`."""

    id: int
    name: str


class Exports:
    """The NBD face of the daemon's images: shared by every connection."""

    def __init__(self, images: Images, reads: ReadQueue) -> None:
        self.images = images
        self.reads = reads
        self.limiter = trio.CapacityLimiter(THREADS)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def names(self) -> list[str]:
        points, disks = self.images.names()
        return [f"points/{d}/{n}" for d, n in points] + [f"disks/{n}" for n in disks]

    def size(self, export: _Export) -> int:
        if export.point is None:
            return self.images.disk_info(export.disk).size
        return self.images.point_info(export.disk, export.point).size

    def open(self, export: _Export) -> Handle:
        if export.point is None:
            return self.images.open_disk(export.disk)
        return self.images.open_point(export.disk, export.point)

    def contexts(self, export: _Export, queries: list[str], listing: bool) -> list[str]:
        """The meta contexts `queries` select on `export` (for LIST, an empty list and the
        namespace queries `base:`, `qemu:` and `qemu:dirty-bitmap:` list all there are)."""
        bitmaps = [p.DIRTY_BITMAP + n for n in self.images.history_points(export.disk)]
        every = [p.BASE_ALLOCATION, p.ALLOCATION_DEPTH, *bitmaps]
        if listing and not queries:
            return every
        out: list[str] = []
        for query in queries:
            if listing and query in ("base:", "qemu:", p.DIRTY_BITMAP):
                found = [c for c in every if c.startswith(query)]
            elif query in (p.BASE_ALLOCATION, p.ALLOCATION_DEPTH) or self._bitmap(export, query):
                found = [query]
            else:
                found = []
            out += [c for c in found if c not in out]
        return out

    def _bitmap(self, export: _Export, query: str) -> bool:
        """Whether `query` is a dirty bitmap of `export`: a point of its history."""
        return query.startswith(p.DIRTY_BITMAP) and self.images.compared_point(
            export.disk, export.point, query[len(p.DIRTY_BITMAP):]) is not None


def listen(address: Address) -> list[socket.socket]:
    """The listening sockets for `address`, bound now (before the daemon reports ready,
    so a taken port is the command's error, not a log line); OSError if it cannot."""
    if address.path is None:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except BaseException:
            sock.close()
            raise
    else:
        with contextlib.suppress(FileNotFoundError):
            if address.path.is_socket():
                address.path.unlink()  # a killed daemon's: the daemon lock is ours now
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)  # NBD has no authentication: the owner's alone (0600)
        try:
            sock.bind(str(address.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(umask)
    sock.listen(64)
    return [sock]


async def serve_nbd(
    address: Address, sockets: list[socket.socket], exports: Exports,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every connection to `sockets` (from `listen(address)`) until cancelled."""
    log.info("NBD exports listening at %s", address)
    try:
        async with trio.open_nursery() as nursery:
            for sock in sockets:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                nursery.start_soon(_accept, listener, exports)
            task_status.started()
    finally:
        if address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                address.path.unlink()


async def _accept(listener: trio.SocketListener, exports: Exports) -> None:
    async with listener, trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and the like: this connection, not the server
                log.warning("NBD: cannot accept a connection: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_Connection(stream, exports).run)


class _Connection:
    """One client: the handshake, the option haggling, then transmission."""

    def __init__(self, stream: trio.abc.Stream, exports: Exports) -> None:
        self.stream = stream
        self.exports = exports
        self.buf = bytearray()
        self.send_lock = trio.Lock()
        self.structured = False
        self.contexts: list[_Context] = []
        self.contexts_for: str | None = None  # the export SET_META_CONTEXT named
        self.no_zeroes = False
        self.in_flight = 0  # requests of this connection being handled
        self.handle: Handle | None = None
        self.export: _Export | None = None
        self.name = ""

    # -- bytes --------------------------------------------------------------------------

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(max(1 << 16, n - len(self.buf)))
            if not data:
                raise _Hangup
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        """Send a whole reply; nothing if the client has gone (it asked, then hung up)."""
        async with self.send_lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(data)

    # -- life ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                if await self.negotiate():
                    await self.transmit()
            # except*: a client gone while requests were in flight arrives grouped by
            # transmit's nursery (trio's strict exception groups), not bare.
            except* (_Hangup, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except Exception:
            log.exception("NBD: internal error on a connection (export %r); closed it",
                          self.name)
        finally:
            with trio.CancelScope(shield=True):
                if self.handle is not None:
                    await self.exports.run(self.handle.close)
                await self.stream.aclose()

    # -- handshake and options ----------------------------------------------------------

    async def negotiate(self) -> bool:
        """The fixed-newstyle handshake: True once an export is open for transmission."""
        await self.stream.send_all(p.GREETING.pack(
            p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (flags,) = p.CLIENT_FLAGS.unpack(await self.recv(4))
        if not flags & p.FLAG_C_FIXED_NEWSTYLE or flags & ~(
                p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise _Hangup  # the protocol says: disconnect
        self.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION.unpack(await self.recv(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise _Hangup
            if length > MAX_OPTION:
                await self.reply(option, p.REP_ERR_TOO_BIG, b"option data too long")
                raise _Hangup  # its data cannot be skipped at a reasonable cost
            data = await self.recv(length)
            done = await self.option(option, data)
            if done is not None:
                return done

    async def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        await self.send(p.option_reply(option, kind, data))

    async def option(self, option: int, data: bytes) -> bool | None:
        """Answer one option; True to start transmission, False to end, None for more."""
        if option == p.OPT_EXPORT_NAME:
            name = data.decode(errors="replace")
            chosen = await self.choose(name)
            export = _Export.parse(name)
            if chosen is None or export is None:
                raise _Hangup  # this option has no error reply: the protocol disconnects
            try:
                handle = await self.exports.run(self.exports.open, export)
            except OSError:
                raise _Hangup from None
            self.start(name, export, handle)
            tail = b"" if self.no_zeroes else bytes(124)
            await self.send(struct.pack(">QH", handle.size, chosen[1]) + tail)
            return True
        if option == p.OPT_ABORT:
            await self.reply(option, p.REP_ACK)
            return False
        if option == p.OPT_LIST:
            if data:
                return await self.refuse(option, p.REP_ERR_INVALID, "LIST takes no data")
            for name in await self.exports.run(self.exports.names):
                raw = name.encode()
                await self.reply(option, p.REP_SERVER, struct.pack(">I", len(raw)) + raw)
            await self.reply(option, p.REP_ACK)
            return None
        if option in (p.OPT_INFO, p.OPT_GO):
            return await self.info_or_go(option, data)
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                return await self.refuse(option, p.REP_ERR_INVALID, "takes no data")
            self.structured = True
            await self.reply(option, p.REP_ACK)
            return None
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            return await self.meta_context(option, data)
        return await self.refuse(option, p.REP_ERR_UNSUP, f"option {option} is not supported")

    async def refuse(self, option: int, kind: int, message: str) -> None:
        await self.reply(option, kind, message.encode())

    async def choose(self, name: str) -> tuple[int, int] | None:
        """(size, transmission flags) of export `name`, or None if there is none."""
        export = _Export.parse(name)
        if export is None:
            return None
        try:
            size = await self.exports.run(self.exports.size, export)
        except OSError:
            return None
        flags = EXPORT_FLAGS | (WRITABLE_FLAGS if export.writable else p.FLAG_READ_ONLY)
        if self.structured:
            flags |= p.FLAG_SEND_DF  # an unfragmented read needs a structured reply
        return size, flags

    async def info_or_go(self, option: int, data: bytes) -> bool | None:
        if len(data) < 6:
            return await self.refuse(option, p.REP_ERR_INVALID, "malformed request")
        (length,) = struct.unpack_from(">I", data)
        if length > len(data) - 6 or length > p.MAX_STRING:
            return await self.refuse(option, p.REP_ERR_INVALID, "malformed export name")
        name = data[4 : 4 + length].decode(errors="replace")
        (count,) = struct.unpack_from(">H", data, 4 + length)
        if len(data) != 6 + length + 2 * count:
            return await self.refuse(option, p.REP_ERR_INVALID, "malformed information list")
        wanted = set(struct.unpack_from(f">{count}H", data, 6 + length))
        chosen = await self.choose(name)
        if chosen is None:
            return await self.refuse(option, p.REP_ERR_UNKNOWN, f"no export {name!r}")
        export = _Export.parse(name)
        assert export is not None
        handle = None
        if option == p.OPT_GO:
            try:
                handle = await self.exports.run(self.exports.open, export)
            except OSError as exc:
                kind = p.REP_ERR_UNKNOWN if exc.errno == errno.ENOENT else p.REP_ERR_POLICY
                return await self.refuse(option, kind, exc.strerror or str(exc))
            chosen = (handle.size, chosen[1])
        size, flags = chosen
        await self.reply(option, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, size, flags))
        if p.INFO_NAME in wanted:
            await self.reply(option, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + name.encode())
        block = self.exports.images.repo.block_size
        # The size should be a multiple of the minimum (libnbd refuses a request for the
        # tail otherwise); an image captured from a file of any size may not be.
        minimum = p.MIN_BLOCK if size % p.MIN_BLOCK == 0 else 1
        await self.reply(option, p.REP_INFO, struct.pack(
            ">HIII", p.INFO_BLOCK_SIZE, minimum, block, p.MAX_BLOCK))
        await self.reply(option, p.REP_ACK)
        if handle is None:
            return None
        self.start(name, export, handle)
        return True

    def start(self, name: str, export: _Export, handle: Handle) -> None:
        """Transmission will serve `handle`, the export `name`."""
        self.handle, self.name, self.export = handle, name, export
        if self.contexts_for != name:
            self.contexts = []  # negotiated for another export: void

    async def meta_context(self, option: int, data: bytes) -> None:
        listing = option == p.OPT_LIST_META_CONTEXT
        if not listing:
            self.contexts, self.contexts_for = [], None  # a SET replaces, even one that fails
        parsed = _parse_context_request(data)
        if parsed is None:
            return await self.refuse(option, p.REP_ERR_INVALID, "malformed request")
        name, queries = parsed
        if not listing and not self.structured:
            return await self.refuse(option, p.REP_ERR_INVALID,
                                     "structured replies must be negotiated first")
        export = _Export.parse(name)
        if export is None or await self.choose(name) is None:
            return await self.refuse(option, p.REP_ERR_UNKNOWN, f"no export {name!r}")
        found = await self.exports.run(self.exports.contexts, export, queries, listing)
        contexts = [_Context(i, c) for i, c in enumerate(found, start=1)]
        for context in contexts:
            await self.reply(option, p.REP_META_CONTEXT,
                             struct.pack(">I", 0 if listing else context.id)
                             + context.name.encode())
        if not listing:
            self.contexts, self.contexts_for = contexts, name
        await self.reply(option, p.REP_ACK)

    # -- transmission -------------------------------------------------------------------

    async def transmit(self) -> None:
        assert self.handle is not None
        slots = trio.Semaphore(IN_FLIGHT)
        async with trio.open_nursery() as nursery:  # the requests in flight finish first
            with contextlib.suppress(_Hangup):
                while True:
                    magic, flags, kind, cookie, offset, length = p.REQUEST.unpack(
                        await self.recv(p.REQUEST.size))
                    if magic != p.REQUEST_MAGIC:
                        raise _Hangup  # out of step with the client: nothing else is safe
                    if kind == p.CMD_DISC:
                        break
                    payload = b""
                    if kind == p.CMD_WRITE:
                        if length > p.MAX_BLOCK:
                            raise _Hangup  # cannot be read, nor skipped at a sane cost
                        payload = await self.recv(length)
                    await slots.acquire()
                    nursery.start_soon(self.command, slots, flags, kind, cookie, offset,
                                       length, payload)

    async def command(self, slots: trio.Semaphore, flags: int, kind: int, cookie: int,
                      offset: int, length: int, payload: bytes) -> None:
        self.in_flight += 1
        try:
            error, message = self.invalid(flags, kind, offset, length), ""
            if not error:
                try:
                    if await self.perform(flags, kind, cookie, offset, length, payload):
                        return  # it replied itself
                except Exception as exc:
                    error, message = _errno_of(exc, self.name, kind)
            await self.send(self.error_reply(kind, cookie, error, message) if error
                            else p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))
        finally:
            self.in_flight -= 1
            slots.release()

    def invalid(self, flags: int, kind: int, offset: int, length: int) -> int:
        """The error a request earns before it is tried, 0 if none."""
        assert self.handle is not None
        if kind not in ALLOWED_FLAGS or flags & ~(ALLOWED_FLAGS[kind] | p.CMD_FLAG_FUA):
            return p.EINVAL  # an unknown command, or a flag it does not take
        if kind == p.CMD_FLUSH:
            return p.EINVAL if offset or length else 0
        if offset + length > self.handle.size:
            return p.ENOSPC if kind in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
        if kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES) and not self.handle.writable:
            return p.EPERM
        if kind == p.CMD_READ and length > p.MAX_BLOCK:
            return p.EOVERFLOW if self.structured else p.EINVAL
        if kind == p.CMD_BLOCK_STATUS and not (self.structured and self.contexts and length):
            return p.EINVAL
        if flags & p.CMD_FLAG_DF and not (kind == p.CMD_READ and self.structured):
            return p.EINVAL
        return 0

    def error_reply(self, kind: int, cookie: int, error: int, message: str) -> bytes:
        if self.structured and kind in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            return p.chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, cookie,
                           p.error_payload(error, message))
        return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie)

    async def perform(self, flags: int, kind: int, cookie: int, offset: int, length: int,
                      payload: bytes) -> bool:
        """Carry out a valid request: True if it sent its reply (reads, block status)."""
        handle = self.handle
        assert handle is not None
        if kind == p.CMD_READ:
            # Read on this thread what is at hand (decoded in the cache, or local), and a
            # small read alone in flight on this connection that waits on no lock: the
            # hand-off to a worker costs more than either (fuse.py's measured choice).
            lone = self.in_flight == 1 and length <= INLINE_READ_MAX and not (
                handle.read_may_wait)
            data = (handle.read if lone else handle.read_at_hand)(offset, length)
            if data is None and takes(handle, length):
                data = await self.exports.reads.read(handle.read_many, offset, length)
            elif data is None:
                data = await self.exports.run(handle.read, offset, length)
            await self.send(self.read_reply(flags, cookie, offset, data))
            return True
        if kind == p.CMD_BLOCK_STATUS:
            await self.send(await self.exports.run(self.status_reply, flags, cookie, offset,
                                                   length))
            return True
        if kind == p.CMD_WRITE:
            # A small write into local blocks whose locks are free: here (as fuse.py).
            done = 0
            if length <= INLINE_WRITE_MAX:
                done = handle.write_at_hand(offset, payload) or 0
            if done < length:
                await self.exports.run(_write_all, handle, offset + done, payload[done:])
        elif kind == p.CMD_WRITE_ZEROES and flags & p.CMD_FLAG_NO_HOLE:
            await self.exports.run(self.provision, offset, length)
        elif kind in (p.CMD_WRITE_ZEROES, p.CMD_TRIM):
            # TRIM's range may read as anything after; zeros (holes) are the cheapest.
            await self.exports.run(handle.zero_range, offset, length)
        elif kind == p.CMD_CACHE:
            await self.exports.run(self.cache, offset, length)
        if kind == p.CMD_FLUSH or flags & p.CMD_FLAG_FUA:
            await self.exports.run(handle.sync)
        return False

    def provision(self, offset: int, length: int) -> None:
        """WRITE_ZEROES with NO_HOLE: zeros written out, so the range stays allocated."""
        assert self.handle is not None
        for at in range(offset, offset + length, ZERO_PIECE):
            _write_all(self.handle, at, bytes(min(ZERO_PIECE, offset + length - at)))

    def cache(self, offset: int, length: int) -> None:
        """CACHE: the image brings the range close (handles: Handle.hydrate)."""
        assert self.handle is not None
        self.handle.hydrate(offset, length)

    def read_reply(self, flags: int, cookie: int, offset: int, data: bytes) -> bytes:
        """Simple: the data. Structured: a chunk per run of data or of blocks that read
        as zeros (OFFSET_HOLE, nothing sent for them), unless the client said DF."""
        if not self.structured:
            return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie) + data
        if not data:  # a read of nothing: no content chunk may be empty
            return p.chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie)
        if flags & p.CMD_FLAG_DF:
            return p.chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, cookie,
                           struct.pack(">Q", offset) + data)
        runs = _zero_runs(data, offset, self.exports.images.repo.block_size)
        out = []
        for i, (start, end, zero) in enumerate(runs):
            done = p.REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            at = offset + start
            if zero:
                out.append(p.chunk(done, p.REPLY_TYPE_OFFSET_HOLE, cookie,
                                   struct.pack(">QI", at, end - start)))
            else:
                out.append(p.chunk(done, p.REPLY_TYPE_OFFSET_DATA, cookie,
                                   struct.pack(">Q", at) + data[start:end]))
        return b"".join(out)

    def status_reply(self, flags: int, cookie: int, offset: int, length: int) -> bytes:
        """One BLOCK_STATUS chunk per negotiated context, covering the request from
        `offset` (at most MAX_STATUS_BLOCKS blocks of it; the client asks again for the
        rest), runs of equal status merged; REQ_ONE: the first run alone."""
        handle = self.handle
        assert handle is not None
        bs = self.exports.images.repo.block_size
        end = min(offset + length, handle.size)
        first, last = offset // bs, min(ceil_div(end, bs), offset // bs + MAX_STATUS_BLOCKS)
        end = min(end, last * bs)
        out = []
        for i, context in enumerate(self.contexts):
            values = self.context_values(context.name, first, last)
            descriptors = _runs(values, first, bs, offset, end)
            if flags & p.CMD_FLAG_REQ_ONE:
                descriptors = descriptors[:1]
            payload = struct.pack(">I", context.id) + b"".join(
                struct.pack(">II", n, v) for n, v in descriptors)
            done = p.REPLY_FLAG_DONE if i == len(self.contexts) - 1 else 0
            out.append(p.chunk(done, p.REPLY_TYPE_BLOCK_STATUS, cookie, payload))
        return b"".join(out)

    def context_values(self, name: str, first: int, end: int) -> list[int]:
        """The status value of each block of [first, end) under context `name`."""
        status = self.handle.status  # type: ignore[union-attr]
        if name == p.BASE_ALLOCATION:
            zero = p.STATE_HOLE | p.STATE_ZERO
            return [0 if data else zero for data in status.data(first, end)]
        if name == p.ALLOCATION_DEPTH:
            return status.depth(first, end)
        assert self.export is not None
        point = self.exports.images.compared_point(
            self.export.disk, self.export.point, name[len(p.DIRTY_BITMAP):])
        if point is None:  # deleted since it was negotiated: every block may differ
            return [p.STATE_DIRTY] * (end - first)
        return [p.STATE_DIRTY if d else 0 for d in status.dirty(point, first, end)]


def _parse_context_request(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT request, None if malformed."""
    try:
        (length,) = struct.unpack_from(">I", data)
        if length > p.MAX_STRING:
            return None
        name = data[4 : 4 + length].decode()
        at = 4 + length
        (count,) = struct.unpack_from(">I", data, at)
        at += 4
        queries = []
        for _ in range(count):
            (n,) = struct.unpack_from(">I", data, at)
            if n > p.MAX_STRING or at + 4 + n > len(data):
                return None
            queries.append(data[at + 4 : at + 4 + n].decode())
            at += 4 + n
        return (name, queries) if at == len(data) and len(name) == length else None
    except (struct.error, UnicodeDecodeError):
        return None


def _write_all(handle: Handle, offset: int, data: bytes) -> None:
    """A whole write (the handle may write short, like pwrite)."""
    done = 0
    while done < len(data):
        done += handle.write(offset + done, data[done:])


def _zero_runs(data: bytes, offset: int, bs: int) -> list[tuple[int, int, bool]]:
    """(start, end, all zero) runs of `data` (read at `offset`), cut at block boundaries."""
    zero = bytes(bs)
    runs: list[tuple[int, int, bool]] = []
    start = 0
    while start < len(data):
        end = min(len(data), (offset + start) // bs * bs + bs - offset)
        piece = data[start:end]
        is_zero = piece == zero[: len(piece)]
        if runs and runs[-1][2] == is_zero:
            runs[-1] = (runs[-1][0], end, is_zero)
        else:
            runs.append((start, end, is_zero))
        start = end
    return runs


def _runs(values: list[int], first: int, bs: int, offset: int, end: int
          ) -> list[tuple[int, int]]:
    """(length, value) descriptors of per-block `values` (of blocks from `first`), for the
    bytes [offset, end): equal neighbours merged."""
    out: list[tuple[int, int]] = []
    pos = offset
    for i, value in enumerate(values):
        stop = min((first + i + 1) * bs, end)
        if stop <= pos:
            continue
        if out and out[-1][1] == value:
            out[-1] = (out[-1][0] + stop - pos, value)
        else:
            out.append((stop - pos, value))
        pos = stop
    return out


def _errno_of(exc: Exception, export: str, kind: int) -> tuple[int, str]:
    """The protocol's error for what a request raised: EIO for bad or unreadable data
    (logged where it was met, with disk, point and block) and for internal errors."""
    if isinstance(exc, ChunkError):
        return p.EIO, "data unreadable"
    if isinstance(exc, IndexDamaged):
        log.error("%s", exc)
        return p.EIO, "index damaged"
    if isinstance(exc, OSError):
        known = {errno.EROFS: p.EPERM, errno.EPERM: p.EPERM, errno.ENOSPC: p.ENOSPC,
                 errno.EDQUOT: p.ENOSPC, errno.EINVAL: p.EINVAL, errno.ENOMEM: p.ENOMEM}
        return known.get(exc.errno or 0, p.EIO), exc.strerror or str(exc)
    if isinstance(exc, RpfsError):
        log.warning("NBD export %s: command %d failed: %s", export, kind, exc)
        return p.EIO, str(exc)
    log.exception("NBD export %s: internal error in command %d", export, kind)
    return p.EIO, "internal error"
