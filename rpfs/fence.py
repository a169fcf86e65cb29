"""What running writers hold: the packs they may still append to and the chunks they
may still name. GC leaves both alone (maintenance/gc.py), and the uploader sends only
packs no writer appends to any more (upload.py): one rule, so the two agree on which
packs are sealed.

The fence is this process's writers (`ingest.SESSIONS`, `store.packs.OPEN_PACKS`) plus
every live capture's record in the index (a capture in another process): the time the
oldest of them started, the pack counter each live capture found (its packs are above
it), and the counter as the fence found it (a writer that started since has packs above).

`retired`: the packs GC took out of the index's names and will delete (its notes
`gc-retired` and `store-retired`); the uploader takes none of them (see gc.py, "The store").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .index import Index
from .ingest import SESSIONS
from .repo import Repository
from .store.packs import OPEN_PACKS

RETIRED = "gc-retired"  # index note: packs to delete once the index names nothing in them
STORE_RETIRED = "store-retired"  # index note: packs whose objects go after the reader grace


@dataclass
class Fence:
    """What GC must leave to running writers."""

    since: float  # free only chunks that dropped to 0 before this
    packs_after: int | None  # and touch no pack numbered above this (None: no limit)
    last_pack: int  # the `pack` counter then: a writer started since has higher packs
    open_packs: set[int] = field(default_factory=set)

    def sealed(self, pack: int) -> bool:
        return pack <= self.last_pack and pack not in self.open_packs and (
            self.packs_after is None or pack <= self.packs_after)


def fence(repo: Repository) -> Fence:
    """The running writers' fence, now (see the module docstring). The pack counter is
    read first: a writer that starts after it (while GC sweeps, say) is in neither this
    process's open packs nor the live captures read next, but all its packs are above it."""
    with repo.index.read() as txn:
        last_pack = repo.index.last_id(txn, "pack")
    started = [t for t in [SESSIONS.oldest()] if t is not None]
    packs_after = None
    with repo.index.read() as txn:
        captures = repo.index.list_captures(txn)
    for _, info in captures:
        if repo.disk_lock_free(info["disk"]):
            continue  # its process is gone: its rows are reaped, it names nothing more
        started.append(info["started"])
        after = info.get("packs_after", 0)  # a capture of an older rpfs: every pack
        packs_after = after if packs_after is None else min(packs_after, after)
    return Fence(min(started, default=time.time()), packs_after, last_pack, OPEN_PACKS.now())


def retired(index: Index, txn) -> set[int]:
    """The packs GC retired and has not deleted everywhere yet (read in `txn`)."""
    return set(index.get_note(txn, RETIRED) or []) | {
        entry["pack"] for entry in index.get_note(txn, STORE_RETIRED) or []}
