"""Objects in an S3-compatible bucket, through obstore: the one module that speaks S3.

Why obstore: measured against boto3 and minio on the tests' SeaweedFS (docs/performance.md,
"S3 clients"): 3.4 × boto3's ranged GETs from four threads, its requests run in Rust
without the GIL (the FUSE threads keep the interpreter), and it bounds retries by time.

Every call blocks: run it off the trio thread. Errors come out as the pack backend's two
read errors (backend.py), or as `StoreRefused` for what no retry mends:

- `PackMissing` (ObjectMissing): the key is not there. Only meaningful after `check()`
  proved the bucket exists and the endpoint speaks S3: obstore answers a missing bucket
  and a web server that is not S3 with the same FileNotFoundError as a missing key.
- `PackUnavailable` (StoreUnavailable): connection refused, timeout, 5xx, after obstore's
  own retries with jittered exponential backoff for at most `retry_seconds`.
- `StoreRefused`: credentials refused, a missing bucket, an endpoint that is not S3. The
  S3 error code is only in obstore's message text, so that is where it is read.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import obstore
from obstore.store import S3Store

from ..errors import RpfsError
from .backend import PackMissing, PackUnavailable

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"  # SeaweedFS, Ceph and MinIO take any; a client signs with one
RETRY_SECONDS = 60.0  # how long a request is retried before it fails (see `connect`)
# How long the object of a pack GC retired stays: a reader in another process that looked
# a chunk up before GC moved it may still GET the old object (maintenance/gc.py).
GRACE_SECONDS = 600.0
_URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\s]*)?")
# codes S3 puts in an error's XML that mean the credentials are refused
_REFUSED = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied",
            "InvalidSecurity", "ExpiredToken", "InvalidToken")


class ObjectMissing(PackMissing):
    """No object under that key."""


class StoreUnavailable(PackUnavailable):
    """The store did not answer in time (down, slow, or failing with 5xx)."""

    advice = "try again when the object store answers"  # describe_os_error says it


class StoreRefused(RpfsError):
    """The store refuses us: credentials, bucket or endpoint; a retry will not help."""


class StoreUnreachable(StoreRefused):
    """`check()` got no answer at all (refused connections, timeouts): a wrong endpoint at
    init, but at mount, of an endpoint that answered at init, most likely an outage."""


@dataclass(frozen=True)
class StoreConfig:
    """Where a repository's packs are kept (rpfs.json "store"); credentials never are."""

    url: str  # s3://bucket/prefix
    endpoint: str | None = None  # None: AWS's own
    region: str | None = None  # None: $AWS_REGION, else us-east-1
    cache_size: int = 20 << 30  # the local read cache's bound, bytes
    retry_seconds: float = RETRY_SECONDS
    backlog_warn: int = 8 << 30  # pending bytes past which `store status` warns
    grace_seconds: float = GRACE_SECONDS  # a pack GC retired keeps its object this long

    @property
    def bucket(self) -> str:
        return parse_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return parse_url(self.url)[1]


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; RpfsError for anything else."""
    match = _URL.fullmatch(url)
    if match is None:
        raise RpfsError(f"invalid store {url!r}: give s3://BUCKET or s3://BUCKET/PREFIX "
                        "(a bucket name is 3-63 lower-case letters, digits, dots, dashes)")
    return match.group(1), (match.group(2) or "").strip("/")


def _profile_keys() -> dict[str, str]:
    """Keys of $AWS_PROFILE from the shared credentials file (the usual chain's second
    step, which obstore does not read itself); nothing if keys are in the environment."""
    profile = os.environ.get("AWS_PROFILE")
    if not profile or os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    parser = configparser.ConfigParser()
    parser.read(path.expanduser())
    if not parser.has_section(profile):
        raise StoreRefused(f"AWS_PROFILE={profile}: no such profile in {path}")
    section = parser[profile]
    keys = {"access_key_id": section.get("aws_access_key_id"),
            "secret_access_key": section.get("aws_secret_access_key"),
            "token": section.get("aws_session_token")}
    return {k: v for k, v in keys.items() if v}


def _refusal(exc: Exception, where: str) -> StoreRefused | None:
    """The StoreRefused that obstore's error `exc` means, if it means one."""
    text = str(exc)
    for code in _REFUSED:
        if code in text:
            return StoreRefused(f"{where}: the store refused the credentials ({code}): check "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if "NoSuchBucket" in text:
        return StoreRefused(f"{where}: no such bucket: create it first, or check the "
                            "bucket's name and --s3-endpoint")
    return None


class S3Objects:
    """The objects of one repository: keys under the bucket's prefix. Any thread."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        bucket, prefix = parse_url(config.url)
        self.location = config.url
        self._prefix = f"{prefix}/" if prefix else ""
        region = config.region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or DEFAULT_REGION
        options = {"allow_http": True, "connect_timeout": timedelta(seconds=5),
                   "timeout": timedelta(seconds=max(1.0, min(30.0, config.retry_seconds)))}
        retry = {"max_retries": 100, "retry_timeout": timedelta(seconds=config.retry_seconds),
                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                             "max_backoff": timedelta(seconds=5), "base": 2}}
        self._store = S3Store(
            bucket, region=region, client_options=options, retry_config=retry,
            virtual_hosted_style_request=False,
            **({"endpoint": config.endpoint} if config.endpoint else {}),
            **_profile_keys(),
        )  # fmt: skip

    def _key(self, name: str) -> str:
        return self._prefix + name

    def url(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def _failed(self, exc: Exception, name: str) -> OSError | RpfsError:
        """The error to raise for obstore's `exc` on object `name`."""
        refused = _refusal(exc, self.url(name))
        if refused is not None:
            return refused
        if isinstance(exc, FileNotFoundError):
            return ObjectMissing(2, "no such object", self.url(name))
        return StoreUnavailable(5, f"store unavailable: {_reason(exc)}", self.url(name))

    def check(self) -> None:
        """Prove the bucket exists, the endpoint speaks S3 and the credentials list it:
        before this, a 404 could mean any of them (see the module docstring)."""
        where = self.location if not self.config.endpoint else (
            f"{self.location} at {self.config.endpoint}")
        try:
            obstore.list_with_delimiter(self._store, self._prefix or None)
        except Exception as exc:  # obstore's errors share no base class of ours
            refused = _refusal(exc, where)
            if refused is not None:
                raise refused from None
            text = str(exc)
            # Not S3: an HTTP server answered with a status and no S3 error document. A
            # failure with no status is no answer (seen under load in CI): an outage.
            if "404" in text or ("<Error>" not in text and "non-2xx" in text
                                 and _status(text) != "?"):
                raise StoreRefused(f"{where} does not answer as an S3 store (HTTP "
                                   f"{_status(text)}): check --s3-endpoint") from None
            raise StoreUnreachable(f"{where} cannot be reached: {_reason(exc)}") from None

    def put(self, name: str, data: bytes | Path) -> None:
        """Store the object `name` whole (a file streams, in parts when large)."""
        try:
            obstore.put(self._store, self._key(name), data)
        except Exception as exc:
            raise self._failed(exc, name) from None

    def get(self, name: str) -> bytes:
        try:
            return bytes(obstore.get(self._store, self._key(name)).bytes())
        except Exception as exc:
            raise self._failed(exc, name) from None

    def get_range(self, name: str, start: int, length: int) -> memoryview:
        """Up to `length` bytes from `start` (fewer at the object's end)."""
        try:
            return memoryview(obstore.get_range(self._store, self._key(name), start=start,
                                                length=length))
        except Exception as exc:
            raise self._failed(exc, name) from None

    def download(self, name: str, path: Path) -> None:
        """Write the object `name` into the file `path`, streamed (an index checkpoint can
        be larger than memory should hold)."""
        try:
            result = obstore.get(self._store, self._key(name))
            with open(path, "wb") as out:
                for part in result.stream(min_chunk_size=8 << 20):
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and exc.filename == str(path):
                raise
            raise self._failed(exc, name) from None
        except Exception as exc:
            raise self._failed(exc, name) from None

    def size(self, name: str) -> int:
        try:
            return int(obstore.head(self._store, self._key(name))["size"])
        except Exception as exc:
            raise self._failed(exc, name) from None

    def list(self, prefix: str) -> dict[str, int]:
        """Name -> size of every object whose name starts with `prefix`."""
        try:
            found = obstore.list(self._store, self._key(prefix)).collect()
        except Exception as exc:
            raise self._failed(exc, prefix) from None
        cut = len(self._prefix)
        return {o["path"][cut:]: int(o["size"]) for o in found}

    def delete(self, name: str) -> None:
        """Remove `name` (nothing if it is not there)."""
        try:
            obstore.delete(self._store, self._key(name))
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._failed(exc, name) from None


def _reason(exc: Exception) -> str:
    """Why a request failed, short: obstore's text is its first line (the request, its
    retries and time) and a debug dump of the error chain, where the cause is."""
    text = str(exc)
    if "Connection refused" in text or "ConnectionRefused" in text:
        cause = "connection refused"
    elif "TimedOut" in text or "kind: Timeout" in text:
        cause = "no answer in time"
    elif "status code: " in text or "Server returned non-2xx" in text:
        cause = f"HTTP {_status(text)}"
    else:
        cause = (text.splitlines() or [type(exc).__name__])[0][:200]
    took = re.search(r" in ([\d.]+)s\b", text)
    tries = re.search(r"after (\d+) retries", text)
    if took:
        cause += f" (for {float(took.group(1)):.1f} s"
        cause += f", {int(tries.group(1)) + 1} tries)" if tries else ")"
    return cause


def _status(text: str) -> str:
    match = re.search(r"status code: (\d{3})", text)
    return match.group(1) if match else "?"
