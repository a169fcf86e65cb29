"""The tiered backend's GETs ahead of a reader going forward through a stored pack, against
the real SeaweedFS: a sequential reader's bytes come in GETs of GET_SPAN segments, a
random reader's in GETs of the segments it touches only, and both read exact."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from rpfs.store import tiered
from rpfs.store.s3 import S3Objects, StoreConfig

MiB = 1 << 20
PACK = 7
PACK_BYTES = 24 * MiB + 12345  # a short last segment


@pytest.fixture
def stored(s3_server, monkeypatch, tmp_path: Path):
    """(a function making a TieredBackend with an empty cache, the pack's bytes) for one
    pack of random bytes in the store."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    config = StoreConfig(f"s3://{s3_server.bucket}/ra", endpoint=s3_server.endpoint,
                         retry_seconds=5)
    data = os.urandom(PACK_BYTES)
    S3Objects(config).put(tiered.object_name(PACK), data)
    made = []

    def backend(cache_size: int = 64 * MiB) -> tiered.TieredBackend:
        b = tiered.TieredBackend(tmp_path / f"repo{len(made)}", S3Objects(config), cache_size)
        made.append(b)
        return b

    yield backend, data
    for b in made:
        b.close()


def test_a_forward_reader_gets_the_segments_ahead_in_big_gets(stored):
    backend, data = stored
    b = backend()
    step = 600 << 10  # records of a few blocks, unaligned to segments
    for offset in range(0, PACK_BYTES, step):
        got = b.read(PACK, offset, step)
        assert got == data[offset : offset + step], offset
    segments = -(-PACK_BYTES // tiered.SEGMENT)
    assert b.get_bytes == PACK_BYTES  # every byte fetched once
    # the first reads fetch their own segment each, then GET_SPAN at a time
    assert b.gets <= tiered.STREAK + 1 + segments // tiered.GET_SPAN + 1, b.gets
    assert b.get_bytes / b.gets > 2.5 * MiB


def test_a_random_reader_gets_only_what_it_reads(stored):
    backend, data = stored
    b = backend()
    rng = random.Random(5)
    touched = set()
    for _ in range(10):
        offset = rng.randrange(0, PACK_BYTES - 4096)
        assert b.read(PACK, offset, 4096) == data[offset : offset + 4096]
        touched |= {offset // tiered.SEGMENT, (offset + 4095) // tiered.SEGMENT}
    # a few reads may land next to one another by chance: a little read ahead at most
    assert b.get_bytes <= (len(touched) + tiered.GET_SPAN) * tiered.SEGMENT, (
        b.gets, b.get_bytes, len(touched))


def test_a_small_cache_reads_ahead_less_and_still_exact(stored):
    backend, data = stored
    b = backend(cache_size=4 * MiB)  # a quarter of it ahead: one segment
    assert (b.ahead, b.get_span) == (1, 1)
    for offset in range(0, PACK_BYTES, 300 << 10):
        assert b.read(PACK, offset, 300 << 10) == data[offset : offset + (300 << 10)]
    assert b.cache.used <= 4 * MiB
