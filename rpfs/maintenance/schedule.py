"""When the daemon runs its own gc and its turn of rolling verify.

Each job runs when its interval (the repository settings `gc-interval`,
`verify-interval`; 0 turns it off) has passed since it last ran, by the system clock
(upkeep is not a lifecycle decision: RPFS_NOW does not move it). When each last ran is
an index note (`upkeep`), so a daemon restarted every hour still runs them daily. A
repository whose daemon never ran one starts counting at its first look: a fresh mount
does not begin with a gc, and a day later it runs.
"""

from __future__ import annotations

import time

from ..index import Index

NOTE = "upkeep"
VERIFY_TURN = 600.0  # seconds of verify per turn; the next turn goes on where it stopped


def due(index: Index, job: str, interval: int) -> bool:
    """Whether `job` (gc, verify) should run now; notes the start of counting if it never
    ran."""
    if not interval:
        return False
    with index.read() as txn:
        last = (index.get_note(txn, NOTE) or {}).get(job)
    if last is None:
        done(index, job)
        return False
    return time.time() - last >= interval


def done(index: Index, job: str) -> None:
    """`job` ran (or counting starts) now."""
    with index.write() as txn:
        note = index.get_note(txn, NOTE) or {}
        index.put_note(txn, NOTE, {**note, job: time.time()})
