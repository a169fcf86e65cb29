"""Free space of the repository's filesystem and the reserve rpfs keeps on it.

The index commits by copy-on-write: even a delete needs fresh pages. So rpfs keeps a
floor of free space (`reserve` in rpfs.json; default the smaller of 1 % of the
filesystem and 256 MiB) that only index commits and rewrites of already allocated bytes
may use: below it a capture does not start (and stops), archiving waits, and writes
that would allocate (a hole of a disk's local file, a frozen block that must first be
archived) fail with ENOSPC.

`statvfs` is cheap but not free, and writes come 4 KiB at a time: the free figure is
re-read at most every REFRESH seconds, or sooner once the bytes written since the last
look could have used up half of the room above the floor.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

from .errors import NoSpace, RpfsError
from .names import fmt_bytes, parse_size

DEFAULT_PERCENT = 1.0
DEFAULT_MAX = 256 << 20
REFRESH = 0.5  # seconds a statvfs figure is trusted
MIN_SLACK = 1 << 20  # re-read at least every MiB written while near or below the floor

_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)%")


def parse_reserve(value: int | str | None) -> int | str | None:
    """The reserve as rpfs.json keeps it: bytes (int), 'N%' of the filesystem, or None
    (the default). Accepts `--reserve` text too ('512M', '2%'); raises RpfsError."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str):
        m = _PERCENT_RE.fullmatch(value.strip())
        if m is None:
            with contextlib.suppress(RpfsError):
                return parse_size(value)
        elif float(m.group(1)) < 100:
            return f"{m.group(1)}%"
    raise RpfsError(
        f"invalid reserve {value!r}: give a size (e.g. 256M, 0 for none) or a percentage "
        "of the filesystem below 100 (e.g. 1%)"
    )


class Space:
    """Free space of one repository's filesystem against its reserve (thread-safe)."""

    def __init__(self, root: Path, reserve: int | str | None) -> None:
        self.root = root
        self.reserve = parse_reserve(reserve)
        self._lock = threading.Lock()
        self._at = -REFRESH  # monotonic time of the last statvfs
        self._free = 0
        self._floor = 0
        self._spent = 0  # bytes written since then (an upper bound of what they took)

    def _refresh(self) -> None:
        st = os.statvfs(self.root)
        size = st.f_blocks * st.f_frsize
        if self.reserve is None:
            floor = min(int(size * DEFAULT_PERCENT / 100), DEFAULT_MAX)
        elif isinstance(self.reserve, str):
            floor = int(size * float(self.reserve[:-1]) / 100)
        else:
            floor = self.reserve
        with self._lock:
            self._free, self._floor = st.f_bavail * st.f_frsize, floor
            self._at, self._spent = time.monotonic(), 0

    def spend(self, nbytes: int) -> None:
        """Count bytes just written (they may have taken that much free space)."""
        self._spent += nbytes  # a lost update under a race only delays the next look

    def figures(self) -> tuple[int, int]:
        """(free bytes, floor), fresh enough for a decision."""
        slack = max(MIN_SLACK, (self._free - self._floor) // 2)
        if time.monotonic() - self._at >= REFRESH or self._spent >= slack:
            self._refresh()
        return self._free, self._floor

    def low(self) -> bool:
        """Free space is below the floor: refuse what would allocate."""
        free, floor = self.figures()
        return free < floor

    def error(self, what: str) -> NoSpace:
        """The refusal of `what` (e.g. 'capture of vm') for lack of space."""
        free, floor = self.figures()
        return NoSpace(
            f"no space for {what}: {fmt_bytes(free)} free on the filesystem of {self.root}, "
            f"below the reserve of {fmt_bytes(floor)} kept so that the index can always "
            f"commit; free space there (or lower \"reserve\" in {self.root / 'rpfs.json'})",
            str(self.root),
        )

    def check(self, what: str) -> None:
        """Raise NoSpace if free space is below the floor."""
        if self.low():
            raise self.error(what)

    def free_now(self) -> int:
        """Free bytes, read now (for messages after space was given back)."""
        self._refresh()
        return self._free
