"""How the `rpfs` commands show things: tables, times and `--json` documents.

Its own room so that every command prints a time, a table or a JSON document the same
way (byte sizes users see are `names.fmt_bytes`, which the library's messages use too).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime


def fmt_time(ts: float) -> str:
    """A time as users see it: UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: object, indent: int | None = 1) -> None:
    """A `--json` document: records one key a line (`indent`), extent lists on one line
    (`indent=None`, the shape `capture --changed` reads back)."""
    print(json.dumps(value, indent=indent))
