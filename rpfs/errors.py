"""Exceptions that cross module boundaries.

`RpfsError` carries a message meant for the operator: the CLI prints it as one line and
exits non-zero. `CorruptChunk` is raised by the chunk store when stored bytes fail their
hash check; the read path turns it into EIO after logging disk, point, block and pack.
"""


class RpfsError(Exception):
    """An error the user can act on; its message says what was wrong and what to do."""


class CorruptChunk(RpfsError):
    """Stored chunk bytes do not match their hash (or cannot be decoded)."""

    def __init__(self, pack: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt chunk in pack {pack} at offset {offset}: {reason}")
        self.pack = pack
        self.offset = offset
        self.reason = reason
