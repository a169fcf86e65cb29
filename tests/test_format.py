"""Repository format 3: checked pack records (codecs 2 and 3) beside legacy ones.

A repository of format 2 holds legacy records (codecs 0 and 1, checked by BLAKE3 only).
Opened by this rpfs it says format 3, its points read bit for bit through the mount, a
flipped byte in a legacy record is still EIO, new captures write checked records, and
`rpfs verify` hashes checked records too (reads trust their frame's checksum).
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest
import zstandard
from helpers import BS, assert_same_bytes, point_image, read_at
from test_corruption import NBLOCKS, block_digests, flip, make_source, pack_records

from rpfs import ingest
from rpfs.capture import capture
from rpfs.repo import Repository
from rpfs.store.format import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER,
    LEGACY_RAW,
    LEGACY_ZSTD,
    MAGIC,
    encode_chunk,
)


def legacy_encode(block: bytes, block_digest: bytes) -> bytes:
    """A record as repository formats 1-2 wrote it: zstd if that saved space, else raw."""
    payload = zstandard.ZstdCompressor(level=3).compress(block)
    codec = LEGACY_ZSTD
    if len(payload) >= len(block):
        payload, codec = block, LEGACY_RAW
    return HEADER.pack(MAGIC, codec, block_digest, len(payload)) + payload


def make_format2_repo(root: Path, src: Path, monkeypatch) -> None:
    """A repository as format 2 left it: point vm@old of `src` in legacy records."""
    with monkeypatch.context() as m:
        m.setattr(ingest, "encode_chunk", legacy_encode)
        with Repository(root) as repo:
            capture(repo, "vm", src, "old")
    config = root / "rpfs.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "format": 2}))


def codecs(root: Path) -> set[int]:
    return {codec for pack in (root / "packs").rglob("*.pack")
            for _, codec, _, _ in pack_records(pack)}


def test_format2_repository_reads_on_and_gets_checked_records(
        rpfs, repo, mount, tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    make_source(src)
    make_format2_repo(repo, src, monkeypatch)
    assert codecs(repo) == {LEGACY_RAW, LEGACY_ZSTD}
    newer = tmp_path / "newer.img"
    data = bytearray(src.read_bytes())
    rng = random.Random(3)
    for b in rng.sample(range(NBLOCKS), 40):  # new random and text blocks
        data[b * BS : (b + 1) * BS] = (rng.randbytes(BS) if b % 2 else
                                       (b"new text %d " % b * BS)[:BS])
    newer.write_bytes(data)
    rpfs.capture("vm", newer, "new")
    assert json.loads((repo / "rpfs.json").read_text())["format"] == 3, \
        "upgraded at its first open, before it wrote a record"
    assert codecs(repo) == {LEGACY_RAW, LEGACY_ZSTD, CODEC_RAW, CODEC_ZSTD}
    mnt, _ = mount()
    assert_same_bytes(point_image(mnt, "vm", "old"), src)
    assert_same_bytes(point_image(mnt, "vm", "new"), newer)
    res = rpfs("verify", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["sound"], res.stdout


def test_flipped_byte_in_legacy_record_is_eio(rpfs, repo, mount, tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    make_source(src)
    make_format2_repo(repo, src, monkeypatch)
    pack = next((repo / "packs").rglob("*.pack"))
    offset, _, dig, length = next(r for r in pack_records(pack) if r[1] == LEGACY_RAW)
    flip(pack, offset + HEADER.size + length // 2)
    bad = block_digests(src)[dig]
    img = point_image(mount()[0], "vm", "old")
    with open(img, "rb", buffering=0) as f, pytest.raises(OSError) as err:
        f.seek(bad * BS)
        f.read(BS)
    assert err.value.errno == errno.EIO
    good = (bad + 1) % NBLOCKS
    assert read_at(img, good * BS, BS) == read_at(src, good * BS, BS)


def test_verify_hashes_checked_records(rpfs, repo, tmp_path):
    """A sound frame of other content under a chunk's name passes the read path's check
    (its checksum is right) but not verify's BLAKE3."""
    src = tmp_path / "src.img"
    make_source(src)
    rpfs.capture("vm", src, "p1")
    pack = next((repo / "packs").rglob("*.pack"))
    offset, _codec, dig, length = next(r for r in pack_records(pack) if r[1] == CODEC_RAW)
    forged = encode_chunk(random.Random(8).randbytes(BS), dig)
    assert len(forged) == HEADER.size + length  # the same size: it fits in place
    with open(pack, "r+b") as f:
        f.seek(offset)
        f.write(forged)
    res = rpfs("verify", "--json")
    assert res.returncode != 0
    assert len(json.loads(res.stdout)["bad"]) == 1, res.stdout
