"""On-demand points' own expiry: the points whose time has come go to the trash.

Its own room because it is the one lifecycle step nobody asks for at the moment it
happens: the daemon runs `expire` at start and every minute (serve/daemon.py; the issue:
"expiry is checked by the daemon"), so a point that expired while no daemon ran goes
when one starts. It works on the index alone, one transaction per point that checks
the point again (a point held or deleted since the listing is left as it now is). A
held point waits for its release, a point still archiving for its archive; either goes
at the first check after that.
"""

from __future__ import annotations

import logging

from ..index import Index, PointState
from .clock import iso, now
from .trash import to_trash

log = logging.getLogger(__name__)


def expire(index: Index, at: float | None = None) -> list[dict]:
    """Move every unheld, complete point whose expiry is at or before `at` (default:
    now) to the trash, deleted at `at`; the points moved, as disk, name and expires."""
    at = now() if at is None else at
    with index.read() as txn:
        due = [(p.disk, p.name) for p in index.list_points(txn) if _due(p, at)]
    out = []
    for disk, name in due:
        with index.write() as txn:
            point = index.get_point(txn, disk, name)
            if point is None or not _due(point, at):
                continue
            to_trash(index, txn, point, at)
        log.info("disk %s: point %s expired at %s: moved to the trash", disk, name,
                 iso(point.expires))
        out.append({"disk": disk, "name": name, "expires": point.expires})
    return out


def _due(point, at: float) -> bool:
    return (point.expires is not None and point.expires <= at and point.hold is None
            and point.state == PointState.COMPLETE)
