"""What each block of an image is, for an export that reports it (NBD block status):
whether it holds data, the layer it comes from, and whether it reads differently than a
point of the same history.

A point's answers come from its chain's extents (`lineage.layers`, `lineage.changed`):
a complete point never changes, so each is computed once per open image. A writable
disk's come from its block map and local file for local blocks and from its chain for
ABSENT ones; the chain's part is computed again only when the index has changed since
(its last transaction id), so a client that walks the disk in many requests costs one
scan of the extents, not one per request.

Depth counts layers from the top: 1 is the image's own (a disk's local file and its own
lineage's points, a point's lineage), 2 and more an origin it was cloned from, 0 a block
no layer has (it reads as zeros). Everything here blocks (LMDB): exports call it from
worker threads.
"""

from __future__ import annotations

import threading

from ..index import Index, PointRecord, PointState
from ..lineage import Chain, changed, layers
from .blockmap import ABSENT, DIRTY, FROZEN
from .livedisk import LiveDisk


class _ChainAnswers:
    """A chain's layers and its differences from other chains, cached while the index
    stays at one transaction (for ever, for a point: `fixed`)."""

    def __init__(self, index: Index, fixed: bool) -> None:
        self.index = index
        self.fixed = fixed
        self._lock = threading.Lock()
        self._key: object = None
        self._layers: dict[int, tuple[int, bool]] | None = None
        self._changed: dict[tuple, set[int]] = {}

    def _fresh(self, chain: Chain) -> None:
        key = tuple(chain) if self.fixed else (tuple(chain), self.index.last_txnid())
        if key != self._key:
            self._key, self._layers, self._changed = key, None, {}

    def layers(self, chain: Chain) -> dict[int, tuple[int, bool]]:
        with self._lock:
            self._fresh(chain)
            if self._layers is None:
                with self.index.read() as txn:
                    self._layers = layers(self.index, txn, chain)
            return self._layers

    def changed(self, chain: Chain, other: PointRecord) -> set[int]:
        with self._lock:
            self._fresh(chain)
            key = (other.lineage, other.gen)
            if key not in self._changed:
                with self.index.read() as txn:
                    theirs = self.index.chain(txn, other.lineage, other.gen)
                    self._changed[key] = set(changed(self.index, txn, chain, theirs))
            return self._changed[key]


class PointStatus:
    """The blocks of an open point image. A point still being archived has blocks in its
    disk's local file that the index does not list yet: it reports every block as data
    of depth 1 and as differing, which is never wrong, only coarse."""

    def __init__(self, index: Index, point: PointRecord) -> None:
        self.complete = point.state == PointState.COMPLETE
        with index.read() as txn:
            self.chain = index.chain(txn, point.lineage, point.gen)
        self._answers = _ChainAnswers(index, fixed=True)

    def data(self, first: int, end: int) -> list[bool]:
        if not self.complete:
            return [True] * (end - first)
        found = self._answers.layers(self.chain)
        return [found.get(b, (0, False))[1] for b in range(first, end)]

    def depth(self, first: int, end: int) -> list[int]:
        if not self.complete:
            return [1] * (end - first)
        found = self._answers.layers(self.chain)
        return [found.get(b, (0, False))[0] for b in range(first, end)]

    def dirty(self, other: PointRecord, first: int, end: int) -> list[bool]:
        if not self.complete or other.state != PointState.COMPLETE:
            return [True] * (end - first)
        differ = self._answers.changed(self.chain, other)
        return [b in differ for b in range(first, end)]


class DiskStatus:
    """The blocks of an open writable disk: local ones from the block map and the local
    file, ABSENT ones through the disk's chain (what copy-on-read would fetch)."""

    def __init__(self, disk: LiveDisk) -> None:
        self.disk = disk
        self._answers = _ChainAnswers(disk.index, fixed=False)

    @property
    def chain(self) -> Chain:
        """Where the disk's ABSENT blocks resolve (a rollback changes it)."""
        return self.disk.chain

    def data(self, first: int, end: int) -> list[bool]:
        states = self.disk.map.states
        local = self.disk.local_data(first, end)
        found = self._answers.layers(self.disk.chain)
        return [
            local[b - first] if states[b] != ABSENT else found.get(b, (0, False))[1]
            for b in range(first, end)
        ]

    def depth(self, first: int, end: int) -> list[int]:
        states = self.disk.map.states
        found = self._answers.layers(self.disk.chain)
        return [
            1 if states[b] != ABSENT else found.get(b, (0, False))[0]
            for b in range(first, end)
        ]

    def dirty(self, other: PointRecord, first: int, end: int) -> list[bool]:
        """A local block written since the newest point (or any local block, if the map
        is not tracked: after a crash a PRESENT one may hold an unrecorded write) counts
        as differing; any other reads as the disk's chain does."""
        states = self.disk.map.states
        tracked = self.disk.map.tracked
        if other.state != PointState.COMPLETE:
            return [True] * (end - first)
        differ = self._answers.changed(self.disk.chain, other)
        return [
            b in differ or (states[b] != ABSENT and (not tracked or states[b] in (DIRTY, FROZEN)))
            for b in range(first, end)
        ]
