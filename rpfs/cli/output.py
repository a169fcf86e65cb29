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


def fmt_origins(disk: dict) -> str:
    """A disk's ORIGIN as `rpfs disks` and `points --tree` show it, from the fields of
    `rpfs disks --json`: "cloned from web01@p1, rolled back to web01-test@before", each
    point marked "(deleted)" once it is in the trash or purged, "(disk deleted)" once its
    disk is; "-" for a disk made empty and never rolled back."""
    parts = []
    for key, words in (("cloned_from", "cloned from"), ("rolled_back_to", "rolled back to")):
        if disk[key] is None:
            continue
        gone = " (disk deleted)" if disk.get(f"{key}_disk_deleted") else (
            " (deleted)" if disk[f"{key}_deleted"] else "")
        parts.append(f"{words} {disk[key]}{gone}")
    return ", ".join(parts) or "-"
