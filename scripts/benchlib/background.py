"""An rpfs command run back to back in a thread while the bench measures something else.

The GC figures need reads measured *while* GC compacts, for the whole of a fio run: one
`rpfs gc` on the bench's sample may end before fio does, so it is run again and again
until fio ends. Each call goes through its own CliTimer (no Python start-up between
calls, so the gaps are milliseconds), and the intervals it ran are kept, so the bench
can say which part of the fio run GC really covered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from .cli_timer import CliTimer
from .measure import BenchError


class Repeat:
    """`rpfs *argv` back to back in a thread, from `start()` until `stop()`.

    `intervals` are the (start, end) monotonic times of the calls that finished; a call
    that failed stops the loop, and `stop()` raises its BenchError."""

    def __init__(self, argv: list[str | Path], timer_factory: Callable[[], CliTimer] = CliTimer
                 ) -> None:
        self.argv = argv
        self.timer_factory = timer_factory
        self.intervals: list[tuple[float, float]] = []
        self.error: BenchError | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-repeat", daemon=True)

    def start(self) -> Repeat:
        """Start the loop; returns once the first call has been sent."""
        self._thread.start()
        self._started.wait(120)
        return self

    def stop(self) -> list[tuple[float, float]]:
        """Let the running call finish, end the loop; the calls' intervals."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.intervals

    def _loop(self) -> None:
        try:
            with self.timer_factory() as timer:
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    self._started.set()
                    timer.call(*self.argv)
                    self.intervals.append((t0, time.monotonic()))
        except (BenchError, OSError) as exc:
            self.error = exc if isinstance(exc, BenchError) else BenchError(
                f"rpfs {' '.join(map(str, self.argv[:3]))} in a loop: {exc}")
        finally:
            self._started.set()


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The fraction of [start, end] that the (non-overlapping) intervals cover."""
    if end <= start:
        return 0.0
    inside = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    return min(1.0, inside / (end - start))
