"""Small reads of points, served in batches by one reader thread for every export.

A 4 KiB random read of a point did as much hand-off as work when each went to a worker
thread of its own (trio.to_thread: a futex wake of the worker, the GIL passed back and
forth, a wake of the trio thread with the result; 19 % of the daemon's CPU was futex
wakes at queue depth 16, docs/performance.md). Here the reads that arrive while the
reader thread is busy queue up and are served together at its next turn: one wake each
way per batch, one index transaction, each chunk fetched once, and the batch's records
read ahead together (PackStore.get_many), so their disk reads overlap instead of waiting
one after the other. A second reader thread was measured slower (smaller batches, the
GIL shared three ways).

Only reads that wait on nothing but local chunks come here (`takes`): one waiting on a
disk's lock or an object store would hold up the batch behind it, so those keep a
worker thread each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import outcome
import trio

from .handles import INLINE_READ_MAX, Handle

ReadMany = Callable[[list[tuple[int, int]]], list[bytes | BaseException]]


def takes(handle: Handle, size: int) -> bool:
    """Whether a read of `size` bytes of `handle` that found nothing at hand goes to the
    reader thread: a small read of a point that waits on no lock and no network."""
    return size <= INLINE_READ_MAX and not handle.read_may_wait and not handle.writable


@dataclass(eq=False)
class _Job:
    read_many: ReadMany
    offset: int
    size: int
    task: trio.lowlevel.Task
    result: outcome.Outcome | None = None


class ReadQueue:
    """Reads handed from the trio thread to the reader thread, served in batches. The
    thread starts at the first read (it needs the trio run's token); `close()` once the
    trio run has ended."""

    def __init__(self) -> None:
        self._jobs: list[_Job] = []
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False  # the reader thread sleeps until a job comes
        self._closed = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None

    async def read(self, read_many: ReadMany, offset: int, size: int) -> bytes:
        """What `read_many([(offset, size)])` gives, read on the reader thread with
        whatever else is queued; raises the exception that failed this read."""
        if self._thread is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(target=self._serve, name="rpfs-reads", daemon=True)
            self._thread.start()
        job = _Job(read_many, offset, size, trio.lowlevel.current_task())
        with self._cond:
            if self._closed:
                raise RuntimeError("the read queue is closed")
            self._jobs.append(job)
            if self._waiting:
                self._cond.notify()
        # Not cancellable: the reader thread answers every job it took, soon.
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._waiting = True
                    self._cond.wait()
                    self._waiting = False
                if not self._jobs:
                    return
                batch, self._jobs = self._jobs, []
            _run(batch)
            self._token.run_sync_soon(_deliver, batch)

    def close(self) -> None:
        """Stop the reader thread; every read was answered (the trio run has ended)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


def _run(batch: list[_Job]) -> None:
    """Serve a batch: the reads of each image with one read_many call."""
    by_image: dict[ReadMany, list[_Job]] = {}
    for job in batch:
        by_image.setdefault(job.read_many, []).append(job)
    for read_many, jobs in by_image.items():
        try:
            results = read_many([(job.offset, job.size) for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} results for {len(jobs)} reads")
        except Exception as exc:  # e.g. the index failed: every read of the call fails
            results = [exc] * len(jobs)
        for job, result in zip(jobs, results, strict=True):
            job.result = (outcome.Error(result) if isinstance(result, BaseException)
                          else outcome.Value(result))


def _deliver(batch: list[_Job]) -> None:
    """On the trio thread: wake each read's task with its result."""
    for job in batch:
        trio.lowlevel.reschedule(job.task, job.result)
