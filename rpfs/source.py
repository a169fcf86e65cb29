"""Capture sources: raw image files and block devices, their allocated ranges, and
changed-extent lists (the JSON that VMware's QueryChangedDiskAreas returns); NBD
exports are nbd/client.py's NbdSource, with the same face."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import RpfsError
from .names import ceil_div
from .nbd.client import NbdSource, is_nbd_uri

BLKGETSIZE64 = 0x80081272

Extent = tuple[int, int]  # (start, length) in bytes


@dataclass
class Source:
    path: Path
    fd: int
    size: int
    is_file: bool

    @classmethod
    def open(cls, path: Path) -> Source:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RpfsError(f"cannot open source {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return cls(path, fd, st.st_size, True)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return cls(path, fd, struct.unpack("Q", buf)[0], False)
        os.close(fd)
        raise RpfsError(f"source {path} is neither a regular file nor a block device")

    def close(self) -> None:
        os.close(self.fd)

    def data_extents(self) -> list[Extent]:
        """Byte ranges that may hold data; holes of sparse files are left out."""
        if not self.is_file:
            return [(0, self.size)] if self.size else []
        out: list[Extent] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                return [(0, self.size)]  # filesystem without SEEK_DATA: read it all
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            out.append((start, min(end, self.size) - start))
            pos = end
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes (zero-padded past the end of the source)."""
        parts = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(self.fd, length - done, offset + done)
            except OSError as exc:
                raise RpfsError(
                    f"read error on source {self.path} at offset {offset + done}: "
                    f"{exc.strerror}; no point was created"
                ) from None
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        data = b"".join(parts)
        return data + bytes(length - len(data)) if len(data) < length else data


def open_source(source: str | Path, bitmap: str | None = None) -> Source | NbdSource:
    """The source a capture reads: an NBD URI (with `bitmap`, its dirty bitmap of that
    name), else a file or block device path."""
    text = str(source)
    if is_nbd_uri(text):
        return NbdSource(text, bitmap)
    if bitmap is not None:
        raise RpfsError(f"--bitmap needs an NBD source (nbd://... or nbd+unix://...); "
                        f"{text} is a path, which has no dirty bitmap")
    return Source.open(Path(text))


def load_changed(path: Path, disk_size: int) -> list[Extent]:
    """Parse a changed-extent list: a JSON array of {"start": bytes, "length": bytes}."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise RpfsError(f"cannot read changed-extent list {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise RpfsError(f"changed-extent list {path} is not valid JSON: {exc}") from None
    if isinstance(raw, dict) and "changedArea" in raw:  # VMware's DiskChangeInfo shape
        raw = raw["changedArea"]
    if not isinstance(raw, list):
        raise RpfsError(f"changed-extent list {path}: expected a JSON array of extents")
    out: list[Extent] = []
    for i, item in enumerate(raw):
        start = item.get("start") if isinstance(item, dict) else None
        length = item.get("length") if isinstance(item, dict) else None
        if not all(type(v) is int for v in (start, length)) or start < 0 or length < 0:
            raise RpfsError(
                f"changed-extent list {path}: item {i} must be "
                '{"start": bytes >= 0, "length": bytes >= 0}'
            )
        if start + length > disk_size:
            raise RpfsError(
                f"changed-extent list {path}: item {i} ends at {start + length}, "
                f"past the disk's size {disk_size}"
            )
        if length:
            out.append((start, length))
    return out


def block_runs(extents: list[Extent], block_size: int, nblocks: int) -> list[tuple[int, int]]:
    """Cover byte extents with whole blocks: sorted, merged (first block, end block) runs."""
    runs = sorted(
        (start // block_size, min(nblocks, ceil_div(start + length, block_size)))
        for start, length in extents
        if length
    )
    merged: list[tuple[int, int]] = []
    for first, end in runs:
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((first, end))
    return merged

