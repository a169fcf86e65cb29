"""LMDB's data file read without mapping it: is every page it uses really there?

LMDB maps `data.mdb` and trusts it: a page past the end of a truncated file is a SIGBUS
that kills the process with no message, and an empty file is taken for a new, empty
environment. So before the index is opened, `check()` reads the two meta pages with
pread and checks them as LMDB would (page flag, magic 0xBEEFC0DE, data version 1; the
one with the higher txnid wins) and that the file holds every page up to the winner's
`mm_last_pg`. A healthy file may end before that page when the last pages are free
(LMDB does not write a page a transaction allocated and freed again): then every page
missing at the end must be listed in the free-page database, which is walked here.

Layout (LMDB 0.9 mdb.c, 64-bit little-endian build, as py-lmdb bundles it):

    page     pgno u64 | pad u16 | flags u16 | lower u16 | upper u16 | ptrs u16[] (16 bytes)
    meta     at offset 16 of pages 0 and 1: magic u32 | version u32 | address u64 |
             mapsize u64 | MDB_db free | MDB_db main | last_pg u64 | txnid u64
    MDB_db   pad u32 (the free db's: page size) | flags u16 | depth u16 | branch u64 |
             leaf u64 | overflow u64 | entries u64 | root u64   (48 bytes)
    node     lo u16 | hi u16 | flags u16 | ksize u16 | key | data; a branch node's child
             is lo | hi << 16 | flags << 32, a leaf's data size lo | hi << 16, and with
             F_BIGDATA its data is the number of the overflow page that holds it
    free db  key txnid, data u64[] = [count, page, page, ...]
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_BRANCH, P_LEAF, P_META = 0x01, 0x02, 0x08
F_BIGDATA = 0x01
P_INVALID = (1 << 64) - 1
MIN_PAGE, MAX_PAGE = 512, 1 << 16
MAX_DEPTH = 32  # LMDB's cursor stack: no tree is deeper

_PAGE = struct.Struct("<QHHHH")
_META = struct.Struct("<II8xQ48s48sQQ")
_DB = struct.Struct("<IHHQQQQQ")
_NODE = struct.Struct("<HHHH")
_U64 = struct.Struct("<Q")


class DataFileError(Exception):
    """The data file cannot be used as it is; the message says why."""


@dataclass(frozen=True)
class Meta:
    """The meta page LMDB would use."""

    page_size: int
    last_page: int
    txnid: int
    free_root: int


def check(path: Path) -> Meta:
    """Check `path` (a data.mdb) before LMDB maps it; DataFileError says what is wrong.

    A writer may commit meanwhile (pages are written before the meta page that names
    them, so the size check is safe); the walk of the free list can see pages that a
    later commit reused, so a failed walk is retried while the txnid moves.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DataFileError(f"{path.name} is missing") from None
    try:
        if os.fstat(fd).st_size == 0:
            raise DataFileError(f"{path.name} is empty")
        for _ in range(3):
            meta = _newest_meta(fd)
            size = os.fstat(fd).st_size
            missing = range(size // meta.page_size, meta.last_page + 1)
            if not missing:
                return meta
            try:
                free = _free_pages(fd, meta, size)
            except DataFileError:
                free = set()
            if all(page in free for page in missing):
                return meta
            if _newest_meta(fd).txnid == meta.txnid:
                break
        need = (meta.last_page + 1) * meta.page_size
        raise DataFileError(
            f"{path.name} is {size} bytes but its pages reach {need} bytes (cut short, or "
            "its header is damaged)"
        )
    finally:
        os.close(fd)


def _newest_meta(fd: int) -> Meta:
    first = _read_meta(fd, 0)
    second = _read_meta(fd, first.page_size)
    return second if second.txnid > first.txnid else first


def _read_meta(fd: int, offset: int) -> Meta:
    page = os.pread(fd, _PAGE.size + _META.size, offset)
    which = "first" if offset == 0 else "second"
    if len(page) < _PAGE.size + _META.size:
        raise DataFileError(f"the {which} meta page is cut short")
    _, _, flags, _, _ = _PAGE.unpack_from(page)
    magic, version, _, free_raw, _, last_page, txnid = _META.unpack_from(page, _PAGE.size)
    if not flags & P_META or magic != MAGIC:
        raise DataFileError(f"the {which} meta page has no LMDB magic (not an LMDB file?)")
    if version != DATA_VERSION:
        raise DataFileError(f"the {which} meta page says data version {version}, not 1")
    page_size, _, _, _, _, _, _, free_root = _DB.unpack(free_raw)
    if page_size & (page_size - 1) or not MIN_PAGE <= page_size <= MAX_PAGE:
        raise DataFileError(f"the {which} meta page says page size {page_size}")
    if last_page < 1:
        raise DataFileError(f"the {which} meta page says last page {last_page}")
    return Meta(page_size, last_page, txnid, free_root)


def _free_pages(fd: int, meta: Meta, size: int) -> set[int]:
    """Every page number the free-page database lists (DataFileError if unreadable)."""
    free: set[int] = set()
    if meta.free_root == P_INVALID:
        return free
    psize = meta.page_size

    def page(pgno: int) -> bytes:
        if pgno > meta.last_page or (pgno + 1) * psize > size:
            raise DataFileError(f"free list page {pgno} is not in the file")
        return os.pread(fd, psize, pgno * psize)

    def walk(pgno: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DataFileError("free list is deeper than LMDB allows")
        data = page(pgno)
        number, _, flags, lower, _ = _PAGE.unpack_from(data)
        if number != pgno or not flags & (P_BRANCH | P_LEAF) or lower > psize:
            raise DataFileError(f"free list page {pgno} is not a tree page")
        for i in range((lower - _PAGE.size) // 2):
            (ptr,) = struct.unpack_from("<H", data, _PAGE.size + 2 * i)
            if ptr + _NODE.size > psize:
                raise DataFileError(f"free list page {pgno} has a node outside it")
            lo, hi, nflags, ksize = _NODE.unpack_from(data, ptr)
            if flags & P_BRANCH:
                walk(lo | hi << 16 | nflags << 32, depth + 1)
                continue
            start = ptr + _NODE.size + ksize
            length = lo | hi << 16
            if nflags & F_BIGDATA:
                (over,) = _U64.unpack_from(data, start)
                if over > meta.last_page or over * psize + _PAGE.size + length > size:
                    raise DataFileError(f"free list overflow page {over} is not in the file")
                value = os.pread(fd, length, over * psize + _PAGE.size)
            else:
                value = data[start : start + length]
            if len(value) < 8 or len(value) % 8:
                raise DataFileError(f"free list page {pgno} has a record of {len(value)} bytes")
            count = _U64.unpack_from(value)[0]
            if 8 * (count + 1) > len(value):
                raise DataFileError(f"free list page {pgno} has a record of {len(value)} bytes")
            free.update(struct.unpack_from(f"<{count}Q", value, 8))

    walk(meta.free_root, 0)
    return free
