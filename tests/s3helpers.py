"""What the S3 store's tests share: the store's status through the CLI, the bucket's packs
against the index's `stored` records, the read cache's size, sample images and writes
through the mount."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from helpers import MiB

from rpfs.store.format import pack_name


def status(rpfs) -> dict:
    return json.loads(rpfs("store", "status", "--json", check=True).stdout)


def wait_uploaded(rpfs, timeout: float = 60) -> dict:
    """Until the daemon's passes have uploaded everything pending; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(rpfs)
        if s["pending_packs"] == 0:
            return s
        assert time.monotonic() < deadline, f"still pending after {timeout} s: {s}"
        time.sleep(0.5)


def bucket_packs(s3_server, prefix: str = "repo/") -> dict[str, int]:
    """Object name -> size of the packs in the bucket, listed by the independent client."""
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix + "packs/")
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def stored_packs(repo: Path) -> dict[str, int]:
    """The packs the index records as stored, named as in the bucket, and their sizes."""
    from rpfs.index import Index

    index = Index(repo / "index", copy=False)
    try:
        with index.read() as txn:
            return {f"packs/{pack_name(p)}": r["size"]
                    for p, r in index.pack_states(txn).items() if r["state"] == "stored"}
    finally:
        index.close()


def cache_bytes(repo: Path) -> int:
    """Bytes of the files in the read cache (directories left out: the bound is on data)."""
    return sum(p.stat().st_size for p in (repo / "cache").rglob("*") if p.is_file())


def image(path: Path, rng: random.Random, size: int) -> None:
    """Random data with a zero hole in the middle (a sparse region the points skip)."""
    with open(path, "wb") as f:
        f.write(rng.randbytes(size // 2))
        f.write(bytes(size // 4))
        f.write(rng.randbytes(size - size // 2 - size // 4))


def pwrite_all(path: Path, plain: Path | None, writes: list[tuple[int, bytes]]) -> None:
    """Write through the mount (and into the plain copy that mirrors it), then fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if plain is not None:
        with open(plain, "r+b") as f:
            for off, data in writes:
                f.seek(off)
                f.write(data)


def random_writes(rng: random.Random, n: int, size: int = 70_000, within: int = 8 * MiB
                  ) -> list[tuple[int, bytes]]:
    """`n` writes of `size` random bytes at random offsets of an image of `within` bytes."""
    return [(rng.randrange(0, within - size), rng.randbytes(size)) for _ in range(n)]
