"""Exceptions that cross module boundaries, and what to tell the operator about OS errors.

`RpfsError` carries a message meant for the operator: the CLI prints it as one line and
exits non-zero. `CorruptChunk` is raised by the chunk store when stored bytes fail their
hash check; the read path turns it into EIO after logging disk, point, block and pack.
`NoSpace` is both: an operator's message and an ENOSPC `OSError`, so the FUSE layer
answers a refused write with ENOSPC while the CLI prints the message.

A full disk, a read-only mount or a failing device is not a bug: `describe_os_error`
turns such an `OSError` into one line that names the path and what to do.
"""

from __future__ import annotations

import errno
from pathlib import Path


class RpfsError(Exception):
    """An error the user can act on; its message says what was wrong and what to do."""


class CorruptChunk(RpfsError):
    """Stored chunk bytes do not match their hash (or cannot be decoded)."""

    def __init__(self, pack: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt chunk in pack {pack} at offset {offset}: {reason}")
        self.pack = pack
        self.offset = offset
        self.reason = reason


class NoSpace(RpfsError, OSError):
    """Refused for lack of space (below the repository's reserve, or ENOSPC itself)."""

    def __init__(self, message: str, filename: str | None = None) -> None:
        OSError.__init__(self, errno.ENOSPC, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# errno -> (what happened to {path}, what to do)
_ADVICE = {
    errno.ENOSPC: ("no space left on the filesystem of {path}",
                   "free space there (or move the repository to a larger one) and try again"),
    errno.EDQUOT: ("disk quota exceeded on the filesystem of {path}",
                   "raise the quota or free space there, and try again"),
    errno.EACCES: ("permission denied: {path}",
                   "run rpfs as root (or as the repository's owner), or fix the permissions"),
    errno.EPERM: ("operation not permitted: {path}",
                  "run rpfs as root (or as the repository's owner), or fix the permissions"),
    errno.EROFS: ("{path} is on a read-only filesystem",
                  "remount it read-write (or use a repository on a writable filesystem)"),
    errno.ENOENT: ("{path} does not exist",
                   "check the path (and -r/--repo); a repository file may have been removed"),
    errno.EIO: ("input/output error on {path}",
                "the storage failed: check the kernel log ('dmesg') and the device"),
}


def is_expected(exc: BaseException) -> bool:
    """An OS condition an operator can act on (full disk, permissions, ...), not a bug."""
    return isinstance(exc, OSError) and exc.errno in _ADVICE


def stall_reason(exc: OSError) -> str:
    """A few words for a status column: 'no space on device', 'input/output error'."""
    if exc.errno in SPACE_ERRNOS:
        return "no space on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return (exc.strerror or str(exc)).lower()


def describe_os_error(exc: OSError, where: Path | str | None) -> str:
    """One line for the operator: what happened to which path, and what to do.

    The path is the error's own filename where the call knew it, else `where` (the
    repository). An errno without advice still gets one line: its path and strerror.
    """
    if isinstance(exc, NoSpace):
        return exc.message
    path = exc.filename or where or "the repository"
    advice = _ADVICE.get(exc.errno)
    if advice is None:
        return f"{path}: {exc.strerror or exc}"
    what, todo = advice
    return f"{what.format(path=path)}: {todo}"
