"""The daemon's control socket as another user, a careless client or a fuzzer uses it.

Every VM's disk is served by the one daemon, so no request may end it: each malformed
request gets a one-line error and changes nothing, a client that leaves early is not an
error, and only root and the repository's owner are served at all. Requests are sent
raw, as bytes on the real socket of a real daemon; the peer checks run as a real
unprivileged user made for the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
import trio
from conftest import Mounter, Rpfs
from helpers import (
    MiB,
    assert_one_line_error,
    assert_same_bytes,
    disks_by_name,
    is_fuse_mounted,
    local_files,
    pid_alive,
    point_image,
    write_random,
)

from rpfs.disks.livedisk import create_local_file
from rpfs.disks.service import DiskService
from rpfs.errors import RpfsError
from rpfs.repo import Repository
from rpfs.serve import control

CLIENT_PYTHON = "/usr/bin/python3"  # one the test user may run (the venv's is under /root)


@pytest.fixture
def repo_dir() -> Iterator[Path]:
    """The repository, in a folder every user may pass through (pytest's tmp_path is
    0700 root's): another user's request must get as far as the daemon's own check."""
    base = Path(tempfile.mkdtemp(prefix="rpfs-control-"))
    try:
        base.chmod(0o755)
        yield base / "repo"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Served:
    repo: Path
    mnt: Path
    sock: Path
    pid: int
    src: Path  # the bytes of point vm@p1
    image: Path  # vm@p1 in the mount


@pytest.fixture
def served(rpfs: Rpfs, repo: Path, mount: Mounter, tmp_path: Path) -> Served:
    """A daemon serving a repository with one point, vm@p1 (8 MiB of random bytes)."""
    src = tmp_path / "vm.img"
    write_random(src, 8 * MiB, seed=3)
    rpfs.capture("vm", src, "p1")
    mnt, _ = mount()
    return Served(repo, mnt, repo / "control.sock", mount.daemon_pid(), src,
                  point_image(mnt, "vm", "p1"))


def ask(sock: Path, data: bytes, close_early: bool = False) -> bytes:
    """Send `data` on a new connection and half-close it; everything the daemon sent back.
    `close_early`: close at once instead, before any reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))  # blocking: waits while the listen queue is full
        s.settimeout(30)
        try:
            s.sendall(data)
            if close_early:
                return b""
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # it stopped reading a too-long one
            pass
        out = b""
        with contextlib.suppress(ConnectionResetError):  # it closed with some unread
            while chunk := s.recv(65536):
                out += chunk
        return out


def error_of(sock: Path, data: bytes) -> str:
    """The error message of the one-line error reply the daemon must give to `data`."""
    lines = ask(sock, data).splitlines()
    assert len(lines) == 1, f"expected one reply line to {data[:80]!r}, got {lines}"
    reply = json.loads(lines[0])
    assert list(reply) == ["error"] and isinstance(reply["error"], str), reply
    assert "internal error" not in reply["error"], reply
    return reply["error"]


def assert_serving(rpfs: Rpfs, served: Served, disks: set[str] = frozenset({"vm"})) -> None:
    """The same daemon still serves, `rpfs disks` answers with `disks` and no local file
    was made for a refused request."""
    assert pid_alive(served.pid), "the daemon died"
    assert is_fuse_mounted(served.mnt)
    assert set(disks_by_name(rpfs)) == set(disks)
    assert len(local_files(served.repo)) == len(disks - {"vm"}), local_files(served.repo)
    log = (served.repo / "rpfs.log").read_text()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300):][:3000]


# -- item 5: each request that ended the daemon or acted on bad arguments -----------------


DEEP = [
    b"[" * 60000 + b"\n",
    b'{"op": "create", "args": {"name": "x", "size": ' + b"[" * 5000 + b"\n",
    b'{"op": "disks", "args": {"a": ' + b'{"b": ' * 3000 + b"1" + b"}" * 3001 + b"}\n",
]


def test_deep_nesting_is_refused_and_the_daemon_serves_on(rpfs, served):
    for data in DEEP:
        assert "more than 8 arrays and objects" in error_of(served.sock, data)
        assert pid_alive(served.pid), f"the daemon died at {data[:60]!r}"
    assert_serving(rpfs, served)


LEAVING = [
    b"not json\n",
    b'{"op": "create", "args": {"name": "x", "size": true}}\n',
    b'{"op": "create", "args": {"name": "../x", "size": 4096}}\n',  # refused by the service
    b'{"op": "disks"}\n',
]


def test_a_client_that_leaves_before_its_reply_ends_nothing(rpfs, served):
    for data in LEAVING:
        for _ in range(20):  # the daemon's reply meets a closed socket (EPIPE) every time
            ask(served.sock, data, close_early=True)
        assert pid_alive(served.pid), f"the daemon died at {data!r}"
    assert_serving(rpfs, served)
    assert "control client left before" in (served.repo / "rpfs.log").read_text()


def test_unhashable_op_is_an_unknown_operation(rpfs, served):
    assert "unknown control operation [1]" in error_of(served.sock, b'{"op": [1]}\n')
    assert_serving(rpfs, served)


BAD_SIZES = [
    ("true", "argument size of create must be an integer, not true"),
        ("1.0", "must be an integer"),
        ('"4096"', "must be an integer"),
        ("null", "must be an integer"),
        ("0", "invalid size 0"),
        ("-4096", "invalid size -4096"),
        (str(10**30), f"invalid size {10**30}"),
        (str(2**64), f"invalid size {2**64}"),
        (str(2**48 + 1), "a disk holds 1 to 281474976710656 bytes"),  # 2^32 blocks of 64K
        ("9" * 4000, "invalid size of 4000 digits"),
        ("9" * 5000, "not a line of JSON"),  # more digits than json.loads converts
    ("NaN", "must be an integer"),
]


def test_create_refuses_a_bad_size_before_making_anything(rpfs, served):
    for size, expected in BAD_SIZES:
        data = b'{"op": "create", "args": {"name": "x", "size": %s}}\n' % size.encode()
        assert expected in error_of(served.sock, data), size
        assert local_files(served.repo) == set(), f"an orphan local file after size {size}"
    assert_serving(rpfs, served)  # no disk x


BAD_REQUESTS = {
    "empty-line": (b"\n", "not a line of JSON"),
    "bad-utf8": (b'{"op": "disks\xff"}\n', "not a line of JSON"),
    "a-list": (b'["disks"]\n', "expected {"),
    "no-op": (b'{"args": {}}\n', "expected {"),
    "extra-key": (b'{"op": "disks", "user": "root"}\n', "expected {"),
    "op-not-str": (b'{"op": 7}\n', "unknown control operation 7"),
    "unknown-op": (b'{"op": "close_all"}\n', "unknown control operation \"close_all\""),
    "private-op": (b'{"op": "_new_disk"}\n', "unknown control operation"),
    "args-not-object": (b'{"op": "disks", "args": ["x"]}\n', "must be a JSON object"),
    "args-null": (b'{"op": "disks", "args": null}\n', "must be a JSON object"),
    "unknown-arg": (b'{"op": "hydrate", "args": {"name": "vm", "workers": 100000}}\n',
                    "hydrate takes no argument \"workers\""),
    "progress-arg": (b'{"op": "hydrate", "args": {"name": "vm", "progress": 1}}\n',
                     "takes no argument \"progress\""),
    "missing-arg": (b'{"op": "create", "args": {"name": "x"}}\n', "create needs the argument"),
    "name-not-str": (b'{"op": "create", "args": {"name": ["x"], "size": 4096}}\n',
                     "argument name of create must be a string"),
    "bad-name": (b'{"op": "create", "args": {"name": "../x", "size": 4096}}\n',
                 "invalid disk name"),
    "force-not-bool": (b'{"op": "delete", "args": {"name": "vm", "force": 1}}\n',
                       "must be true or false"),
    "disks-not-list": (b'{"op": "snapshot", "args": {"disks": "vm"}}\n',
                       "must be a list of strings"),
    "disks-of-ints": (b'{"op": "snapshot", "args": {"disks": [1, 2]}}\n',
                      "must be a list of strings"),
    "empty-point-name": (b'{"op": "snapshot", "args": {"disks": ["vm"], "name": ""}}\n',
                         "invalid point name"),
    "clone-into-bad-name": (b'{"op": "clone", "args": {"source": "vm@p1", "name": "a/b"}}\n',
                            "invalid disk name"),
    "rollback-not-str": (b'{"op": "rollback", "args": {"point": {"vm": "p1"}}}\n',
                         "must be a string"),
    "no-newline": (b'{"op": "disks"}', "incomplete control request"),
    "too-long": (b" " * (70 << 10), "longer than 65536 bytes"),
}


def test_malformed_requests_get_one_line_errors_and_change_nothing(rpfs, served):
    for name, (data, expected) in BAD_REQUESTS.items():
        message = error_of(served.sock, data)
        assert expected in message, f"{name}: {message!r}"
        assert pid_alive(served.pid), f"the daemon died at {name}"
    assert_serving(rpfs, served)
    assert [p["name"] for p in rpfs.points()] == ["p1"]


def test_hydrate_whose_client_leaves_stops_and_resumes_later(rpfs, served):
    rpfs("clone", "vm@p1", "c", check=True)
    ask(served.sock, b'{"op": "hydrate", "args": {"name": "c"}}\n', close_early=True)
    log = served.repo / "rpfs.log"
    deadline = time.monotonic() + 20
    while "client left during hydrate: stopped it" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    rpfs("hydrate", "c", check=True)
    assert disks_by_name(rpfs)["c"]["hydrated_pct"] == 100
    assert_same_bytes(served.mnt / "disks" / "c.img", served.src)
    assert_serving(rpfs, served, {"vm", "c"})


async def test_a_stalled_client_is_answered_after_the_request_timeout(repo, monkeypatch):
    """A client that never finishes its request holds the connection only so long
    (in-process: the real server code and socket, with a short timeout)."""
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.5)
    with Repository(repo) as opened:
        service = DiskService(opened)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.serve_control, repo, service)
            while not (repo / "control.sock").exists():
                await trio.sleep(0.01)
            stalled = await trio.open_unix_socket(str(repo / "control.sock"))
            await stalled.send_all(b'{"op": "disks"')
            # Another client is served meanwhile.
            other = await trio.open_unix_socket(str(repo / "control.sock"))
            await other.send_all(b'{"op": "disks"}\n')
            with trio.fail_after(5):
                assert await other.receive_some(4096) == b'{"ok": []}\n'
                reply = await stalled.receive_some(4096)
            assert b"no complete control request within" in reply
            await stalled.aclose()
            await other.aclose()
            nursery.cancel_scope.cancel()
        service.registry.close_all()


# -- item 9: a size no disk can have, through the CLI --------------------------------------


IMPOSSIBLE_SIZES = [
    ("18446744073709551616", "invalid size 18446744073709551616 for disk x"),  # 2^64
    ("257T", "a disk holds 1 to 281474976710656 bytes"),
    ("9" * 5000, "5000 digits are more than any disk holds"),
]


@pytest.mark.parametrize("daemon", [False, True], ids=["no-daemon", "daemon"])
def test_disk_create_with_an_impossible_size_is_one_line(rpfs, repo, mount, daemon):
    if daemon:
        mount()
    for size, expected in IMPOSSIBLE_SIZES:
        res = rpfs("disk", "create", "x", "--size", size)
        assert_one_line_error(res, expected)
        assert disks_by_name(rpfs) == {}
        assert local_files(repo) == set(), "an orphan local file was left behind"
    if daemon:
        assert pid_alive(mount.daemon_pid())


def test_a_disk_whose_record_cannot_commit_leaves_no_local_file(repo, monkeypatch):
    with Repository(repo) as opened:
        service = DiskService(opened)

        def full(*args):
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")

        monkeypatch.setattr(opened.index, "put_disk", full)
        with pytest.raises(lmdb.MapFullError):
            service.create("x", MiB)
        service.registry.close_all()
    assert local_files(repo) == set()


def test_a_local_file_that_cannot_be_sized_is_removed(tmp_path):
    with pytest.raises(OverflowError):  # what ftruncate raises past 2^63-1
        create_local_file(tmp_path / "disks" / "1.raw", 2**64)
    assert list((tmp_path / "disks").iterdir()) == []


# -- item 3: who may use the socket --------------------------------------------------------


@dataclass
class User:
    name: str
    uid: int
    gid: int

    def ask(self, sock: Path, request: dict) -> tuple[int, str]:
        """Send `request` as this user (a real process of its uid and gid, no groups);
        (the client's pid, the daemon's reply line)."""
        res = subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
             CLIENT_PYTHON, "-c", CLIENT, str(sock), json.dumps(request)],
            capture_output=True, text=True, timeout=30,
        )
        assert res.returncode == 0, f"the client failed: {res.stderr}"
        pid, reply = res.stdout.split("\n", 1)
        return int(pid), reply


CLIENT = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
print(os.getpid())
print(s.makefile().readline(), end="")
"""


@pytest.fixture
def other_user() -> Iterator[User]:
    """A new system user without a home, removed afterwards (also when the test fails)."""
    if shutil.which("setpriv") is None or not os.access(CLIENT_PYTHON, os.X_OK):
        pytest.skip(f"needs setpriv and {CLIENT_PYTHON}")
    name = f"rpfs-t-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "-M", "-r", "-U", "-s", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_another_users_request_is_refused_and_logged(rpfs, served, other_user):
    # Open the way the file modes bar today, so only the daemon's own check is left.
    served.repo.chmod(0o755)
    served.sock.chmod(0o666)
    pid, reply = other_user.ask(served.sock, {"op": "create",
                                              "args": {"name": "evil", "size": 4096}})
    assert json.loads(reply) == {"error": (
        f"permission denied: only root and the owner of {served.repo} (uid 0) may use its "
        "rpfs daemon")}
    assert reply.count("\n") == 1
    log = (served.repo / "rpfs.log").read_text()
    assert f"control connection refused: pid {pid}, uid {other_user.uid} " in log
    assert_serving(rpfs, served)  # no disk evil
    # Root, through the same socket, is served.
    assert json.loads(ask(served.sock, b'{"op": "disks"}\n'))["ok"][0]["name"] == "vm"


def test_a_repository_of_another_owner_is_not_served(rpfs, repo, mount, other_user):
    """Its owner could replace the files a root daemon opens: the daemon refuses it, so
    the socket's "root or the owner" is root or the daemon's own user."""
    os.chown(repo, other_user.uid, other_user.gid)
    try:
        _, res = mount(check=False)
        assert_one_line_error(res, "not by root")
        assert not (repo / "control.sock").exists()
    finally:
        os.chown(repo, 0, 0)


# -- a fuzzer on the socket while a VM reads ------------------------------------------------


# The protocol as a client sees it: per operation, per argument its type, a good value
# and whether it is required. A fuzzed request spoils one of them, so none can act
# (`delete` with good ones would delete vm).
PROTOCOL = {
    "create": {"name": ("str", "fz", True), "size": ("int", 4096, True)},
    "clone": {"source": ("str", "vm@p1", True), "name": ("str", "fz", True)},
    "delete": {"name": ("str", "vm", True), "force": ("bool", True, False)},
    "hydrate": {"name": ("str", "vm", True)},
    "disks": {},
    "snapshot": {"disks": ("list of str", ["vm"], True), "name": ("str or null", "p9", False),
                 "description": ("text", "before 2.4", False),
                 "expires": ("number or null", 4e9, False)},
    "rollback": {"point": ("str", "vm@p1", True)},
    "delete_points": {"points": ("list of str", ["vm@p1"], True), "purge": ("bool", True, False)},
    "undelete": {"point": ("str", "vm@p1", True)},
    "prune": {"disk": ("str", "vm", True), "keep_last": ("int or null", 1, False),
              "dry_run": ("bool", False, False)},
    "hold": {"point": ("str", "vm@p1", True), "tag": ("str", "legal", False)},
    "release": {"point": ("str", "vm@p9", True)},
    "describe": {"point": ("str", "vm@p1", True), "text": ("text", "before 2.4", True)},
    "purge_trash": {"points": ("list of str or null", ["vm@p1"], False),
                    "expired": ("bool", True, False)},
}
BAD_VALUES = {
    "str": [None, 1, True, 1.5, [], {}, ["x"], "", "../x", "a/b", ".h", "x" * 200, "\u0000",
            "-x", "vm@@p1", "ü", "vm@"],
    "int": [True, False, None, "4096", 1.5, -1, 0, 10**30, 2**63, 2**64, -(10**20), [4096],
            2**48 + 1, 10**300],
    "bool": ["yes", 1, 0, None, [], {}],
    "str or null": [1, True, [], "", "../x", "a b"],
    "list of str": ["vm", [1], [None], [["vm"]], {}, [], ["../x"], ["vm", 2], None],
    "int or null": ["1", 1.5, True, [], {}, -1, -(10**20)],
    "text": [None, 1, True, 1.5, [], {}, ["x"], "two\nlines", "\u0000", "x" * 300],
    "number or null": ["4e9", True, [], {}, 0, -1, 1.5, 10**30, float("nan"), float("inf")],
    "list of str or null": ["vm", [1], [None], [["vm"]], {}, ["../x"], ["vm", 2], 1],
}
TEMPLATES = [b'{"op": "create", "args": {"name": "fz", "size": 4096}}',
             b'{"op": "clone", "args": {"source": "vm@p1", "name": "fz"}}',
             b'{"op": "snapshot", "args": {"disks": ["vm"], "name": "p9"}}', b'{"op": "disks"}']


def bad_args(rng: random.Random, op: str) -> dict:
    """Arguments for `op` of which one is of a wrong type or value, unknown or missing."""
    args = {key: good for key, (_, good, _) in PROTOCOL[op].items()}
    required = [key for key, (_, _, needed) in PROTOCOL[op].items() if needed]
    way = rng.choice(["unknown", *["value"] * 2 * bool(args), *["missing"] * bool(required)])
    if way == "value":
        key = rng.choice(list(args))
        args[key] = rng.choice(BAD_VALUES[PROTOCOL[op][key][0]])
    elif way == "missing":
        del args[rng.choice(required)]
    else:
        args[rng.choice(["workers", "progress", "self", "x" * 30, "", "Name"])] = 1
    return args


def malformed(rng: random.Random) -> bytes:
    """One malformed request (a line, or bytes that never make one)."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(300)) + rng.choice([b"", b"\n"])
    if kind == 1:
        template = rng.choice(TEMPLATES)
        return template[: rng.randrange(len(template))] + b"\n"
    if kind == 2:
        opener = rng.choice([b"[", b'{"a":', b'{"op": "disks", "args": {"x": ['])
        return opener * rng.randrange(9, 20000) + rng.choice([b"", b"\n"])
    if kind in (3, 4, 5):
        op = rng.choice(list(PROTOCOL))
        return json.dumps({"op": op, "args": bad_args(rng, op)}).encode() + b"\n"
    if kind == 6:
        digits = b"9" * rng.choice([20, 40, 400, 4300, 4400, 30000])
        return b'{"op": "create", "args": {"name": "fz", "size": ' + digits + b"}}\n"
    if kind == 7:
        op = rng.choice([None, 1, [], {}, "", "__init__", "close_all", "acquire", "_record",
                         "DISKS", "disks ", rng.randbytes(rng.randrange(1, 40)).hex()])
        return json.dumps({"op": op}).encode() + b"\n"
    if kind == 8:
        return rng.choice([b"null\n", b"1\n", b'"disks"\n', b"[]\n", b"{}\n", b"NaN\n",
                           b'{"op": "disks", "args": {}, "more": 1}\n', b"\xef\xbb\xbf{}\n",
                           b'{"op": "create", "args": {"name": "fz", "size": Infinity}}\n'])
    return b" " * rng.randrange(60 << 10, 70 << 10) + rng.choice([b"", b"\n"])


def read_point_in_a_loop(image: Path, src: Path, stop: threading.Event,
                         passes: list[int], failures: list[str]) -> None:
    """What a VM does meanwhile: read the whole point with O_DIRECT (past the page cache,
    so every pass reaches the daemon) and compare it with its source."""
    while not stop.is_set():
        res = subprocess.run(
            ["sh", "-c", f"dd if='{image}' iflag=direct bs=1M status=none | cmp - '{src}'"],
            capture_output=True, text=True, timeout=60,
        )
        if res.returncode != 0:
            failures.append(res.stdout + res.stderr)
            return
        passes.append(1)


def fuzz(rpfs: Rpfs, served: Served, seed: int, count: int) -> None:
    rng = random.Random(seed)
    stop = threading.Event()
    passes: list[int] = []
    failures: list[str] = []
    reader = threading.Thread(target=read_point_in_a_loop,
                              args=(served.image, served.src, stop, passes, failures))
    reader.start()
    stalled: list[socket.socket] = []
    try:
        for i in range(count):
            data = malformed(rng)
            way = rng.randrange(10)
            if way < 6 and data:  # sent whole, then half-closed: one error line
                error_of(served.sock, data)
            elif way < 6:  # nothing sent: nothing to answer
                assert ask(served.sock, data) == b""
            elif way < 8:  # the client leaves before the reply
                ask(served.sock, data, close_early=True)
            elif way == 8:  # half of it, then gone
                ask(served.sock, data[: len(data) // 2], close_early=True)
            else:  # half of it, and the client stays: others are served meanwhile
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                stalled.append(s)
                s.connect(str(served.sock))
                with contextlib.suppress(BrokenPipeError):  # its half is too long already
                    s.sendall(data[: len(data) // 2].rstrip(b"\n"))
                if len(stalled) > 20:
                    stalled.pop(0).close()
            if i % 1000 == 999:
                assert_serving(rpfs, served)
    finally:
        for s in stalled:
            s.close()
        stop.set()
        reader.join()
    assert failures == [], f"the reader failed after {len(passes)} passes: {failures[0]}"
    assert passes, "the reader never finished a pass"
    assert_serving(rpfs, served)
    assert [p["name"] for p in rpfs.points()] == ["p1"]


def test_fuzz_the_control_socket_while_a_point_is_read(rpfs, served):
    fuzz(rpfs, served, seed=9, count=3000)


@pytest.mark.slow
def test_fuzz_the_control_socket_long(rpfs, served):
    fuzz(rpfs, served, seed=10, count=40000)


def test_a_daemon_that_dies_mid_request_is_a_one_line_error(tmp_path: Path):
    """A daemon SIGKILLed after it accepted the connection (its listening socket lives
    until its last thread exits) resets it: the CLI says so in one line, no traceback."""
    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept_and_reset() -> None:
        conn, _ = server.accept()
        # Closed with the request unread, as a killed daemon's connection is: the
        # client's read gets ECONNRESET.
        conn.recv(1, socket.MSG_PEEK)
        conn.close()

    thread = threading.Thread(target=accept_and_reset)
    thread.start()
    try:
        with pytest.raises(RpfsError, match=r"^the rpfs daemon closed the control connection "
                                            r"during stalls \(.+\); see its log$"):
            control.RemoteService(path).stalls()
    finally:
        thread.join()
        server.close()
