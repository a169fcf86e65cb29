"""Parsing and validation of user-supplied names, sizes and DISK@POINT references, and the
one rounding of a size up to whole blocks."""

import re
from datetime import UTC, datetime

from .errors import RpfsError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_SIZE_RE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid disk or point name, else raise RpfsError.

    Names become path components in the mount, so only letters, digits and `-_.:` are
    allowed, and the first character must be a letter or digit (no `.`/`..`, no hidden
    files, no leading dash that a shell tool would read as an option).
    """
    if not _NAME_RE.fullmatch(name or ""):
        raise RpfsError(
            f"invalid {what} {name!r}: use 1-128 letters, digits and '-_.:', "
            "starting with a letter or digit"
        )
    return name


def default_point_name(at: float | None = None) -> str:
    """A UTC timestamp to the millisecond (of now, or of `at`, seconds since the epoch),
    the name of a point the user did not name (seconds alone collide when points are
    taken in quick succession)."""
    when = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_point_ref(ref: str) -> tuple[str, str]:
    """Split `DISK@POINT` into its two validated names."""
    disk, sep, point = ref.partition("@")
    if not sep:
        raise RpfsError(f"invalid point reference {ref!r}: expected DISK@POINT, e.g. web01@monday")
    return check_name(disk, "disk name"), check_name(point, "point name")


def parse_size(text: str) -> int:
    """Parse `64K`, `20G`, `1048576` (binary units) into bytes."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise RpfsError(f"invalid size {text!r}: expected a number with optional K, M, G or T")
    try:
        number = int(m.group(1))
    except ValueError:  # more digits than int() converts (4300)
        raise RpfsError(
            f"invalid size: {len(m.group(1))} digits are more than any disk holds"
        ) from None
    return number * _UNITS[m.group(2).upper()]


def fmt_bytes(n: float) -> str:
    """`12.3 MiB`: a size for people (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def ceil_div(size: int, unit: int) -> int:
    """How many `unit`s cover `size` (blocks of a disk, pages of a block map)."""
    return -(-size // unit)
