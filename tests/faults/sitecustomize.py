"""Fault injection for a daemon under test: with this directory on PYTHONPATH and
RPFS_TEST_READ_EIO naming a file, every pread of a file whose name that file lists fails
with EIO, as a flaky disk's would, for as long as it lists it (test_backend.py)."""

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
