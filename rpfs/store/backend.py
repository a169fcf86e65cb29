"""The seam between the chunk store and where pack bytes live: `PackBackend`.

PackStore and PackWriter (packs.py) know records, coalescing and rolling; a backend knows
only numbered packs of bytes: a ranged read (and a hint of the ranges read next), writing
a pack, delete, list. The POSIX directory (local.py) is one; an object store will be
another, which is why writing is either append-then-seal (`can_append`: a file takes
pwrite at any offset and an fdatasync) or one whole-object `put` (an object cannot be
appended to).

Reads fail in one of two ways, and the difference travels up to the operator:

- `PackUnavailable`: temporary. The backend could not answer now (EIO from a flaky disk,
  later an object store's 503 or a timeout). A retry may succeed; nothing is known to be
  wrong with the bytes, so nothing may be marked bad because of it.
- `PackMissing`: permanent. There is no such pack; no retry brings its chunks back.

Both are OSErrors (errno, strerror, the pack's path or key), so the operator's message
for an OS error still applies. Writes raise plain OSError (ENOSPC, EIO, ...): a failed
write is never retried in place (the writer discards and the next try starts on a fresh
pack), so writes need no such split. (restic's backends tell "not exist" and "permanent"
apart from what a retry layer may repeat; S3QL asks its backend `is_temp_failure`; here
the two are exception types, because every caller catches them in an `except`.)
"""

from __future__ import annotations

from typing import Protocol


class PackUnavailable(OSError):
    """A pack could not be read now; a retry may succeed (temporary)."""


class PackMissing(FileNotFoundError):
    """There is no such pack (permanent)."""


class PackAppender(Protocol):
    """One new pack being written in place (a backend with `can_append`)."""

    def write(self, data: bytes, offset: int) -> None:
        """Write all of `data` at `offset`; OSError naming the pack (ENOSPC if short)."""

    def flush(self) -> None:
        """Make every write so far durable: the index may refer to it after this."""

    def seal(self) -> None:
        """Flush and close: the pack is complete, nothing is appended to it again."""

    def close(self) -> None:
        """Close without flushing (the writer is discarding what it wrote)."""


class PackBackend(Protocol):
    """Numbered packs of bytes. Every method may be called from any thread."""

    location: str  # where the packs are, for messages (a directory, a bucket URL)
    can_append: bool  # writes go through `create` (else only through `put`)
    connections: int  # concurrent requests worth issuing to it
    remote: bool  # a read may wait on the network (never on the trio thread, then)

    def read(self, pack: int, offset: int, length: int) -> bytes:
        """Up to `length` bytes of `pack` from `offset` (fewer only at its end).
        PackMissing, PackUnavailable."""

    def advise(self, ranges: list[tuple[int, int, int]]) -> None:
        """Say that these (pack, offset, length) ranges are read next, so a backend that
        can start fetching them all at once does, and the reads that follow overlap
        (a hint: it never fails, and a backend may ignore it)."""

    def size(self, pack: int) -> int:
        """The pack's length in bytes. PackMissing, PackUnavailable."""

    def list(self) -> list[int]:
        """The numbers of the packs there, ascending. PackUnavailable."""

    def create(self, pack: int) -> PackAppender:
        """Start the new pack `pack`, its name durable before this returns (only with
        `can_append`); OSError if it exists or cannot be made."""

    def truncate(self, pack: int, length: int) -> None:
        """Cut `pack` back to `length` bytes (only with `can_append`): bytes appended
        after the index last named the pack's contents, which nothing may keep."""

    def put(self, pack: int, data: bytes) -> None:
        """Store the whole pack `pack` at once, durable before this returns."""

    def delete(self, pack: int) -> None:
        """Remove `pack` (nothing if it is not there). Reads of it fail with PackMissing
        from then on."""

    def close(self) -> None:
        """Release what the backend holds open."""
