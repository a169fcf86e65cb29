"""The tiered backend's read path, called directly over a counting stand-in for the store:
concurrent misses of one segment fetch it once, a run of missing segments is one GET, a
failed GET caches nothing and the next read fetches again, and the cache keeps its bound
in least-recently-used order. (What users see goes through the mount against a real S3
server: tests/test_s3_store.py.)"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rpfs.store.s3 import StoreUnavailable
from rpfs.store.tiered import DOWN_QUIET, SEGMENT, TieredBackend, object_name

MiB = 1 << 20


class FakeObjects:
    """Objects in memory; counts GETs, can be slow or failing."""

    location = "s3://fake/repo"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[tuple[str, int, int]] = []
        self.delay = 0.0
        self.failing = False
        self._lock = threading.Lock()

    def get_range(self, name: str, start: int, length: int) -> memoryview:
        time.sleep(self.delay)
        with self._lock:
            self.gets.append((name, start, length))
        if self.failing:
            raise StoreUnavailable(5, "store unavailable: test", name)
        return memoryview(self.objects[name][start : start + length])

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def size(self, name: str) -> int:
        return len(self.objects[name])


@pytest.fixture
def stored(tmp_path: Path) -> tuple[TieredBackend, FakeObjects, bytes]:
    (tmp_path / "packs").mkdir()
    data = random.Random(1).randbytes(5 * SEGMENT + 12345)
    objects = FakeObjects({object_name(7): data})
    backend = TieredBackend(tmp_path, objects, cache_size=3 * SEGMENT)  # type: ignore[arg-type]
    yield backend, objects, data
    backend.close()


def test_concurrent_misses_of_one_segment_fetch_it_once(stored):
    backend, objects, data = stored
    objects.delay = 0.2  # every reader arrives while the first GET is in flight
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: backend.read(7, 1000 + i, 4096), range(8)))
    assert got == [data[1000 + i : 5096 + i] for i in range(8)]
    assert objects.gets == [(object_name(7), 0, SEGMENT)]


def test_a_run_of_missing_segments_is_one_get_and_the_tail_is_short(stored):
    backend, objects, data = stored
    assert backend.read(7, SEGMENT - 10, 20) == data[SEGMENT - 10 : SEGMENT + 10]
    assert objects.gets == [(object_name(7), 0, 2 * SEGMENT)]  # segments 0 and 1
    end = len(data)
    assert backend.read(7, end - 100, 100) == data[end - 100 :]  # the short last segment
    assert objects.gets[-1] == (object_name(7), 5 * SEGMENT, SEGMENT)
    assert backend.read(7, 0, 2 * SEGMENT) == data[: 2 * SEGMENT]  # cached: no GET
    assert len(objects.gets) == 2


def test_a_failed_get_caches_nothing_and_the_next_read_fetches(stored):
    backend, objects, data = stored
    objects.failing = True
    for _ in range(2):  # the second within DOWN_QUIET: failed without asking the store
        with pytest.raises(StoreUnavailable):
            backend.read(7, 10, 100)
    assert backend.cache.used == 0 and len(objects.gets) == 1
    objects.failing = False
    time.sleep(DOWN_QUIET)
    assert backend.read(7, 10, 100) == data[10:110]
    assert len(objects.gets) == 2


def test_the_cache_keeps_its_bound_evicting_the_least_recently_used(stored):
    backend, objects, _ = stored
    for seg in (0, 1, 2):
        backend.read(7, seg * SEGMENT, 10)
    backend.read(7, 0, 10)  # segment 0 used again: 1 is now the oldest
    backend.read(7, 3 * SEGMENT, 10)  # a fourth segment: over the bound of three
    assert backend.cache.used == 3 * SEGMENT
    before = len(objects.gets)
    backend.read(7, 0, 10)
    backend.read(7, 2 * SEGMENT, 10)
    assert len(objects.gets) == before  # kept
    backend.read(7, SEGMENT, 10)
    assert len(objects.gets) == before + 1  # evicted, fetched again
    files = list((backend.cache.root / "segments").iterdir())
    assert len(files) == 3 and sum(f.stat().st_size for f in files) == 3 * SEGMENT
