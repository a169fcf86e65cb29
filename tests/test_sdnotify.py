"""sd_notify for the systemd unit (contrib/systemd/rpfs@.service, Type=notify): the
daemon sends READY=1 to $NOTIFY_SOCKET once its mount answers, STOPPING=1 as it ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import is_fuse_mounted

from rpfs.serve.sdnotify import notify

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "rpfs@.service"


@pytest.fixture
def notify_socket():
    """A datagram socket as systemd makes one (a short path: sun_path has 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="rpfs-notify-") as where:
        path = os.path.join(where, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(30)
            yield path, sock


def test_the_daemon_says_ready_once_mounted_and_stopping(rpfs, repo: Path, mount,
                                                        notify_socket):
    path, sock = notify_socket
    rpfs.env["NOTIFY_SOCKET"] = path
    mnt, _ = mount()
    assert sock.recv(4096) == b"READY=1"
    assert is_fuse_mounted(mnt) and os.listdir(mnt), "ready means the mount answers"
    rpfs.env.pop("NOTIFY_SOCKET")
    rpfs("umount", mnt, check=True)
    assert sock.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket_and_no_socket(monkeypatch):
    name = f"rpfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("READY=1")
        assert sock.recv(4096) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    notify("READY=1")  # outside systemd: nothing, no error
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    notify("READY=1")  # a socket that is gone is logged, not raised


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_file_is_valid(tmp_path: Path):
    """systemd-analyze verify accepts the unit (with this rpfs's path for the one it
    names), and it is a notify unit that serves in the foreground and stops by umount."""
    text = UNIT.read_text()
    assert "\nType=notify\n" in text and "mount --foreground" in text
    assert "\nExecStop=/usr/local/bin/rpfs umount %f\n" in text
    unit = tmp_path / "rpfs@mnt-rpfs.service"
    unit.write_text(text.replace("/usr/local/bin/rpfs", shutil.which("rpfs")))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    assert res.returncode == 0 and not res.stderr, res.stderr
