"""Fault injection for rpfs processes under test (a daemon, a CLI command): with this
directory on PYTHONPATH,

- RPFS_TEST_READ_EIO naming a file: every pread of a file whose name that file lists
  fails with EIO, as a flaky disk's would, for as long as it lists it (test_backend.py);
- RPFS_TEST_PACK_GATE naming a path: pack writes wait while it exists, or fail with
  ENOSPC while it says so (test_purge_open.py: an archive as slow as the test wants);
- RPFS_TEST_READS_WAIT_FOR_GC=1: a reader's fetch of chunks it has looked up
  (PackStore.get_many: the chunk cache, restore, verify; not GC's copying) that starts
  while a gc of this process runs waits until that gc has ended: each chunk it looked up
  before GC moved it is read after its old pack is gone, GC's race with every reader,
  forced (test_gc_online.py);
- RPFS_TEST_KILL_AT_GC_MOVE=K: the process SIGKILLs itself at the K-th chunk gc points
  at its copy, before moving it: in the middle of a move transaction
  (test_gc_online.py);
- RPFS_TEST_KILL_AFTER_GC_NOTE=N: it SIGKILLs itself the N-th time gc starts moving a
  compacted pack's chunks: just after that compaction's note committed (or as it
  finishes one a kill interrupted), before any chunk of it moved (test_gc_online.py);
- RPFS_TEST_KILL_AFTER_PACK_DELETES=N: it SIGKILLs itself just after gc deleted the N-th
  pack, before the index forgets it (test_gc_online.py);
- RPFS_TEST_KILL_AT_DROP=K: the process SIGKILLs itself at the K-th extent dropped by a
  thread that has removed a point, before dropping it: in the middle of a point's purge
  (test_purge_crash.py);
- RPFS_TEST_KILL_AFTER_COMMITS=N: it SIGKILLs itself just after the N-th commit of a
  transaction that removed a point (test_purge_crash.py).
- RPFS_TEST_KILL_BEFORE_PUT=N / RPFS_TEST_KILL_AFTER_PUT=N: the process SIGKILLs itself
  at the N-th pack it uploads (TieredBackend.upload), after the pack's "uploading"
  record and before its PUT, or after the PUT and before its "stored" record
  (test_s3_faults.py).

Removing a point is calling Index.delete_point or Index.delete_trash, as trash.delete,
trash.purge_trash and prune do once per point: so the counts do not depend on other work
of the process meanwhile (a daemon's hydration, archiving).
"""

import errno
import os
import signal

_LIST = os.environ.get("RPFS_TEST_READ_EIO")
_READS_WAIT_FOR_GC = os.environ.get("RPFS_TEST_READS_WAIT_FOR_GC") == "1"
_KILL_AT_GC_MOVE = int(os.environ.get("RPFS_TEST_KILL_AT_GC_MOVE") or 0)
_KILL_AFTER_GC_NOTE = int(os.environ.get("RPFS_TEST_KILL_AFTER_GC_NOTE") or 0)
_KILL_AFTER_PACK_DELETES = int(os.environ.get("RPFS_TEST_KILL_AFTER_PACK_DELETES") or 0)
_KILL_AT_DROP = int(os.environ.get("RPFS_TEST_KILL_AT_DROP") or 0)
_KILL_AFTER_COMMITS = int(os.environ.get("RPFS_TEST_KILL_AFTER_COMMITS") or 0)
_KILL_BEFORE_PUT = int(os.environ.get("RPFS_TEST_KILL_BEFORE_PUT") or 0)
_KILL_AFTER_PUT = int(os.environ.get("RPFS_TEST_KILL_AFTER_PUT") or 0)

if _LIST:
    _pread = os.pread

    def _failing_pread(fd: int, n: int, offset: int) -> bytes:
        with open(_LIST) as f:
            failing = f.read().split()
        if failing and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _pread(fd, n, offset)

    os.pread = _failing_pread

if _READS_WAIT_FOR_GC:
    import threading

    from rpfs.maintenance import gc
    from rpfs.store.packs import PackStore

    _gc_done = threading.Event()
    _gc_done.set()
    _gc_run, _get_many = gc.run, PackStore.get_many

    def _gc_running(*args, **kw):
        _gc_done.clear()
        try:
            return _gc_run(*args, **kw)
        finally:
            _gc_done.set()

    def _after_gc(self, wanted, relocate=None, **options):
        _gc_done.wait(60)
        return _get_many(self, wanted, relocate, **options)

    gc.run = _gc_running
    PackStore.get_many = _after_gc

if _KILL_AT_GC_MOVE or _KILL_AFTER_GC_NOTE or _KILL_AFTER_PACK_DELETES:
    import threading

    from rpfs.index import Index
    from rpfs.maintenance import gc
    from rpfs.store.packs import PackStore

    _in_gc = threading.local()  # .moving: this thread is in gc's _move
    _gc_seen = {"moves": 0, "notes": 0, "deletes": 0}
    _gc_move, _move_chunk, _delete = gc._move, Index.move_chunk, PackStore.delete

    def _gc_moving(index, pack, copies):
        _gc_seen["notes"] += 1
        if _gc_seen["notes"] == _KILL_AFTER_GC_NOTE:
            os.kill(os.getpid(), signal.SIGKILL)
        _in_gc.moving = True
        try:
            return _gc_move(index, pack, copies)
        finally:
            _in_gc.moving = False

    def _moving_chunk(self, txn, digest, loc):
        if getattr(_in_gc, "moving", False):
            _gc_seen["moves"] += 1
            if _gc_seen["moves"] == _KILL_AT_GC_MOVE:
                os.kill(os.getpid(), signal.SIGKILL)
        return _move_chunk(self, txn, digest, loc)

    def _deleting(self, pack):
        _delete(self, pack)
        _gc_seen["deletes"] += 1
        if _gc_seen["deletes"] == _KILL_AFTER_PACK_DELETES:
            os.kill(os.getpid(), signal.SIGKILL)

    gc._move = _gc_moving
    Index.move_chunk = _moving_chunk
    PackStore.delete = _deleting

if _KILL_AT_DROP or _KILL_AFTER_COMMITS:
    import threading

    from rpfs.index import Index, _Txn

    _of_a_point: set[int] = set()  # id() of the open LMDB transactions that removed a point
    _removers = threading.local()  # .removed: this thread has removed a point
    _seen = {"drops": 0, "commits": 0}

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _removing(method):
        def removing(self, txn, *args):
            _of_a_point.add(id(txn))
            _removers.removed = True
            return method(self, txn, *args)

        return removing

    Index.delete_point = _removing(Index.delete_point)
    Index.delete_trash = _removing(Index.delete_trash)

    _drop_extent = Index.drop_extent

    def _dropping(self, txn, *args):
        if getattr(_removers, "removed", False):
            _seen["drops"] += 1
            if _seen["drops"] == _KILL_AT_DROP:
                _die()
        return _drop_extent(self, txn, *args)

    Index.drop_extent = _dropping

    _txn_exit = _Txn.__exit__

    def _exiting(self, typ, exc, tb):
        ours = id(self._txn) in _of_a_point
        _of_a_point.discard(id(self._txn))
        _txn_exit(self, typ, exc, tb)  # commits, or aborts and raises
        if ours and typ is None:
            _seen["commits"] += 1
            if _seen["commits"] == _KILL_AFTER_COMMITS:
                _die()

    _Txn.__exit__ = _exiting

if _KILL_BEFORE_PUT or _KILL_AFTER_PUT:
    from rpfs.store.tiered import TieredBackend

    _uploads = {"n": 0}
    _upload = TieredBackend.upload

    def _uploading(self, pack):
        _uploads["n"] += 1
        if _uploads["n"] == _KILL_BEFORE_PUT:
            os.kill(os.getpid(), signal.SIGKILL)
        size = _upload(self, pack)
        if _uploads["n"] == _KILL_AFTER_PUT:
            os.kill(os.getpid(), signal.SIGKILL)
        return size

    TieredBackend.upload = _uploading

# RPFS_TEST_PACK_GATE: while the path exists, every pwrite to a pack file waits for it to
# go, or, while the file says ENOSPC, fails as a full disk would (a stalled archive).
_GATE = os.environ.get("RPFS_TEST_PACK_GATE")

if _GATE:
    import time

    _pwrite = os.pwrite

    def _gated_pwrite(fd: int, data, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
            while os.path.exists(_GATE):
                try:
                    with open(_GATE) as f:
                        if f.read().strip() == "ENOSPC":
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except FileNotFoundError:
                    break
                time.sleep(0.02)
        return _pwrite(fd, data, offset)

    os.pwrite = _gated_pwrite
