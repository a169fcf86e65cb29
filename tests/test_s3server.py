"""The S3 test server (tests/s3server.py) is what the S3 store's tests stand on: objects
go in and come out exact through rpfs's client (obstore), credentials are checked, it
can be taken away and brought back with its objects, and it leaves nothing behind."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import GenericError, PermissionDeniedError
from s3server import S3Server

MiB = 1 << 20

# one try, and a short bound: a store that is down must fail these fast
NO_RETRY = {"max_retries": 0, "retry_timeout": timedelta(seconds=2)}


def listeners(ports: list[int]) -> list[str]:
    """The `ss -ltnp` lines of TCP listeners on any of `ports`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()
            if any(line.split()[3].endswith(f":{p}") for p in ports)]  # fmt: skip


def test_objects_round_trip(s3_server: S3Server) -> None:
    store = s3_server.store()
    data = random.Random(1).randbytes(12 * MiB + 12345)  # > 5 MiB: a multipart upload
    obstore.put(store, "packs/00000001.pack", data)
    obstore.put(store, "packs/00000002.pack", b"small")
    obstore.put(store, "index/ckpt-1", b"other prefix")

    assert bytes(obstore.get(store, "packs/00000001.pack").bytes()) == data
    for start, length in [(0, 1), (5 * MiB - 7, 64 << 10), (len(data) - 100, 100)]:
        got = obstore.get_range(store, "packs/00000001.pack", start=start, length=length)
        assert bytes(got) == data[start : start + length]
    spans = obstore.get_ranges(store, "packs/00000001.pack", starts=[10, 3 * MiB],
                               lengths=[100, MiB])  # fmt: skip
    assert [bytes(s) for s in spans] == [data[10:110], data[3 * MiB : 4 * MiB]]

    listed = {o["path"]: o["size"] for o in obstore.list(store, "packs/").collect()}
    assert listed == {"packs/00000001.pack": len(data), "packs/00000002.pack": 5}
    # the independent client sees the same bucket
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="packs/00000001.pack")
    assert head["ContentLength"] == len(data)

    obstore.delete(store, "packs/00000001.pack")
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "packs/00000001.pack")
    assert [o["path"] for o in obstore.list(store, "packs/").collect()] == [
        "packs/00000002.pack"
    ]


def test_wrong_credentials_refused(s3_server: S3Server) -> None:
    obstore.put(s3_server.store(), "k", b"v")
    for identity, code in [(s3_server.wrong_secret, "SignatureDoesNotMatch"),
                           (s3_server.unknown_key, "InvalidAccessKeyId")]:  # fmt: skip
        bad = s3_server.store(identity, retry_config=NO_RETRY)
        with pytest.raises(PermissionDeniedError, match=code):
            obstore.get(bad, "k")
        with pytest.raises(PermissionDeniedError, match=code):
            obstore.put(bad, "k2", b"v")
        with pytest.raises(GenericError, match=code):
            obstore.list(bad).collect()
    readonly = s3_server.store(s3_server.readonly, retry_config=NO_RETRY)
    assert bytes(obstore.get(readonly, "k").bytes()) == b"v"
    with pytest.raises(PermissionDeniedError, match="AccessDenied"):
        obstore.put(readonly, "k2", b"v")
    # a missing bucket is an error, not made on the fly
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        obstore.put(s3_server.store(bucket="no-such-bucket", retry_config=NO_RETRY), "k", b"v")


def test_stop_and_start_keep_the_objects(s3_server: S3Server) -> None:
    store = s3_server.store(retry_config=NO_RETRY, connect_timeout="1s", timeout="2s")
    data = random.Random(2).randbytes(3 * MiB)
    obstore.put(store, "p", data)
    endpoint, pid = s3_server.endpoint, s3_server.pid

    s3_server.stop()
    assert not listeners([s3_server.ports["s3"]])
    t0 = time.monotonic()
    with pytest.raises(GenericError, match="error sending request"):
        obstore.get_range(store, "p", start=0, length=10)
    assert time.monotonic() - t0 < 5  # refused at once, no hang

    s3_server.start()
    assert s3_server.endpoint == endpoint and s3_server.pid != pid
    # the same store object (its connection pool saw the server die) reads on
    assert bytes(obstore.get_range(store, "p", start=MiB, length=MiB)) == data[MiB : 2 * MiB]
    obstore.put(store, "q", b"after the restart")
    assert bytes(obstore.get(store, "q").bytes()) == b"after the restart"


def test_pause_is_a_store_that_never_answers(s3_server: S3Server) -> None:
    store = s3_server.store(retry_config=NO_RETRY, timeout="1s")
    obstore.put(store, "p", b"payload")
    s3_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(GenericError):
            obstore.get(store, "p")
        assert 0.9 < time.monotonic() - t0 < 5  # it waited for the timeout, then gave up
    finally:
        s3_server.resume()
    assert bytes(obstore.get(store, "p").bytes()) == b"payload"


def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    """What the fixture does at teardown (`with S3Server`), on a failing test's way out."""
    server = S3Server(tmp_path)
    ports = [*server.ports.values(), *server.grpc_ports.values()]
    with pytest.raises(ZeroDivisionError), server:
        pid = server.pid
        assert pid is not None and listeners(ports)
        assert all(os.path.exists(f"/tmp/seaweedfs-{s}-grpc-{server.grpc_ports[s]}.sock")
                   for s in server.grpc_ports)  # fmt: skip
        assert server.start_seconds < 30
        1 / 0  # noqa: B018 (the test failing inside the fixture)
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the group leader is gone (and reaped)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # and nothing else of its group
    assert not listeners(ports)
    assert not [s for s in server.grpc_ports
                if os.path.exists(f"/tmp/seaweedfs-{s}-grpc-{server.grpc_ports[s]}.sock")]


def test_env_gives_the_credentials(s3_server: S3Server, monkeypatch) -> None:
    """A store built from the environment alone (as `rpfs` will, AWS_* variables)."""
    from obstore.store import S3Store

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = S3Store(s3_server.bucket, endpoint=s3_server.endpoint,
                    virtual_hosted_style_request=False, client_options={"allow_http": True})
    obstore.put(store, "from-env", b"v")
    assert bytes(obstore.get(s3_server.store(), "from-env").bytes()) == b"v"


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -n needs root")
def test_no_keys_never_ask_the_instance_metadata_service(tmp_path: Path) -> None:
    """Without keys obstore asks 169.254.169.254 for credentials; NO_INSTANCE_METADATA
    must send that to loopback. Checked in a network namespace of its own with no
    interface up, so even a regression sends nothing anywhere (and no server is needed:
    the credentials are looked up before the first request)."""
    s3_server = S3Server(tmp_path)  # not started: only its env() and endpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {k: v for k, v in s3_server.env().items() if "ACCESS" not in k}
    code = (
        "import obstore\n"
        "from obstore.store import S3Store\n"
        f"s = S3Store('b', endpoint={s3_server.endpoint!r}, client_options={{'allow_http': True}},"
        " retry_config={'max_retries': 0})\n"
        "try:\n    obstore.get(s, 'k')\nexcept Exception as e:\n    print(e)\n"
    )
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "http://127.0.0.1:9/latest/api/token" in res.stdout, res.stdout
    assert "169.254" not in res.stdout
