"""Packs in an object store, written locally first and read through a bounded cache.

A repository with a store (rpfs.json "store") keeps three kinds of pack bytes:

    REPO/packs/NNNNNNNN.pack          pending: written here as in a local repository (the
                                      writers append and fdatasync), not yet in the store
    REPO/cache/packs/NNNNNNNN.pack    a pack uploaded from this host, kept whole as cache
    REPO/cache/segments/NNNNNNNN.SSSSSS   SEGMENT bytes of a stored pack, fetched by a
                                      ranged GET

A read looks in that order, then GETs. A pack moves from pending to cache by one rename
after its upload is recorded (upload.py), so a reader that misses it in packs/ finds it
in the cache, or else in the store: every step of the way one of the three holds it.

The cache is bounded (`cache_size`) and evicts the least recently used entry first: LRU
because a VM's reads of a point are mostly either a working set it comes back to (kept)
or one sequential pass (a scan, gone by the time it matters); an entry is a whole pack or
a segment, each weighed by its bytes. Misses are fetched a segment-aligned span at a time
(one GET for the run of missing segments a read covers: a sequential reader's prefetch
reads runs of adjacent records, PackStore's READ_SPAN, so its GETs are 1 MiB spans, not
blocks), and concurrent misses of one segment wait for the one GET in flight. The order
of recency is kept in memory (an OrderedDict of names and sizes, about 100 bytes an
entry: 20 GiB of 1 MiB segments is 2 MiB), rebuilt from the files' mtimes at open.

A store that is down (StoreUnavailable: a GET or HEAD failed after retrying for the
store's `retry_seconds`) is not asked again for DOWN_QUIET seconds: the reads queued
behind the failed one (the other runs of one read, the prefetcher's batches, the GETs
ahead and the HEAD they need) fail at once with EIO instead of each waiting out the
bound again, and the first read after that asks it again, so reads succeed again
without a remount once it is back. A failed GET caches
nothing: a segment is written (and renamed into place) only from a whole answer. A store
that refuses a GET (credentials revoked since the mount) fails the read the same way:
the bytes are not known to be bad, a retry after the fix reads them.

A reader that goes forward through a stored pack (three reads in a row, each starting in
or next to the segment where the one before ended: random reads seldom do) has the
segments ahead of it fetched in the background, AHEAD of them in GETs of GET_SPAN. The
chunk prefetcher's window is in blocks of the image, often only a few segments of packs
(compressed data), so without this one 1 MiB GET at a time was in flight; and a GET has a
cost of its own besides its bytes (SeaweedFS here: 4 MiB GETs took a third less of its CPU
per byte than 1 MiB ones; docs/performance.md, "Object store").

Each process keeps the bound for what it adds and sees; a second process (a capture
beside the daemon) reads the same files, and a file another process evicted reads as a
miss. GC's deletes go to all three places.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .backend import PackAppender, PackMissing, PackUnavailable
from .format import pack_name, pack_number
from .local import LocalBackend
from .s3 import S3Objects, StoreRefused, StoreUnavailable

log = logging.getLogger(__name__)

SEGMENT = 1 << 20  # bytes of a stored pack fetched and cached as one piece
AHEAD = 16  # segments fetched ahead of a reader going forward through a pack
GET_SPAN = 4  # segments one GET ahead asks for
AHEAD_GETS = 4  # GETs ahead in flight at most (each holds GET_SPAN segments in memory)
STREAMS = 64  # packs whose forward readers are followed
STREAK = 2  # reads in a row after a first one that make a reader a forward reader
PACKS = "packs/"  # the object names' prefix in the store
DOWN_QUIET = 1.0  # seconds after a failed GET or HEAD in which the store is not asked again


def object_name(pack: int) -> str:
    return PACKS + pack_name(pack)


class ReadCache:
    """Bounded local copies of stored packs: whole packs and segments (see the module
    docstring). Thread-safe; file I/O runs outside its lock."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.whole = LocalBackend(root / "packs")  # its read-fd cache, and delete
        self.segments = root / "segments"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # 0700 each (perms.py)
        for path in (self.whole.root, self.segments):
            path.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.hits = self.misses = 0
        self._scan()

    def _scan(self) -> None:
        found = []
        for folder in (self.whole.root, self.segments):
            for entry in os.scandir(folder):
                if entry.name.startswith("."):
                    continue
                st = entry.stat()
                found.append((st.st_mtime, f"{folder.name}/{entry.name}", st.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self.used += size

    def _path(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def _segment(pack: int, seg: int) -> str:
        return f"segments/{pack:08d}.{seg:06d}"

    def _touch(self, name: str) -> bool:
        with self._lock:
            if name not in self._lru:
                return False
            self._lru.move_to_end(name)
            return True

    def read_whole(self, pack: int, offset: int, length: int) -> bytes | None:
        """Bytes of `pack` if it is cached whole, else None."""
        if not self._touch(f"packs/{pack_name(pack)}"):
            return None
        try:
            return self.whole.read(pack, offset, length)
        except PackMissing:  # evicted by another process
            return None

    def size_whole(self, pack: int) -> int | None:
        with self._lock:
            return self._lru.get(f"packs/{pack_name(pack)}")

    def has_segment(self, pack: int, seg: int) -> bool:
        with self._lock:
            return self._segment(pack, seg) in self._lru

    def read_segment(self, pack: int, seg: int, start: int = 0, length: int = SEGMENT
                     ) -> bytes | None:
        """`length` bytes from `start` of a cached segment (fewer at a pack's end), or
        None if it is not cached."""
        name = self._segment(pack, seg)
        if not self._touch(name):
            return None
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                self.used -= self._lru.pop(name, 0)
            return None
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def add_segment(self, pack: int, seg: int, data: bytes | memoryview) -> None:
        name = self._segment(pack, seg)
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        try:
            with open(tmp, "wb") as out:  # not fsynced: one lost in a crash is a miss
                out.write(data)
            tmp.rename(path)
        except BaseException:  # a full disk: no partial segment is ever read as one
            tmp.unlink(missing_ok=True)
            raise
        self._added(name, len(data))

    def add_whole(self, pack: int, source: Path) -> None:
        """Take the pending pack file `source` (just recorded as stored) into the cache."""
        name = f"packs/{pack_name(pack)}"
        size = source.stat().st_size
        source.rename(self._path(name))
        self._added(name, size)

    def _added(self, name: str, size: int) -> None:
        with self._lock:
            self.used += size - self._lru.pop(name, 0)
            self._lru[name] = size
            doomed = []
            while self.used > self.limit and self._lru:
                old, old_size = self._lru.popitem(last=False)
                self.used -= old_size
                doomed.append(old)
        for old in doomed:
            self._remove(old)

    def _remove(self, name: str) -> None:
        folder, _, file = name.partition("/")
        pack = pack_number(file)
        if folder == "packs" and pack is not None:
            self.whole.delete(pack)  # closes its cached read fd
        else:
            self._path(name).unlink(missing_ok=True)

    def drop(self, pack: int) -> None:
        """Forget every cached byte of `pack` (GC deleted it)."""
        prefix = f"segments/{pack:08d}."
        with self._lock:
            names = [n for n in self._lru if n.startswith(prefix)
                     or n == f"packs/{pack_name(pack)}"]
            for name in names:
                self.used -= self._lru.pop(name)
        for name in names:
            self._remove(name)
        for path in self.segments.glob(f"{pack:08d}.*"):  # another process's entries
            path.unlink(missing_ok=True)
        self.whole.delete(pack)

    def close(self) -> None:
        self.whole.close()


class TieredBackend:
    """A PackBackend whose packs live in an object store (see the module docstring)."""

    can_append = True  # writers append to pending local packs
    remote = True  # a read may be a GET

    def __init__(self, root: Path, objects: S3Objects, cache_size: int) -> None:
        self.pending = LocalBackend(root / "packs")
        self.cache = ReadCache(root / "cache", cache_size)
        self.objects = objects
        self.location = objects.location
        self.connections = 8  # GETs in flight worth issuing (docs/performance.md)
        self._inflight: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # stored packs' sizes, learned from the store
        # the packs read last: pack -> (the last segment of its last read, how many reads
        # in a row went forward)
        self._fronts: OrderedDict[int, tuple[int, int]] = OrderedDict()
        # at most a quarter of the cache ahead: a segment fetched ahead must live to be read
        self.ahead = min(AHEAD, cache_size // SEGMENT // 4)
        self.get_span = min(GET_SPAN, self.ahead)
        self._ahead_pool: ThreadPoolExecutor | None = None
        self.gets = self.get_bytes = 0
        self._down: tuple[float, StoreUnavailable] | None = None  # the last GET's failure

    # -- reading ---------------------------------------------------------------------------

    def read(self, pack: int, offset: int, length: int) -> bytes:
        try:
            return self.pending.read(pack, offset, length)
        except PackMissing:
            pass
        data = self.cache.read_whole(pack, offset, length)
        if data is not None:
            return data
        end = offset + length
        self._read_ahead(pack, offset // SEGMENT, (end - 1) // SEGMENT)
        pieces = self._segments(pack, offset, end)
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def advise(self, ranges: list[tuple[int, int, int]]) -> None:
        """Nothing: a read of segments not cached starts its GET itself, and the chunk
        prefetcher already fetches a sequential reader's ahead."""

    def _segments(self, pack: int, offset: int, end: int) -> list[bytes | memoryview]:
        """Bytes [offset, end) of a stored pack, a piece from each segment they touch,
        the missing segments fetched with one GET per run of them (the last segment of a
        pack may be short, or absent past its end: a piece is short or empty there)."""
        first, last = offset // SEGMENT, (end - 1) // SEGMENT
        out: list[bytes | None] = []
        mine: list[int] = []  # segments this call fetches
        waits: dict[int, Future] = {}
        for seg in range(first, last + 1):
            lo, hi = _clip(seg, offset, end)
            data = self.cache.read_segment(pack, seg, lo, hi - lo)
            if data is None:
                with self._lock:  # a GET of it in flight is waited for, not repeated
                    future = self._inflight.get((pack, seg))
                    if future is None:
                        future = self._inflight[(pack, seg)] = Future()
                        mine.append(seg)
                waits[seg] = future
            out.append(data)
        if mine:
            self.cache.misses += len(mine)
            self._fetch(pack, mine)
        for seg, future in waits.items():
            lo, hi = _clip(seg, offset, end)
            out[seg - first] = future.result()[lo:hi]
        return out  # type: ignore[return-value]

    def _read_ahead(self, pack: int, first: int, last: int) -> None:
        """If this read of `pack` (segments first..last) goes forward from the reads before
        it, GET the segments up to `ahead` past it that no one has or fetches, in the
        background. Concurrent readers of one stream (the prefetch pool's) arrive a little
        out of order, so a read starting a segment behind the last one still counts."""
        if not self.ahead:
            return
        with self._lock:
            front, streak = self._fronts.pop(pack, (-2, 0))
            streak = streak + 1 if front - 1 <= first <= front + 1 else 0
            self._fronts[pack] = (last, streak)
            while len(self._fronts) > STREAMS:
                self._fronts.popitem(last=False)
        if streak < STREAK or self._down is not None:
            return  # (the store failed last: no requests of our own choosing until it works)
        try:
            end = -(-(self._sizes.get(pack) or self.size(pack)) // SEGMENT)
        except OSError:  # the store does not answer (size() noted it): the read's GET says so
            return
        stop = min(end, last + 1 + self.ahead)
        free = [seg for seg in range(last + 1, stop) if not self.cache.has_segment(pack, seg)]
        runs = []
        with self._lock:  # whole GETs only: as the reader moves on, they refill in GET_SPANs
            for run in _runs([seg for seg in free if (pack, seg) not in self._inflight],
                             self.get_span):
                if len(run) == self.get_span or run[-1] == end - 1:
                    for seg in run:
                        self._inflight[(pack, seg)] = Future()
                    runs.append(run)
        if not runs:
            return
        with self._lock:
            if self._ahead_pool is None:
                self._ahead_pool = ThreadPoolExecutor(AHEAD_GETS,
                                                      thread_name_prefix="rpfs-get-ahead")
            pool = self._ahead_pool
        for run in runs:
            self.cache.misses += len(run)
            pool.submit(self._fetch, pack, run)

    def _fetch(self, pack: int, segs: list[int]) -> None:
        """GET each run of consecutive segments in `segs` and settle their futures."""
        for run in _runs(segs):
            try:
                self._not_down(pack)
                try:
                    data = self.objects.get_range(object_name(pack), run[0] * SEGMENT,
                                                  len(run) * SEGMENT)
                except StoreRefused as exc:  # credentials revoked since the mount
                    raise StoreUnavailable(errno.EACCES, str(exc), self.objects.url(
                        object_name(pack))) from None
                except StoreUnavailable as exc:
                    self._down = (time.monotonic(), exc)
                    raise
                with self._lock:
                    self._down = None
                    self.gets += 1
                    self.get_bytes += len(data)
                for i, seg in enumerate(run):
                    piece = data[i * SEGMENT : (i + 1) * SEGMENT]  # a view: no copy
                    if piece:
                        try:
                            self.cache.add_segment(pack, seg, piece)
                        except OSError as exc:  # a full cache disk: the read goes on
                            log.warning("pack %s segment %d not cached: %s",
                                        pack_name(pack), seg, exc)
                    self._settle(pack, seg, piece, None)
            except BaseException as exc:
                for seg in run:
                    self._settle(pack, seg, None, exc)
                if not isinstance(exc, OSError):
                    raise

    def _not_down(self, pack: int) -> None:
        """StoreUnavailable if a GET or HEAD failed less than DOWN_QUIET seconds ago."""
        down = self._down
        if down is not None and time.monotonic() - down[0] < DOWN_QUIET:
            raise StoreUnavailable(down[1].errno, down[1].strerror,
                                   self.objects.url(object_name(pack)))

    def _settle(self, pack: int, seg: int, data: bytes | memoryview | None,
                exc: BaseException | None) -> None:
        with self._lock:
            future = self._inflight.pop((pack, seg), None)
        if future is not None and not future.done():
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(data)

    def size(self, pack: int) -> int:
        try:
            return self.pending.size(pack)
        except PackMissing:
            pass
        size = self.cache.size_whole(pack) or self._sizes.get(pack)
        if size is None:
            self._not_down(pack)  # a HEAD waits out the bound as a GET does
            try:
                size = self._sizes[pack] = self.objects.size(object_name(pack))
            except StoreUnavailable as exc:
                self._down = (time.monotonic(), exc)
                raise
        return size

    def list(self) -> list[int]:
        stored = self.stored_sizes()
        return sorted(set(self.pending.list()) | set(stored))

    def stored_sizes(self) -> dict[int, int]:
        """Every pack in the store and its size (a LIST of the store)."""
        out = {}
        for name, size in self.objects.list(PACKS).items():
            pack = pack_number(name[len(PACKS):])
            if pack is not None:
                out[pack] = size
        self._sizes.update(out)
        return out

    # -- writing ---------------------------------------------------------------------------

    def create(self, pack: int) -> PackAppender:
        return self.pending.create(pack)

    def truncate(self, pack: int, length: int) -> None:
        if self.pending.path(pack).exists():
            self.pending.truncate(pack, length)
        # a stored pack keeps its tail: immutable, and nothing names those bytes

    def put(self, pack: int, data: bytes) -> None:
        self.pending.put(pack, data)

    def upload(self, pack: int) -> int:
        """PUT the pending pack `pack` to the store whole; its size."""
        path = self.pending.path(pack)
        size = path.stat().st_size
        self.objects.put(object_name(pack), path)
        return size

    def stored(self, pack: int) -> None:
        """The store's copy of `pack` is recorded: its local file becomes cache."""
        self.pending.forget(pack)
        with contextlib.suppress(FileNotFoundError):  # another uploader moved it first
            self.cache.add_whole(pack, self.pending.path(pack))

    def drop_local(self, pack: int) -> None:
        """Remove the local copies of `pack` (pending and cached); its object stays for
        the readers of the reader grace (maintenance/gc.py)."""
        self.pending.delete(pack)
        self.cache.drop(pack)

    def delete(self, pack: int) -> None:
        """Remove `pack` everywhere: local copies (again: a reader of the grace may have
        cached segments of it since) and its object."""
        self.drop_local(pack)
        self.objects.delete(object_name(pack))
        self._sizes.pop(pack, None)

    def close(self) -> None:
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                left = list(self._inflight)
            for pack, seg in left:  # GETs ahead cancelled before they began
                self._settle(pack, seg, None, PackUnavailable(
                    f"{pack_name(pack)}: the backend was closed"))
        self.pending.close()
        self.cache.close()


def _clip(seg: int, offset: int, end: int) -> tuple[int, int]:
    """The part of segment `seg` that [offset, end) covers, as offsets into it."""
    base = seg * SEGMENT
    return max(offset, base) - base, min(end, base + SEGMENT) - base


def _runs(segs: list[int], longest: int | None = None) -> list[list[int]]:
    """`segs` (ascending) cut into runs of consecutive segments, each `longest` at most."""
    runs: list[list[int]] = []
    for seg in segs:
        if runs and runs[-1][-1] == seg - 1 and (longest is None or len(runs[-1]) < longest):
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs
