"""What a user sets on one point after it is taken: its hold and its description.

Its own room because these are the only edits of a point record that come from a user,
not from the point's archive: each is one index transaction that reads the record and
writes it back with one field changed, so an archiver completing the point meanwhile
(it too rewrites the record it reads in its transaction) loses nothing of either.

A hold keeps a point from delete, prune and purge (trash.py and retention.py read the
field); its tag says who or what holds it (`legal`, a ticket), and the refusal names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import RpfsError
from ..index import Index, PointRecord
from ..names import check_name, parse_point_ref

log = logging.getLogger(__name__)

DEFAULT_TAG = "hold"
MAX_DESCRIPTION = 256  # characters: a description is a line of `rpfs points`, not a file


def check_description(text: str) -> str:
    """`text` if it can be a point's description: one line of printable characters."""
    if len(text) > MAX_DESCRIPTION:
        raise RpfsError(f"description of {len(text)} characters is too long: at most "
                        f"{MAX_DESCRIPTION}")
    if not text.isprintable():
        raise RpfsError(f"bad description {text!r}: use one line of printable characters")
    return text


def hold(index: Index, ref: str, tag: str = DEFAULT_TAG) -> dict:
    """Hold DISK@POINT under `tag` (a name: letters, digits and '-_.:'); a point already
    held takes the new tag."""
    check_name(tag, "hold tag")
    return _edit(index, ref, lambda point: _set_hold(point, tag))


def release(index: Index, ref: str) -> dict:
    """Release the hold of DISK@POINT (an error if it has none: nothing to release)."""
    def clear(point: PointRecord) -> str:
        if point.hold is None:
            raise RpfsError(f"point {point.ref} is not held; 'rpfs points {point.disk}' "
                            "shows holds")
        tag, point.hold = point.hold, None
        return f"hold ({tag}) released"
    return _edit(index, ref, clear)


def describe(index: Index, ref: str, text: str) -> dict:
    """Set the description of DISK@POINT (an empty text clears it)."""
    check_description(text)

    def change(point: PointRecord) -> str:
        point.description = text
        return "description set" if text else "description cleared"
    return _edit(index, ref, change)


def _set_hold(point: PointRecord, tag: str) -> str:
    before, point.hold = point.hold, tag
    return f"held ({tag})" if before in (None, tag) else f"held ({tag}, was {before})"


def _edit(index: Index, ref: str, change: Callable[[PointRecord], str]) -> dict:
    """Apply `change` to the record of DISK@POINT in one transaction; its record after,
    with `change`'s account of what it did."""
    disk, name = parse_point_ref(ref)
    with index.write() as txn:
        point = index.point_named(txn, disk, name)
        done = change(point)
        index.put_point(txn, point)
    log.info("disk %s: point %s %s", disk, name, done)
    return {**vars(point), "done": done}
