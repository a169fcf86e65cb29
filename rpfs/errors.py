"""Exceptions that cross module boundaries, and what to tell the operator about OS errors.

`RpfsError` carries a message meant for the operator: the CLI prints it as one line and
exits non-zero. A chunk that cannot be read back is one of two `ChunkError`s, told apart
all the way up: `CorruptChunk`, the stored bytes are bad (they fail their hash check, or
their pack is gone), and `ChunkUnavailable`, they could not be read now (an I/O error; a
retry may succeed). The read path turns either into EIO after logging disk, point, block
and pack; only a corrupt chunk is marked for verify.
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


class ChunkError(RpfsError):
    """A chunk record could not be read back (one of the two kinds below)."""

    def __init__(self, message: str, pack: str, offset: int, reason: str) -> None:
        super().__init__(message)
        self.pack = pack
        self.offset = offset
        self.reason = reason


class CorruptChunk(ChunkError):
    """The bytes are bad: stored chunk bytes do not match their hash, cannot be decoded,
    or their pack is missing. Permanent: reading again returns the same bad bytes."""

    def __init__(self, pack: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt chunk in pack {pack} at offset {offset}: {reason}",
                         pack, offset, reason)


class ChunkUnavailable(ChunkError):
    """The bytes could not be read now (the storage answered with an error, not with bad
    bytes): nothing is known to be wrong with them, and a retry may succeed."""

    def __init__(self, pack: str, offset: int, reason: str) -> None:
        super().__init__(f"cannot read pack {pack} at offset {offset} now: {reason} (the "
                         "bytes are not known to be bad; a retry may succeed)",
                         pack, offset, reason)


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
    repository). An errno without advice still gets one line: its path and strerror. An
    error class with an `advice` of its own says that instead of its errno's (an object
    store that does not answer is EIO, but no device to check in dmesg).
    """
    if isinstance(exc, NoSpace):
        return exc.message
    path = exc.filename or where or "the repository"
    own = getattr(exc, "advice", None)  # an error that knows better than its errno
    if own:
        return f"{path}: {exc.strerror}: {own}"
    advice = _ADVICE.get(exc.errno)
    if advice is None:
        return f"{path}: {exc.strerror or exc}"
    what, todo = advice
    return f"{what.format(path=path)}: {todo}"
