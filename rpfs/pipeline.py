"""Ordered parallel map with a bounded number of tasks in flight.

Capture and restore both stream a disk through a thread pool: workers do the blocking,
GIL-releasing work (pread, BLAKE3, zstd), the caller consumes results in order, and at
most `2 × workers` batches are held in memory at once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) in input order, computing ahead in a thread pool."""
    workers = workers or os.cpu_count() or 2
    with ThreadPoolExecutor(workers, thread_name_prefix="rpfs-worker") as pool:
        inflight: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                inflight.append((item, pool.submit(fn, item)))
                if len(inflight) >= 2 * workers:
                    head, fut = inflight.popleft()
                    yield head, fut.result()
            while inflight:
                head, fut = inflight.popleft()
                yield head, fut.result()
        finally:
            for _, fut in inflight:
                fut.cancel()
