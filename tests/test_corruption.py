"""A flipped byte in a pack file: the damaged region reads as EIO through the mount (never
as wrong bytes), everything else still reads correctly, and the daemon's log names the
disk, point, block and pack."""

from __future__ import annotations

import errno
import mmap
import os
import random
import re
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import BS, MiB, assert_same_bytes, point_image, read_at

from rpfs.store.format import CODEC_RAW, CODEC_ZSTD, HEADER, digest

NBLOCKS = 256  # 16 MiB


def make_source(path: Path) -> None:
    """Random blocks (stored raw) and text blocks (stored zstd), each block unique."""
    rng = random.Random(21)
    with open(path, "wb") as f:
        for b in range(NBLOCKS):
            if b % 4 == 1:
                line = f"block {b} of the source: some compressible text {rng.random()}\n"
                f.write((line.encode() * (BS // len(line) + 1))[:BS])
            else:
                f.write(rng.randbytes(BS))


def pack_records(path: Path):
    """(offset, codec, digest, payload length) of every record in a pack file."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        magic, codec, dig, length = HEADER.unpack_from(data, pos)
        assert magic == b"RPC1", f"no record at {path.name}:{pos}"
        yield pos, codec, dig, length
        pos += HEADER.size + length


def direct_read(path: Path, offset: int, length: int) -> bytes:
    """One O_DIRECT read: the kernel sends it to the daemon as it is, never cached."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))


def block_digests(src: Path) -> dict[bytes, int]:
    data = src.read_bytes()
    return {digest(data[b * BS : (b + 1) * BS]): b for b in range(NBLOCKS)}


def test_flipped_bytes_read_as_eio_and_are_logged(rpfs, mounted, tmp_path):
    src = tmp_path / "src.img"
    make_source(src)
    rpfs.capture("vm", src, "p1")
    packs = sorted((rpfs.repo / "packs").glob("*.pack"))
    assert len(packs) == 1
    pack = packs[0]
    blocks = block_digests(src)
    records = list(pack_records(pack))
    assert len(records) == NBLOCKS
    raw = [r for r in records if r[1] == CODEC_RAW]
    zstd = [r for r in records if r[1] == CODEC_ZSTD]
    assert raw and zstd
    # Three damaged records, each a different way: a byte in a raw payload, in a zstd
    # payload, and in a record header's BLAKE3 field.
    damaged = {}
    for kind, (offset, _codec, dig, length) in {
        "raw-payload": raw[len(raw) // 2],
        "zstd-payload": zstd[len(zstd) // 2],
        "record-header": raw[len(raw) // 4],
    }.items():
        pos = offset + 5 + 7 if kind == "record-header" else offset + HEADER.size + length // 2
        flip(pack, pos)
        damaged[blocks[dig]] = kind
    assert len(damaged) == 3

    img = point_image(mounted, "vm", "p1")
    for bad_block in damaged:
        # Python: the read of the damaged block raises EIO.
        with open(img, "rb", buffering=0) as f, pytest.raises(OSError) as err:
            f.seek(bad_block * BS)
            f.read(BS)
        assert err.value.errno == errno.EIO, damaged[bad_block]
        # A lone 4 KiB O_DIRECT read (answered on the daemon's trio thread) fails alike,
        # and one of the next block reads right.
        with pytest.raises(OSError) as err:
            direct_read(img, bad_block * BS + 8192, 4096)
        assert err.value.errno == errno.EIO, damaged[bad_block]
        if bad_block + 1 not in damaged:
            assert direct_read(img, (bad_block + 1) * BS, 4096) == read_at(
                src, (bad_block + 1) * BS, 4096
            )
        # dd over the damaged block fails too, and again on a second try (nothing cached).
        for _ in range(2):
            res = subprocess.run(
                ["dd", f"if={img}", "of=/dev/null", f"bs={BS}", f"skip={bad_block}", "count=1"],
                capture_output=True,
                text=True,
            )
            assert res.returncode != 0
            assert "Input/output error" in res.stderr
    # Every other block still reads correctly, including the neighbours.
    for b in range(NBLOCKS):
        if b not in damaged:
            assert read_at(img, b * BS, BS) == read_at(src, b * BS, BS), f"block {b}"
    # Reading the whole image fails; it never returns wrong bytes.
    res = subprocess.run(["cmp", str(img), str(src)], capture_output=True, text=True)
    assert res.returncode == 2 and "Input/output error" in res.stderr, res
    # The log names disk, point, block and pack, for each damaged block.
    log = (rpfs.repo / "rpfs.log").read_text()
    for bad_block, kind in damaged.items():
        line = re.search(rf"disk vm point p1 block {bad_block}\b.*", log)
        assert line, f"{kind}: no log line for block {bad_block}:\n{log}"
        assert pack.name in line.group(0)
    # The daemon survived: the mount still serves.
    assert read_at(img, 0, 100) == read_at(src, 0, 100)
    # `rpfs restore` refuses too, with a clear error naming the pack.
    res = rpfs("restore", "vm@p1", tmp_path / "restored.img")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("rpfs: error: corrupt chunk")
    assert pack.name in res.stderr


def test_corrupt_chunk_shared_by_two_points_fails_both(rpfs, mounted, tmp_path):
    src = tmp_path / "src.img"
    make_source(src)
    rpfs.capture("vm", src, "p1")
    rpfs.capture("vm", src, "p2")  # unchanged: shares every chunk
    copy = tmp_path / "copy.img"
    copy.write_bytes(src.read_bytes())
    rpfs.capture("other", copy, "p1")  # another disk, deduplicated onto the same chunks
    pack = next((rpfs.repo / "packs").glob("*.pack"))
    offset, _, dig, _length = next(r for r in pack_records(pack) if r[1] == CODEC_RAW)
    bad_block = block_digests(src)[dig]
    flip(pack, offset + HEADER.size + 17)
    for disk, point in (("vm", "p1"), ("vm", "p2"), ("other", "p1")):
        img = point_image(mounted, disk, point)
        with open(img, "rb", buffering=0) as f, pytest.raises(OSError) as err:
            f.seek(bad_block * BS)
            f.read(BS)
        assert err.value.errno == errno.EIO
        good = (bad_block + 1) % NBLOCKS
        assert read_at(img, good * BS, BS) == read_at(src, good * BS, BS)
    # A fresh, undamaged disk is unaffected.
    fresh = tmp_path / "fresh.img"
    fresh.write_bytes(random.Random(99).randbytes(2 * MiB))
    rpfs.capture("fresh", fresh, "p")
    assert_same_bytes(point_image(mounted, "fresh", "p"), fresh)


def test_reads_at_depth_each_get_their_bytes_or_eio(rpfs, mounted, tmp_path):
    """4 KiB O_DIRECT reads from 8 threads at once, as a VM's at queue depth 8: the
    daemon serves such reads together, in batches (rpfs/serve/readqueue.py), and each
    read still gets its own block's bytes, or EIO for a damaged block, in any mix."""
    src = tmp_path / "src.img"
    make_source(src)
    rpfs.capture("vm", src, "p1")
    pack = next((rpfs.repo / "packs").glob("*.pack"))
    blocks = block_digests(src)
    records = list(pack_records(pack))
    damaged = set()
    for codec in (CODEC_RAW, CODEC_ZSTD):
        offset, _, dig, length = [r for r in records if r[1] == codec][3]
        flip(pack, offset + HEADER.size + length // 3)
        damaged.add(blocks[dig])
    img = point_image(mounted, "vm", "p1")
    source = src.read_bytes()
    wrong: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            offset = rng.randrange(len(source) // 4096) * 4096
            try:
                data = direct_read(img, offset, 4096)
            except OSError as exc:
                if offset // BS not in damaged or exc.errno != errno.EIO:
                    wrong.append(f"{offset}: {exc}")
                continue
            if offset // BS in damaged or data != source[offset : offset + 4096]:
                wrong.append(f"{offset}: {len(data)} bytes, not the source's")

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong, wrong[:5]
    for bad in damaged:  # and each damaged block still fails alone
        with pytest.raises(OSError) as err:
            direct_read(img, bad * BS, 4096)
        assert err.value.errno == errno.EIO
