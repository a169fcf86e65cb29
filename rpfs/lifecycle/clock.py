"""The one clock of lifecycle decisions (expiry, trash periods, schedules, retention) and
the parsing of the durations and instants users give them.

`now()` is seconds since the epoch, a float: every time rpfs stores (a point's `created`,
a disk's, a checkpoint's) is one, so an expiry or a trash deadline compares with a stored
time without conversion and stays a plain JSON number in its record; a calendar (UTC) is
needed only to name retention buckets and to print, and those convert there.

`RPFS_NOW` (UTC ISO 8601 ending in Z, e.g. `2027-01-31T00:00Z`, or seconds since the
epoch) replaces the system clock, read at every call, so a test moves a daemon's clock
by days without sleeping. Only lifecycle decisions read this clock: the rest of rpfs
(checkpoint ages, log lines, timeouts) keeps its own, which moving this one must not
change.
"""

import math
import os
import re
import time
from datetime import UTC, datetime

from ..errors import RpfsError

ENV = "RPFS_NOW"
_EPOCH_RE = re.compile(r"[0-9]+(\.[0-9]+)?")  # not \d: it matches any script's digits
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])")
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # the last printable
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INSTANT_HINT = "use UTC ISO 8601 ending in Z, e.g. 2027-01-31T00:00Z"


def now() -> float:
    """Seconds since the epoch: `RPFS_NOW` if set, else the system clock."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return time.time()
    try:
        ts = float(raw) if _EPOCH_RE.fullmatch(raw) else parse_instant(raw)
    except RpfsError:
        ts = None
    if ts is None or ts > _LATEST:
        raise RpfsError(f"bad {ENV} {raw!r}: {_INSTANT_HINT}, or seconds since the epoch")
    return ts


def iso(ts: float) -> str:
    """`2027-01-31T00:00:00Z`: an instant in the form `parse_instant` reads back."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(text: str) -> float:
    """An instant given as UTC ISO 8601 ending in Z (`2027-01-31T00:00Z`, seconds and
    fractions optional). The Z is required: a time without a zone would be read in some
    zone, and every rpfs time is UTC."""
    try:
        if not text.endswith("Z"):
            raise ValueError
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise RpfsError(f"bad time {text!r}: {_INSTANT_HINT}") from None


def parse_duration(text: str) -> int:
    """Whole seconds of `10d`, `1h`, `90m` (`--every`, `--expire-in`): a number and one
    of s, m, h, d, w (lower case: `m` is minutes, and a month has no fixed length)."""
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise RpfsError(
            f"bad duration {text!r}: use a number and one of s, m, h, d, w, e.g. 10d")
    digits, unit = m.groups()
    if len(digits) > 12 or int(digits) * _UNIT_SECONDS[unit] > _LATEST:
        raise RpfsError(f"bad duration {text!r}: longer than any date rpfs can print")
    if not int(digits):
        raise RpfsError(f"bad duration {text!r}: must be longer than 0")
    return int(digits) * _UNIT_SECONDS[unit]


def fmt_duration(seconds: int) -> str:
    """`1h`, `90m`, `2w`: whole seconds in the largest unit that divides them, the form
    `parse_duration` reads back."""
    unit, size = next((unit, size) for unit, size in reversed(_UNIT_SECONDS.items())
                      if seconds % size == 0)  # "s" divides every one
    return f"{seconds // size}{unit}"


def parse_expire_in(text: str) -> float:
    """The instant `--expire-in 10d` means: that long from now."""
    at = now() + parse_duration(text)
    if at > _LATEST:
        raise RpfsError(f"bad duration {text!r}: the expiry would fall after the year 9999")
    return at


def parse_expire_at(text: str) -> float:
    """The instant `--expire-at 2027-01-31T00:00Z` means; it must lie in the future (a
    point that expired as it was made would go to the trash at once)."""
    return check_expiry(parse_instant(text), text)


def check_expiry(at: float, shown: str | None = None) -> float:
    """`at` if it can be a new point's expiry: a printable instant in the future
    (`shown`: as the user wrote it). The disk service checks it again on its own clock,
    which a daemon's environment may set apart from the CLI's."""
    if not (isinstance(at, int | float) and math.isfinite(at)) or at > _LATEST:
        raise RpfsError(f"bad expiry {at!r}: use seconds since the epoch before the year 10000")
    current = now()
    if at <= current:
        raise RpfsError(f"expiry {shown or iso(at)} is in the past (now is {iso(current)})")
    return at
