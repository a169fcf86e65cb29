"""Unit tests of the index, the chunk store, names and changed-extent lists, calling the
library directly (no mount)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from rpfs.capture import capture
from rpfs.disks.point import open_point
from rpfs.errors import CorruptChunk, RpfsError
from rpfs.index import (
    MAX_GEN,
    ZERO,
    ChunkLoc,
    Index,
    LineageRecord,
    decode_extent_key,
    extent_key,
)
from rpfs.names import check_name, parse_point_ref, parse_size
from rpfs.repo import Repository
from rpfs.source import block_runs, load_changed
from rpfs.store.cache import ChunkCache
from rpfs.store.format import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER,
    LEGACY_RAW,
    LEGACY_ZSTD,
    MAGIC,
    decode_chunk,
    digest,
    encode_chunk,
)
from rpfs.store.local import LocalBackend
from rpfs.store.packs import PackStore

BS = 64 << 10


# -- extent keys and resolution ------------------------------------------------------------


def test_extent_key_orders_lineage_block_then_newest_gen_first():
    keys = [
        (lineage, block, gen)
        for lineage in (1, 2, 300)
        for block in (0, 1, 2, 1 << 40)
        for gen in (1, 2, 3, 1000, MAX_GEN - 1)
    ]
    rng = random.Random(7)
    shuffled = keys[:]
    rng.shuffle(shuffled)
    by_bytes = sorted(shuffled, key=lambda k: extent_key(*k))
    expected = sorted(keys, key=lambda k: (k[0], k[1], -k[2]))
    assert by_bytes == expected
    for k in keys:
        assert decode_extent_key(extent_key(*k)) == k
        assert len(extent_key(*k)) == 24


def _h(label: str) -> bytes:
    return digest(label.encode())


def test_lookup_is_one_seek_newest_at_or_before_gen(index: Index):
    writes = {  # (lineage, block): {gen: value}
        (1, 5): {1: _h("a1"), 3: _h("a3"), 7: _h("a7")},
        (1, 6): {2: _h("b2")},
        (2, 5): {1: _h("other-lineage")},
        (1, 4): {9: _h("earlier-block")},
    }
    with index.write() as txn:
        for (lineage, block), gens in writes.items():
            for gen, value in gens.items():
                index.put_extent(txn, lineage, block, gen, value)
    with index.read() as txn:
        assert index.lookup(txn, 1, 5, 0) is None  # before its first write
        assert index.lookup(txn, 1, 5, 1) == _h("a1")
        assert index.lookup(txn, 1, 5, 2) == _h("a1")
        assert index.lookup(txn, 1, 5, 3) == _h("a3")
        assert index.lookup(txn, 1, 5, 6) == _h("a3")
        assert index.lookup(txn, 1, 5, 7) == _h("a7")
        assert index.lookup(txn, 1, 5, MAX_GEN) == _h("a7")
        # The next key after (1, 6) belongs to another lineage / block: not a match.
        assert index.lookup(txn, 1, 6, 1) is None
        assert index.lookup(txn, 1, 6, 2) == _h("b2")
        assert index.lookup(txn, 1, 7, 100) is None  # past the last block of lineage 1
        assert index.lookup(txn, 2, 6, 100) is None
        assert index.lookup(txn, 3, 5, 100) is None  # past the end of the table
        assert index.lookup(txn, 1, 4, 8) is None  # only written at gen 9
        # iter_extents lists by block, newest generation first.
        assert list(index.iter_extents(txn, 1)) == [
            (4, 9, _h("earlier-block")),
            (5, 7, _h("a7")),
            (5, 3, _h("a3")),
            (5, 1, _h("a1")),
            (6, 2, _h("b2")),
        ]


def test_lookup_matches_brute_force_on_random_history(index: Index):
    rng = random.Random(11)
    history: dict[tuple[int, int], dict[int, bytes]] = {}
    with index.write() as txn:
        for _ in range(600):
            lineage, block, gen = rng.randint(1, 3), rng.randint(0, 40), rng.randint(1, 30)
            value = ZERO if rng.random() < 0.2 else _h(f"{lineage}/{block}/{gen}")
            index.put_extent(txn, lineage, block, gen, value)
            history.setdefault((lineage, block), {})[gen] = value
    with index.read() as txn:
        for lineage in range(1, 5):
            for block in range(0, 42):
                for gen in range(0, 32):
                    gens = history.get((lineage, block), {})
                    older = [g for g in gens if g <= gen]
                    expected = gens[max(older)] if older else None
                    assert index.lookup(txn, lineage, block, gen) == expected


def test_resolve_falls_through_origins_and_zero_masks(index: Index):
    with index.write() as txn:
        # lineage 1: the origin, generations 1..3
        index.put_extent(txn, 1, 0, 1, _h("o0g1"))
        index.put_extent(txn, 1, 0, 3, _h("o0g3"))  # after the clone: invisible to it
        index.put_extent(txn, 1, 1, 1, _h("o1g1"))
        index.put_extent(txn, 1, 2, 2, _h("o2g2"))
        index.put_lineage(txn, LineageRecord(1, head_gen=3))
        # lineage 2: cloned from lineage 1 at gen 2
        index.put_lineage(txn, LineageRecord(2, head_gen=2, parent=1, parent_gen=2))
        index.put_extent(txn, 2, 1, 1, _h("c1g1"))
        index.put_extent(txn, 2, 2, 2, ZERO)  # a written zero hides the origin's data
    with index.read() as txn:
        chain = index.chain(txn, 2, 2)
        assert chain == [(2, 2), (1, 2)]
        assert index.resolve(txn, chain, 0) == _h("o0g1")  # not o0g3: newer than the clone
        assert index.resolve(txn, chain, 1) == _h("c1g1")
        assert index.resolve(txn, chain, 2) == ZERO
        assert index.resolve(txn, chain, 3) == ZERO  # never written anywhere
        chain_g1 = index.chain(txn, 2, 1)
        assert index.resolve(txn, chain_g1, 2) == _h("o2g2")  # the zero came at gen 2
        assert index.resolve(txn, index.chain(txn, 1, 3), 0) == _h("o0g3")
        assert index.resolve(txn, index.chain(txn, 1, 2), 0) == _h("o0g1")


def test_counters_and_chunk_refcounts(index: Index):
    with index.write() as txn:
        assert [index.next_id(txn, "pack") for _ in range(3)] == [1, 2, 3]
        assert index.next_id(txn, "capture") == 1
        index.put_chunk(txn, _h("x"), ChunkLoc(4, 100, 50))
        index.incref(txn, _h("x"))
        index.incref(txn, _h("x"), 2)
        with pytest.raises(KeyError):
            index.incref(txn, _h("missing"))
    with index.read() as txn:
        assert index.get_chunk(txn, _h("x")) == ChunkLoc(4, 100, 50, 3)
        assert index.has_chunk(txn, _h("x"))
        assert not index.has_chunk(txn, _h("y"))


def test_staging_is_per_capture(index: Index):
    with index.write() as txn:
        index.put_capture(txn, 1, {"disk": "a"})
        index.put_capture(txn, 2, {"disk": "b"})
        for block in (3, 1, 2):
            index.stage(txn, 1, block, _h(f"1/{block}"))
        index.stage(txn, 2, 0, ZERO)
    with index.write() as txn:
        assert list(index.iter_staged(txn, 1)) == [(b, _h(f"1/{b}")) for b in (1, 2, 3)]
        index.drop_staged(txn, 1)
    with index.read() as txn:
        assert list(index.iter_staged(txn, 1)) == []
        assert list(index.iter_staged(txn, 2)) == [(0, ZERO)]
        assert [c for c, _ in index.list_captures(txn)] == [2]


# -- the chunk store -----------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def _blocks() -> list[bytes]:
    rng = random.Random(3)
    return [
        rng.randbytes(BS),  # incompressible: stored raw
        (b"compressible text " * 4000)[:BS],  # zstd
        bytes(BS - 1) + b"\1",  # nearly zero
        rng.randbytes(BS // 2) + bytes(BS // 2),
    ]


def test_chunk_round_trip_and_codecs(tmp_path: Path):
    packs = tmp_path / "packs"
    packs.mkdir()
    store = PackStore(LocalBackend(packs), BS)
    writer = store.writer(_Counter())
    blocks = _blocks()
    locs = []
    for block in blocks:
        record = encode_chunk(block, digest(block))
        magic, _codec, stored, length = HEADER.unpack_from(record)
        assert (magic, stored, length) == (MAGIC, digest(block), len(record) - HEADER.size)
        assert HEADER.size == 41
        locs.append(writer.append(record))
    writer.close()
    assert HEADER.unpack_from(encode_chunk(blocks[0], digest(blocks[0])))[1] == CODEC_RAW
    assert HEADER.unpack_from(encode_chunk(blocks[1], digest(blocks[1])))[1] == CODEC_ZSTD
    assert locs[1].length < BS // 10
    for block, loc in zip(blocks, locs, strict=True):
        assert store.get(loc, digest(block)) == block
    store.close()


@pytest.mark.parametrize("which", ["raw-payload", "zstd-payload", "header-digest", "magic"])
def test_chunk_corruption_is_detected(tmp_path: Path, which: str):
    packs = tmp_path / "packs"
    packs.mkdir()
    store = PackStore(LocalBackend(packs), BS)
    writer = store.writer(_Counter())
    blocks = _blocks()
    locs = [writer.append(encode_chunk(b, digest(b))) for b in blocks]
    writer.close()
    i = 1 if which == "zstd-payload" else 0
    loc = locs[i]
    pos = {
        "raw-payload": loc.offset + HEADER.size + 1000,
        "zstd-payload": loc.offset + HEADER.size + loc.length // 2 - HEADER.size // 2,
        "header-digest": loc.offset + 10,
        "magic": loc.offset,
    }[which]
    path = store.backend.path(loc.pack)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(CorruptChunk) as err:
        store.get(loc, digest(blocks[i]))
    assert err.value.pack == path.name
    assert err.value.offset == loc.offset
    assert isinstance(err.value, RpfsError)
    # The other records are untouched and still read back, alone or read together with
    # the bad one (one pread for adjacent records): only the bad one is an error.
    for j, (block, other) in enumerate(zip(blocks, locs, strict=True)):
        if j != i:
            assert store.get(other, digest(block)) == block
    together = store.get_many([(loc, digest(b)) for loc, b in zip(locs, blocks, strict=True)])
    assert isinstance(together[i], CorruptChunk) and together[i].offset == loc.offset
    assert [b for j, b in enumerate(together) if j != i] == blocks[:i] + blocks[i + 1 :]
    store.close()


def _stored(tmp_path: Path, blocks: list[bytes]) -> tuple[PackStore, list[ChunkLoc]]:
    """A store in tmp_path/packs holding `blocks`, written in order; their locations."""
    packs = tmp_path / "packs"
    packs.mkdir()
    store = PackStore(LocalBackend(packs), BS)
    writer = store.writer(_Counter())
    locs = [writer.append(encode_chunk(b, digest(b))) for b in blocks]
    writer.close()
    return store, locs


def test_get_many_reads_adjacent_records_with_one_pread(tmp_path: Path, monkeypatch):
    blocks = _blocks() * 2
    store, locs = _stored(tmp_path, blocks)
    preads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        preads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr("rpfs.store.local.os.pread", counting_pread)
    order = [5, 0, 7, 2, 1, 6, 3, 4]  # asked out of order, answered in the order asked
    wanted = [(locs[i], digest(blocks[i])) for i in order]
    assert store.get_many(wanted) == [blocks[i] for i in order]
    assert preads == [sum(loc.length for loc in locs)]
    preads.clear()
    monkeypatch.setattr("rpfs.store.packs.READ_SPAN", 2 * BS)  # a run stops at the span
    assert store.get_many(wanted) == [blocks[i] for i in order]
    assert len(preads) > 1 and max(preads) <= 2 * BS + 2 * HEADER.size
    store.close()


def test_get_many_asks_the_backend_ahead_for_every_run_it_then_reads(tmp_path: Path,
                                                                     monkeypatch):
    """Records in several runs: the backend is told all their spans before the first
    pread (LocalBackend: POSIX_FADV_WILLNEED), so their disk reads overlap."""
    blocks = _blocks() * 2
    store, locs = _stored(tmp_path, blocks)
    calls: list[tuple] = []
    real_pread, real_fadvise = os.pread, os.posix_fadvise
    monkeypatch.setattr("rpfs.store.local.os.pread", lambda fd, n, offset: (
        calls.append(("pread", offset, n)), real_pread(fd, n, offset))[1])
    monkeypatch.setattr("rpfs.store.local.os.posix_fadvise", lambda fd, offset, n, advice: (
        calls.append(("advise", offset, n, advice)), real_fadvise(fd, offset, n, advice))[1])
    wanted = [(locs[i], digest(blocks[i])) for i in (6, 1, 3)]  # three runs, out of order
    assert store.get_many(wanted) == [blocks[i] for i in (6, 1, 3)]
    spans = [(locs[i].offset, locs[i].length) for i in (1, 3, 6)]
    assert calls == [("advise", *span, os.POSIX_FADV_WILLNEED) for span in spans] + [
        ("pread", *span) for span in spans]
    calls.clear()
    assert store.get_many(wanted[:1]) == [blocks[6]]  # one run: nothing to overlap
    assert calls == [("pread", locs[6].offset, locs[6].length)]
    store.backend.advise([(99, 0, 4096)])  # a hint: a pack not there is the read's to report
    store.close()


def test_decode_chunk_rejects_mismatches():
    block = b"x" * BS
    record = encode_chunk(block, digest(block))
    where = ("00000001.pack", 0)
    assert decode_chunk(record, digest(block), BS, where) == block
    with pytest.raises(CorruptChunk, match="does not match the index"):
        decode_chunk(record, digest(b"other"), BS, where)  # asked for another chunk
    with pytest.raises(CorruptChunk, match="truncated"):
        decode_chunk(record[:20], digest(block), BS, where)
    with pytest.raises(CorruptChunk):
        decode_chunk(record[:-1], digest(block), BS, where)  # short payload
    bad_codec = record[:4] + b"\x07" + record[5:]
    with pytest.raises(CorruptChunk, match="codec"):
        decode_chunk(bad_codec, digest(block), BS, where)
    # A legacy record whose header hash matches a different block than its payload: a
    # legacy record has no other check, so its decode hashes the block.
    forged = HEADER.pack(MAGIC, LEGACY_RAW, digest(block), BS) + b"y" * BS
    with pytest.raises(CorruptChunk, match="BLAKE3"):
        decode_chunk(forged, digest(block), BS, where)
    # A checked record whose sound frame holds another block: the read path trusts the
    # frame's checksum; verify's full check hashes the block and finds it out.
    other = encode_chunk(b"y" * BS, digest(block))
    assert decode_chunk(other, digest(block), BS, where) == b"y" * BS
    with pytest.raises(CorruptChunk, match="BLAKE3"):
        decode_chunk(other, digest(block), BS, where, full=True)
    assert decode_chunk(record, digest(block), BS, where, full=True) == block
    # A frame whose checksum flag was flipped off would decode unchecked: refused.
    flag = HEADER.size + 4
    unflagged = record[:flag] + bytes([record[flag] & ~0x04]) + record[flag + 1 :]
    with pytest.raises(CorruptChunk, match="content checksum"):
        decode_chunk(unflagged, digest(block), BS, where)


def test_legacy_records_still_decode_and_are_hashed():
    """Records of repository formats 1-2 (codecs 0 and 1, no content checksum) read as
    before: decoded, then checked by their BLAKE3."""
    import zstandard

    where = ("00000001.pack", 0)
    text = b"legacy text " * (BS // 12) + b"x" * (BS % 12)
    noise = random.Random(5).randbytes(BS)
    legacy = {
        LEGACY_ZSTD: (text, zstandard.ZstdCompressor(level=3).compress(text)),
        LEGACY_RAW: (noise, noise),
    }
    for codec, (block, payload) in legacy.items():
        record = HEADER.pack(MAGIC, codec, digest(block), len(payload)) + payload
        assert decode_chunk(record, digest(block), BS, where) == block
        damaged = bytearray(record)
        damaged[HEADER.size + len(payload) // 2] ^= 0x01
        with pytest.raises(CorruptChunk):
            decode_chunk(bytes(damaged), digest(block), BS, where)
    # Raw records now hold their bytes in a checked frame: 14 bytes more per block.
    assert len(encode_chunk(noise, digest(noise))) - HEADER.size == BS + 14


def test_store_read_past_end_of_pack_is_corrupt(tmp_path: Path):
    packs = tmp_path / "packs"
    packs.mkdir()
    store = PackStore(LocalBackend(packs), BS)
    writer = store.writer(_Counter())
    block = os.urandom(BS)
    loc = writer.append(encode_chunk(block, digest(block)))
    writer.close()
    os.truncate(store.backend.path(loc.pack), loc.length - 10)
    with pytest.raises(CorruptChunk):
        store.get(loc, digest(block))
    store.close()


# -- names, sizes, references --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "web01", "A-b_c.d:e", "2024-01-01T00:00:00Z", "x" * 128, "0"]
)
def test_valid_names(name: str):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/abs",
        ".hidden",
        "-rf",
        "_x",
        "a b",
        "a\0b",
        "x" * 129,
        "é",
        "a\n",
        "a@b",
    ],
)
def test_invalid_names(name: str):
    with pytest.raises(RpfsError, match="invalid"):
        check_name(name, "disk name")


def test_point_refs_and_sizes():
    assert parse_point_ref("web01@monday") == ("web01", "monday")
    for bad in ("web01", "@x", "x@", "../x@y", "x@../y", "a/b@c"):
        with pytest.raises(RpfsError):
            parse_point_ref(bad)
    assert parse_size("64K") == 64 << 10
    assert parse_size("4M") == 4 << 20
    assert parse_size("1048576") == 1 << 20
    assert parse_size("2GiB") == 2 << 30
    for bad in ("", "abc", "-1", "1.5M", "64Q"):
        with pytest.raises(RpfsError):
            parse_size(bad)


# -- changed-extent lists ------------------------------------------------------------------


def _changed(tmp_path: Path, content) -> Path:
    path = tmp_path / "changed.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_changed_accepts_lists_and_vmware_shape(tmp_path: Path):
    size = 10 * BS
    extents = [
        {"start": 0, "length": 100},
        {"start": 5 * BS, "length": BS},
        {"start": 9, "length": 0},
    ]
    assert load_changed(_changed(tmp_path, extents), size) == [(0, 100), (5 * BS, BS)]
    vmware = {"startOffset": 0, "length": size, "changedArea": extents[:2]}
    assert load_changed(_changed(tmp_path, vmware), size) == [(0, 100), (5 * BS, BS)]
    assert load_changed(_changed(tmp_path, [{"start": size - 1, "length": 1}]), size) == [
        (size - 1, 1)
    ]


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        "{",
        {"start": 0, "length": 1},
        [{"start": 0}],
        [{"start": -1, "length": 10}],
        [{"start": 0, "length": -10}],
        [{"start": "0", "length": 10}],
        [{"start": 0.5, "length": 10}],
        [{"start": 10 * BS - 1, "length": 2}],  # past the end
        [{"start": 20 * BS, "length": 0}],
        [[0, 10]],
    ],
)
def test_load_changed_rejects_bad_lists(tmp_path: Path, content):
    with pytest.raises(RpfsError, match="changed-extent list"):
        load_changed(_changed(tmp_path, content), 10 * BS)


def test_load_changed_missing_file(tmp_path: Path):
    with pytest.raises(RpfsError, match="cannot read"):
        load_changed(tmp_path / "nope.json", BS)


def test_block_runs_cover_and_merge():
    assert block_runs([], BS, 10) == []
    assert block_runs([(0, 1)], BS, 10) == [(0, 1)]
    assert block_runs([(BS - 1, 2)], BS, 10) == [(0, 2)]
    assert block_runs([(3 * BS, BS), (0, BS), (BS, 10)], BS, 10) == [(0, 2), (3, 4)]
    assert block_runs([(0, 10 * BS)], BS, 10) == [(0, 10)]
    assert block_runs([(2 * BS, 5 * BS), (3 * BS, BS)], BS, 10) == [(2, 7)]


@pytest.mark.parametrize(
    "content", [[{"start": True, "length": 1}], [{"start": 0, "length": True}]], ids=str
)
def test_load_changed_rejects_booleans(tmp_path: Path, content):
    with pytest.raises(RpfsError, match="changed-extent list"):
        load_changed(_changed(tmp_path, content), 10 * BS)


# -- the chunk cache -----------------------------------------------------------------------


def test_chunk_cache_loads_once_and_reports_each_bad_chunk(tmp_path: Path):
    repo = Repository.init(tmp_path / "repo", BS)
    src = tmp_path / "src.img"
    blocks = _blocks()
    src.write_bytes(b"".join(blocks))
    capture(repo, "vm", src, "p1")
    cache = ChunkCache(repo)
    try:
        digests = [digest(b) for b in blocks]
        unknown = digest(b"no such block")
        with repo.index.read() as txn:
            got = cache.get_many(txn, [digests[0], unknown, digests[1], digests[0]])
        assert got[0] == got[3] == blocks[0] and got[2] == blocks[1]
        assert isinstance(got[1], CorruptChunk) and "not in the index" in str(got[1])
        assert cache.peek(digests[1]) == blocks[1] and cache.peek(unknown) is None
        # A chunk whose record went bad is reported for that chunk only, and not cached.
        with repo.index.read() as txn:
            loc = repo.index.get_chunk(txn, digests[3])
        assert loc.length > HEADER.size + 200
        with open(repo.store.backend.path(loc.pack), "r+b") as f:
            f.seek(loc.offset + HEADER.size + 100)
            f.write(b"\xff" * 8)
        with repo.index.read() as txn:
            got = cache.get_many(txn, [digests[3], digests[2]])  # adjacent: one pread
            assert isinstance(got[0], CorruptChunk) and got[1] == blocks[2]
            with pytest.raises(CorruptChunk):
                cache.get(txn, digests[3])
        assert cache.peek(digests[3]) is None
    finally:
        cache.close()
        repo.close()


def test_read_many_reads_what_read_reads_and_a_bad_chunk_fails_its_ranges_alone(
    tmp_path: Path, caplog
):
    """A point's read_many (the reader thread's batch) gives each range the bytes `read`
    gives; a corrupt chunk fails the ranges that read it, logged with disk, point and
    block and marked for verify, and no other range."""
    repo = Repository.init(tmp_path / "repo", BS)
    src = tmp_path / "src.img"
    blocks = _blocks()
    data = b"".join(blocks[:2]) + bytes(BS) + b"".join(blocks[2:])  # block 2 is zeros
    src.write_bytes(data)
    capture(repo, "vm", src, "p1")
    cache = ChunkCache(repo)
    try:
        image = open_point(repo, cache, "vm", "p1")
        ranges = [(0, 4096), (BS - 100, 200), (2 * BS + 10, 4096), (3 * BS, 2 * BS),
                  (len(data) - 10, 4096), (len(data), 4096), (5, 0), (BS, 4096)]
        assert image.read_many(ranges) == [data[o : o + n] for o, n in ranges]
        with repo.index.read() as txn:
            loc = repo.index.get_chunk(txn, digest(blocks[3]))  # image block 4
        with open(repo.store.backend.path(loc.pack), "r+b") as f:
            f.seek(loc.offset + HEADER.size + 100)
            f.write(b"\xff" * 8)
        image = open_point(repo, ChunkCache(repo), "vm", "p1")  # nothing decoded yet
        got = image.read_many([(4 * BS + 8192, 4096), (0, 4096), (3 * BS, 2 * BS),
                               (4 * BS, 10)])
        assert isinstance(got[0], CorruptChunk) and got[0].offset == loc.offset
        assert got[1] == data[:4096]
        assert isinstance(got[2], CorruptChunk) and isinstance(got[3], CorruptChunk)
        assert "disk vm point p1 block 4: " in caplog.text
        image.cache.close()  # waits for the marker thread
        with repo.index.read() as txn:
            assert digest(blocks[3]) in repo.index.suspects(txn)
    finally:
        cache.close()
        repo.close()


def test_a_failed_prefetch_is_logged_and_reads_still_work(tmp_path: Path, caplog, monkeypatch):
    repo = Repository.init(tmp_path / "repo", BS)
    src = tmp_path / "src.img"
    blocks = _blocks()
    src.write_bytes(b"".join(blocks))
    point = capture(repo, "vm", src, "p1")
    cache = ChunkCache(repo)
    try:
        with repo.index.read() as txn:
            chain = repo.index.chain(txn, point.lineage, point.gen)

        def broken(*args):
            raise RpfsError("index unreadable")

        with monkeypatch.context() as m:
            m.setattr(repo.index, "resolve", broken)
            cache._prefetch(chain, [0, 1, 2])  # what a pool thread runs
        assert "lineage 1 blocks 0-2: prefetch failed (index unreadable)" in caplog.text
        with repo.index.read() as txn:
            assert cache.get(txn, digest(blocks[1])) == blocks[1]
    finally:
        cache.close()
        repo.close()
