"""Fault injection for a daemon under test (this directory on PYTHONPATH).

With RPFS_TEST_READ_EIO naming a file, every pread of a file whose name that file lists
fails with EIO, as a flaky disk's would, for as long as it lists it (test_backend.py).
With RPFS_TEST_PACK_GATE naming a path, pack writes wait while it exists, or fail with
ENOSPC while it says so (test_purge_open.py: an archive as slow as the test wants)."""

import errno
import os

_LIST = os.environ.get("RPFS_TEST_READ_EIO")

if _LIST:
    _pread = os.pread

    def _failing_pread(fd: int, n: int, offset: int) -> bytes:
        with open(_LIST) as f:
            failing = f.read().split()
        if failing and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _pread(fd, n, offset)

    os.pread = _failing_pread

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
