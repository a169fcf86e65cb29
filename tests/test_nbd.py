"""NBD exports of the daemon (`rpfs mount --nbd`, `rpfs serve --nbd`), through real
clients from Debian packages (scripts/install-deps installs them): nbdinfo and nbdcopy
(libnbd-bin), qemu-img and qemu-io (qemu-utils), qemu-storage-daemon as the server a
capture reads (qemu-system-common). Block status maps are checked against `rpfs
allocated` and `rpfs changed`, bytes against saved copies and the FUSE mount. The
bad-input tests speak raw bytes to the socket, as a broken or hostile client would, while
an honest client keeps reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    MiB,
    assert_check_clean,
    pid_alive,
    point_image,
    write_at,
)

from rpfs.nbd import proto as p

SIZE = 32 * MiB


def uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd[0]}: {res.returncode} {res.stdout} {res.stderr}"
    return res


def nbd_map(sock: Path, export: str, context: str = "base:allocation") -> list[dict]:
    res = run("nbdinfo", f"--map={context}", "--json", uri(sock, export))
    return json.loads(res.stdout)


def extents_where(entries: list[dict], wanted) -> list[dict]:
    """The map's entries whose type `wanted` accepts, as merged {"start", "length"}."""
    out: list[dict] = []
    for e in entries:
        if not wanted(e["type"]):
            continue
        if out and out[-1]["start"] + out[-1]["length"] == e["offset"]:
            out[-1]["length"] += e["length"]
        else:
            out.append({"start": e["offset"], "length": e["length"]})
    return out


def covers(entries: list[dict], size: int) -> None:
    """A map's entries tile the whole export, in order."""
    at = 0
    for e in entries:
        assert e["offset"] == at, entries
        at += e["length"]
    assert at == size, entries


@pytest.fixture
def history(rpfs, repo, tmp_path):
    """vm@p1 (a sparse disk: data at 1-4 MiB and 20-21 MiB), vm@p2 (two pieces rewritten,
    one zeroed); their saved copies."""
    source = tmp_path / "vm.img"
    with open(source, "wb") as f:
        f.truncate(SIZE)
    write_at(source, 1 * MiB, random.Random(1).randbytes(3 * MiB))
    write_at(source, 20 * MiB, random.Random(2).randbytes(1 * MiB))
    rpfs.capture("vm", source, "p1")
    saved = {"p1": shutil.copyfile(source, tmp_path / "p1.img")}
    write_at(source, 2 * MiB + 4096, random.Random(3).randbytes(100_000))
    write_at(source, 20 * MiB, bytes(256 * 1024))  # back to zeros
    write_at(source, 30 * MiB, random.Random(4).randbytes(64 * 1024))
    rpfs.capture("vm", source, "p2")
    saved["p2"] = shutil.copyfile(source, tmp_path / "p2.img")
    return saved


@pytest.fixture
def nbd_mount(mount, tmp_path):
    """Mount with NBD on a unix socket: (mountpoint, socket)."""
    sock = tmp_path / "nbd.sock"
    mnt, _ = mount(None, "--nbd", f"unix:{sock}")
    assert sock.is_socket()
    assert os.stat(sock).st_mode & 0o777 == 0o600
    return mnt, sock


def test_list_and_maps_equal_allocated_and_changed(rpfs, history, nbd_mount):
    mnt, sock = nbd_mount
    rpfs("clone", "vm@p1", "c", check=True)
    listing = json.loads(run("nbdinfo", "--list", "--json", uri(sock)).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == [
        "disks/c", "points/vm/p1", "points/vm/p2"]

    for name in ("p1", "p2"):
        entries = nbd_map(sock, f"points/vm/{name}")
        covers(entries, SIZE)
        allocated = json.loads(rpfs("allocated", f"vm@{name}", "--json", check=True).stdout)
        assert extents_where(entries, lambda t: t == 0) == allocated
        assert all(t in (0, 3) for t in (e["type"] for e in entries))

    for a, b in (("p1", "p2"), ("p2", "p1"), ("p2", "p2")):
        entries = nbd_map(sock, f"points/vm/{b}", f"qemu:dirty-bitmap:{a}")
        covers(entries, SIZE)
        changed = json.loads(rpfs("changed", f"vm@{a}", f"vm@{b}", "--json",
                                  check=True).stdout)
        assert extents_where(entries, lambda t: t == 1) == changed
        if a != b:
            assert changed, "the test needs points that differ"

    # The clone: its origin's blocks at depth 2 until written, its own writes at 1.
    with open(mnt / "disks" / "c.img", "r+b") as f:
        f.seek(8 * MiB)
        f.write(random.Random(5).randbytes(128 * 1024))
        f.flush()
        os.fsync(f.fileno())
    # Zeros over origin data (WRITE_ZEROES, may punch): a local hole, at depth 1.
    run("qemu-io", "-f", "raw", "-c", "write -z -u 1M 64k", uri(sock, "disks/c"))
    depth = nbd_map(sock, "disks/c", "qemu:allocation-depth")
    covers(depth, SIZE)
    assert extents_where(depth, lambda t: t == 1) == [
        {"start": 1 * MiB, "length": 64 * 1024}, {"start": 8 * MiB, "length": 128 * 1024}]
    assert extents_where(depth, lambda t: t == 2) == [
        {"start": 1 * MiB + 64 * 1024, "length": 3 * MiB - 64 * 1024},
        {"start": 20 * MiB, "length": 1 * MiB}]
    rpfs("snapshot", "c", "--name", "s1", check=True)
    wait_complete(rpfs, "c", "s1")
    allocated = json.loads(rpfs("allocated", "c@s1", "--json", check=True).stdout)
    assert extents_where(nbd_map(sock, "disks/c"), lambda t: t == 0) == allocated
    assert extents_where(nbd_map(sock, "points/c/s1"), lambda t: t == 0) == allocated
    assert extents_where(nbd_map(sock, "disks/c", "qemu:dirty-bitmap:s1"),
                         lambda t: t == 1) == []
    changed = json.loads(rpfs("changed", "vm@p1", "c@s1", "--json", check=True).stdout)
    assert extents_where(nbd_map(sock, "disks/c", "qemu:dirty-bitmap:vm@p1"),
                         lambda t: t == 1) == changed


def wait_complete(rpfs, disk: str, point: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while rpfs.point(disk, point)["state"] != "complete":
        assert time.monotonic() < deadline, f"{disk}@{point} did not complete"
        time.sleep(0.2)


def test_nbdcopy_and_qemu_img_read_points_exactly(history, nbd_mount, tmp_path):
    mnt, sock = nbd_mount
    for name, saved in history.items():
        export = uri(sock, f"points/vm/{name}")
        copy = tmp_path / f"{name}.copy"
        run("nbdcopy", export, copy)
        run("cmp", copy, saved)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", export,
            point_image(mnt, "vm", name))
        qcow2 = tmp_path / f"{name}.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", export, qcow2)
        res = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, saved)
        assert "Images are identical" in res.stdout
    # Holes came as holes: the qcow2 holds about the point's data, not its size.
    assert os.path.getsize(tmp_path / "p1.qcow2") < 6 * MiB


def test_qemu_io_writes_over_nbd_read_through_fuse_and_a_snapshot_between(
        rpfs, history, nbd_mount, tmp_path):
    mnt, sock = nbd_mount
    rpfs("clone", "vm@p2", "c", check=True)
    export = uri(sock, "disks/c")
    model = bytearray(history["p2"].read_bytes())

    def qemu_io(*commands: str) -> None:
        args = [a for c in commands for a in ("-c", c)]
        run("qemu-io", "-f", "raw", *args, export)

    qemu_io("write -P 0xab 1M 256k", "write -z -u 2M 1M", "write -P 0x11 31M 4k", "flush")
    model[1 * MiB : 1 * MiB + 256 * 1024] = b"\xab" * (256 * 1024)
    model[2 * MiB : 3 * MiB] = bytes(1 * MiB)
    model[31 * MiB : 31 * MiB + 4096] = b"\x11" * 4096
    assert (mnt / "disks" / "c.img").read_bytes() == model
    rpfs("snapshot", "c", "--name", "between", check=True)
    at_snapshot = bytes(model)
    qemu_io("write -P 0xcd 1M 64k", "discard 20M 1M", "write -z 30M 64k", "flush")
    model[1 * MiB : 1 * MiB + 64 * 1024] = b"\xcd" * (64 * 1024)
    model[20 * MiB : 21 * MiB] = bytes(1 * MiB)  # rpfs's TRIM zeroes whole blocks
    model[30 * MiB : 30 * MiB + 64 * 1024] = bytes(64 * 1024)
    assert (mnt / "disks" / "c.img").read_bytes() == model
    assert point_image(mnt, "c", "between").read_bytes() == at_snapshot
    copy = tmp_path / "c.copy"
    run("nbdcopy", uri(sock, "points/c/between"), copy)
    assert copy.read_bytes() == at_snapshot
    # And the other way: a FUSE write is what an NBD reader gets.
    with open(mnt / "disks" / "c.img", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x77" * 4096)
    model[5 * MiB : 5 * MiB + 4096] = b"\x77" * 4096
    run("nbdcopy", export, copy)
    assert copy.read_bytes() == model
    wait_complete(rpfs, "c", "between")
    assert_check_clean(rpfs)


def test_an_open_export_blocks_rollback_and_delete(rpfs, history, nbd_mount):
    _, sock = nbd_mount
    rpfs("clone", "vm@p2", "c", check=True)
    rpfs("snapshot", "c", "--name", "s1", check=True)
    held = subprocess.Popen(["qemu-io", "-f", "raw", uri(sock, "disks/c")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        held.stdin.write("read 0 4k\n")
        held.stdin.flush()
        assert "read 4096/4096" in held.stdout.readline()
        res = rpfs("rollback", "c@s1")
        assert res.returncode != 0 and "open" in res.stderr, res.stderr
        res = rpfs("disk", "delete", "c", "--with-points")
        assert res.returncode != 0 and "open" in res.stderr, res.stderr
    finally:
        held.communicate("quit\n", timeout=30)
    rpfs("rollback", "c@s1", check=True)


def test_serve_nbd_without_a_mount_over_tcp(rpfs, history, tmp_path):
    port = _free_port()
    proc = rpfs.popen("serve", "--nbd", f"tcp:{port}", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"over NBD at tcp:127.0.0.1:{port}" in line, (line, proc.stderr)
        copy = tmp_path / "p2.copy"
        run("nbdcopy", f"nbd://127.0.0.1:{port}/points/vm/p2", copy)
        run("cmp", copy, history["p2"])
        busy = rpfs("serve", "--nbd", f"tcp:{_free_port()}")  # one daemon per repository
        assert busy.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    res = rpfs("serve", "--nbd", "tcp:nonsense")
    assert res.returncode != 0 and "--nbd" in res.stderr
    # An address other hosts reach: a warning first (192.0.2.1 is no address of this
    # host, so nothing listens: the bind fails with one clear error).
    res = rpfs("serve", "--nbd", "tcp:192.0.2.1:10809", timeout=60)
    assert res.returncode != 0
    assert "reachable from other hosts and has no authentication" in res.stderr
    assert "cannot listen for NBD at tcp:192.0.2.1:10809" in res.stderr
    res = rpfs("serve", "--nbd", "tcp:0.0.0.0:1", "--stdio")
    assert res.returncode != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- bad input, spoken raw ------------------------------------------------------------


class RawClient:
    """Just enough of a client to say what real clients never would."""

    def __init__(self, sock: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(str(sock))
        magic, opt, flags = p.GREETING.unpack(self.recv(p.GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT) and flags & p.FLAG_FIXED_NEWSTYLE

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            got = self.s.recv(n - len(data))
            if not got:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += got
        return data

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert (magic, opt) == (p.REPLY_MAGIC, option)
            replies.append((kind, self.recv(length)))
            if kind == p.REP_ACK or kind & p.REP_ERR:
                return replies

    def go(self, export: str, structured: bool = True) -> tuple[int, int]:
        self.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        name = export.encode()
        replies = self.option(p.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert replies[-1][0] == p.REP_ACK, replies
        _, size, flags = struct.unpack(">HQH", next(d for k, d in replies if k == p.REP_INFO
                                                    and d[:2] == b"\0\0"))
        return size, flags

    def request(self, kind: int, offset: int, length: int, flags: int = 0,
                payload: bytes = b"", cookie: int = 7) -> None:
        self.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, cookie, offset, length)
                       + payload)

    def simple_error(self) -> int:
        magic, error, _ = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error

    def chunk(self) -> tuple[int, int, bytes]:
        magic, flags, kind, _, length = p.CHUNK.unpack(self.recv(p.CHUNK.size))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return flags, kind, self.recv(length)

    def close(self) -> None:
        self.s.close()


def test_bad_requests_get_the_protocols_errors(rpfs, history, nbd_mount):
    _, sock = nbd_mount
    c = RawClient(sock)
    c.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))
    assert c.option(99, b"junk") == [(p.REP_ERR_UNSUP, b"option 99 is not supported")]
    name = b"points/vm/nothere"
    kind, _ = c.option(p.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")[-1]
    assert kind == p.REP_ERR_UNKNOWN
    assert c.option(p.OPT_GO, b"\0\0\0\xff")[-1][0] == p.REP_ERR_INVALID  # overruns
    assert c.option(p.OPT_LIST, b"x")[-1][0] == p.REP_ERR_INVALID
    query = struct.pack(">I", 15) + b"points/vm/p1" + b"\0\0\0\x01"
    assert c.option(p.OPT_SET_META_CONTEXT, query)[-1][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_ABORT) == [(p.REP_ACK, b"")]
    c.close()

    c = RawClient(sock)
    size, flags = c.go("points/vm/p1")
    assert size == SIZE and flags & p.FLAG_READ_ONLY
    c.request(p.CMD_WRITE, 0, 4096, payload=b"x" * 4096)
    assert c.simple_error() == p.EPERM
    c.request(p.CMD_WRITE_ZEROES, 0, 4096)
    assert c.simple_error() == p.EPERM
    c.request(p.CMD_READ, SIZE - 512, 1024)  # past the end
    flags_, kind, data = c.chunk()
    assert kind == p.REPLY_TYPE_ERROR and flags_ & p.REPLY_FLAG_DONE
    assert struct.unpack_from(">I", data)[0] == p.EINVAL
    c.request(p.CMD_BLOCK_STATUS, 0, 4096)  # no context negotiated
    assert struct.unpack_from(">I", c.chunk()[2])[0] == p.EINVAL
    c.request(42, 0, 0)  # no such command
    assert c.simple_error() == p.EINVAL
    c.request(p.CMD_READ, 1 * MiB, 8192)  # and it still reads, exactly
    flags_, kind, data = c.chunk()
    assert kind == p.REPLY_TYPE_OFFSET_DATA and flags_ & p.REPLY_FLAG_DONE
    assert data[8:] == history["p1"].read_bytes()[1 * MiB : 1 * MiB + 8192]
    c.request(p.CMD_READ, 10 * MiB, 8192)  # zeros come as a hole
    flags_, kind, data = c.chunk()
    assert kind == p.REPLY_TYPE_OFFSET_HOLE and struct.unpack(">QI", data) == (10 * MiB, 8192)
    c.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # out of step: the server hangs up
    with pytest.raises(EOFError):
        c.recv(1)
    c.close()


def test_the_old_export_name_option_serves_too(history, nbd_mount):
    _, sock = nbd_mount
    c = RawClient(sock)
    c.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))  # so the 124 zeros come
    name = b"points/vm/p2"
    c.s.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name)
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE and flags & p.FLAG_READ_ONLY and c.recv(124) == bytes(124)
    c.request(p.CMD_READ, 2 * MiB, 4096)
    assert c.simple_error() == 0  # no structured replies negotiated: a simple one
    assert c.recv(4096) == history["p2"].read_bytes()[2 * MiB : 2 * MiB + 4096]
    c.close()
    c = RawClient(sock)  # an unknown name: the option has no error reply, so a hang-up
    c.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE) + p.OPTION.pack(
        p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"nope")
    with pytest.raises(EOFError):
        c.recv(1)
    c.close()


def test_a_client_gone_with_reads_in_flight_is_no_internal_error(rpfs, history, nbd_mount):
    """A client that resets its connection with 16 reads in flight: the connection
    closes quietly (the reset reaches `run` grouped by transmit's nursery), and the
    daemon goes on serving."""
    _, sock = nbd_mount
    for _ in range(3):
        c = RawClient(sock)
        c.go("points/vm/p1")
        for i in range(16):
            c.request(p.CMD_READ, i * MiB + 4096, 65536, cookie=i)
        c.s.recv(1, socket.MSG_PEEK)  # replies are coming, unread
        time.sleep(0.2)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # with replies unread: the daemon's next receive fails, ECONNRESET
    time.sleep(1)  # its connection tasks see the reset
    c = RawClient(sock)
    c.go("points/vm/p1")
    c.request(p.CMD_READ, 1 * MiB, 4096)
    assert c.chunk()[2][8:] == history["p1"].read_bytes()[1 * MiB : 1 * MiB + 4096]
    c.close()
    log = (rpfs.repo / "rpfs.log").read_text()
    assert "internal error" not in log, log[-2000:]


def test_an_image_of_any_size_copies_exactly(rpfs, repo, nbd_mount, tmp_path):
    """A point of a size that is no multiple of 512 (captured from any file): the
    export's minimum block size is then 1, so libnbd asks for its tail too."""
    src = tmp_path / "odd.img"
    src.write_bytes(random.Random(5).randbytes(100_000))
    rpfs.capture("odd", src, "p1")
    _, sock = nbd_mount
    entries = nbd_map(sock, "points/odd/p1")
    covers(entries, 100_000)
    copy = tmp_path / "odd.copy"
    run("nbdcopy", uri(sock, "points/odd/p1"), copy)
    assert copy.read_bytes() == src.read_bytes()


def _valid_session(rng: random.Random) -> list[bytes]:
    """The messages of a well-formed session after the greeting: client flags, options
    (among them every one with a structure), a GO, then requests."""
    def option(number: int, data: bytes = b"") -> bytes:
        return p.OPTION.pack(p.IHAVEOPT, number, len(data)) + data

    def string(text: bytes, width: str = ">I") -> bytes:
        return struct.pack(width, len(text)) + text

    name = rng.choice([b"points/vm/p1", b"points/vm/p2", b"disks/nothere", b""])
    queries = [b"base:allocation", b"qemu:dirty-bitmap:p2", b"qemu:", b"base:",
               b"qemu:allocation-depth", b"qemu:dirty-bitmap:vm@p1"]
    chosen = rng.sample(queries, rng.randrange(0, 4))
    contexts = string(name) + struct.pack(">I", len(chosen)) + b"".join(map(string, chosen))
    messages = [struct.pack(">I", 3), option(p.OPT_STRUCTURED_REPLY)]
    messages += rng.sample([
        option(p.OPT_LIST), option(p.OPT_LIST_META_CONTEXT, contexts),
        option(p.OPT_SET_META_CONTEXT, contexts),
        option(p.OPT_INFO, string(name) + struct.pack(">HHH", 2, 1, 3)),
        option(rng.getrandbits(32), rng.randbytes(rng.randrange(0, 16))),
    ], rng.randrange(0, 4))
    messages.append(option(p.OPT_GO, string(name) + struct.pack(">HH", 1, 3))
                    if rng.random() < 0.8 else option(p.OPT_EXPORT_NAME, name))
    for _ in range(rng.randrange(0, 5)):
        kind = rng.randrange(0, 9)
        length = rng.choice([0, 512, 4096, 65536, rng.randrange(0, 1 << 22)])
        offset = rng.choice([0, rng.randrange(0, SIZE), SIZE - 512, SIZE])
        flags = rng.choice([0, 0, p.CMD_FLAG_FUA, p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE,
                            rng.getrandbits(16)])
        payload = bytes(length) if kind == p.CMD_WRITE else b""
        messages.append(p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, rng.getrandbits(64),
                                       offset, length) + payload)
    return messages


def _fuzz_case(rng: random.Random) -> bytes:
    """A well-formed session, mutated: bytes flipped, a length field made small or huge,
    bytes cut or inserted, the session truncated; or plain noise."""
    if rng.random() < 0.05:
        return rng.randbytes(rng.randrange(0, 64))
    data = bytearray(b"".join(_valid_session(rng)))
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(0, len(data))
        what = rng.randrange(5)
        if what == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif what == 1:
            data[at] = rng.getrandbits(8)
        elif what == 2 and at + 4 <= len(data):  # a 32-bit field, likely a length
            value = rng.choice([0, 1, 5, rng.randrange(0, 64), 4096, 4097, (1 << 32) - 1])
            data[at : at + 4] = struct.pack(">I", value)
        elif what == 3:
            del data[at : at + rng.randrange(1, 8)]
        else:
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
    if rng.random() < 0.3:
        del data[rng.randrange(0, len(data) + 1):]
    return bytes(data)


def test_fuzzed_handshakes_and_requests_leave_the_daemon_serving(
        rpfs, history, nbd_mount, mount, tmp_path):
    _, sock = nbd_mount
    pid = mount.daemon_pid()
    stop = threading.Event()
    passes, failures = [0], []

    def honest() -> None:
        copy = tmp_path / "honest.copy"
        while not stop.is_set():
            res = subprocess.run(["nbdcopy", uri(sock, "points/vm/p2"), str(copy)],
                                 capture_output=True, text=True, timeout=120)
            if res.returncode != 0 or copy.read_bytes() != history["p2"].read_bytes():
                failures.append(res.stderr or "bytes differ")
            passes[0] += 1

    reader = threading.Thread(target=honest)
    reader.start()
    rng = random.Random(int(os.environ.get("RPFS_NBD_FUZZ_SEED", "15")))
    try:
        for _ in range(int(os.environ.get("RPFS_NBD_FUZZ_CASES", "3000"))):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            try:
                s.connect(str(sock))
                s.recv(p.GREETING.size)
                s.sendall(_fuzz_case(rng))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 16):  # what it answers, until it hangs up
                    pass
            except (TimeoutError, ConnectionError):
                pass
            finally:
                s.close()
    finally:
        stop.set()
        reader.join(timeout=180)
    assert failures == []
    assert passes[0] >= 2
    assert pid_alive(pid), "the daemon died"
    log = (rpfs.repo / "rpfs.log").read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    run("nbdinfo", uri(sock, "points/vm/p1"))
    assert_check_clean(rpfs)


# -- capture from an NBD source ------------------------------------------------------


class CountingProxy:
    """A unix-socket proxy in front of an NBD server that counts the bytes the server
    sends (what a client read), so a capture's reads are measured outside rpfs."""

    def __init__(self, server: Path, path: Path) -> None:
        self.server, self.path = server, path
        self.received = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.server))
            for src, dst, counted in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                if counted:
                    with self._lock:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture
def storage_daemon(tmp_path):
    """qemu-storage-daemon exporting a qcow2 (32 MiB, data at 1-4 MiB and 20-21 MiB) as
    `vda` over NBD with its persistent dirty bitmap `b1`: (socket, image)."""
    image = tmp_path / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE))
    raw = tmp_path / "seed.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    write_at(raw, 1 * MiB, random.Random(11).randbytes(3 * MiB))
    write_at(raw, 20 * MiB, random.Random(12).randbytes(1 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    run("qemu-img", "bitmap", "--add", image, "b1")
    sock = tmp_path / "qsd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={image}",
         "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=exp0,node-name=fmt0,name=vda,writable=on,bitmaps.0=b1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
            time.sleep(0.05)
        yield sock, raw
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_capture_from_nbd_with_a_dirty_bitmap_reads_only_what_changed(
        rpfs, repo, storage_daemon, tmp_path):
    qsd, raw = storage_daemon
    proxy = CountingProxy(qsd, tmp_path / "proxy.sock")
    try:
        source = uri(proxy.path, "vda")
        rpfs("capture", "vm", source, "--name", "p1", check=True)
        full = proxy.received
        # base:allocation skipped the holes: the 4 MiB of data, not the 32 MiB disk.
        assert 4 * MiB <= full <= 4 * MiB + 256 * 1024, full
        restored = tmp_path / "p1.raw"
        rpfs("restore", "vm@p1", restored, check=True)
        run("cmp", restored, raw)

        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 5M 64k", "-c",
            "write -P 0x78 30M 128k", "-c", "write -z 2M 64k", uri(qsd, "vda"))
        now = tmp_path / "now.raw"
        run("nbdcopy", uri(qsd, "vda"), now)
        before = proxy.received
        res = rpfs("capture", "vm", source, "--name", "p2", "--bitmap", "b1", check=True)
        read = proxy.received - before
        # The 192 KiB of new data (the zeroed 64 KiB come as a hole), plus the protocol's
        # bytes: a few KiB, not the 4 MiB of data a capture without the bitmap reads.
        assert 192 * 1024 <= read <= 192 * 1024 + 16 * 1024, read
        assert "dirty-bitmap" in res.stdout
        rpfs("restore", "vm@p2", restored, "--force", check=True)
        run("cmp", restored, now)
        assert rpfs.point("vm", "p2")["method"] == "dirty-bitmap"
    finally:
        proxy.close()
    assert_check_clean(rpfs)

    res = rpfs("capture", "other", uri(qsd, "vda"), "--bitmap", "b1")
    assert res.returncode != 0 and "capture once without --bitmap" in res.stderr
    res = rpfs("capture", "vm", uri(qsd, "vda"), "--bitmap", "nosuch")
    assert res.returncode != 0 and "no dirty bitmap 'nosuch'" in res.stderr
    res = rpfs("capture", "vm", raw, "--bitmap", "b1")
    assert res.returncode != 0 and "needs an NBD source" in res.stderr
    res = rpfs("capture", "vm", uri(tmp_path / "none.sock", "vda"))
    assert res.returncode != 0 and "cannot connect" in res.stderr
    res = rpfs("capture", "vm", uri(qsd, "nothere"))
    assert res.returncode != 0 and "refused export 'nothere'" in res.stderr
    assert [p["name"] for p in rpfs.points("vm")] == ["p1", "p2"]
