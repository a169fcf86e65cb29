"""GC on an S3 store (issue 13), against a real S3 server on loopback (SeaweedFS).

Compaction uploads its new packs before it points chunks at them; a retired pack's
object leaves the bucket only after the reader grace and a checkpoint pushed since. Each
test reads the remaining points back exact through the mount from an emptied cache (so
from the new objects), checks the bucket with an independent client (boto3), and runs
`rpfs check`.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import Mounter, Rpfs
from helpers import MiB, armed, assert_check_clean, assert_same_bytes, churn, point_image
from s3helpers import bucket_packs, stored_packs

from rpfs.lifecycle.clock import iso
from rpfs.maintenance import gc as gc_module
from rpfs.repo import Repository
from rpfs.store.format import pack_name
from rpfs.upload import Uploader


def set_grace(repo: Path, seconds: float) -> None:
    """The store's reader grace in rpfs.json (a config field: no command sets it)."""
    path = repo / "rpfs.json"
    config = json.loads(path.read_text())
    config["store"]["grace_seconds"] = seconds
    path.write_text(json.dumps(config))


def history(rpfs, tmp_path: Path) -> dict[str, Path]:
    """Points p1..p4 of one disk, each sharing most of its data with the one before, all
    uploaded; p1 and p3 deleted and purged (their own data is dead in every pack). The
    images of p2 and p4 to compare with."""
    source = tmp_path / "vm.img"
    rng = random.Random(1313)
    with open(source, "wb") as f:
        f.write(rng.randbytes(24 * MiB))
    kept = {}
    for i in range(1, 5):
        rpfs.capture("vm", source, f"p{i}")
        if i in (2, 4):
            kept[f"p{i}"] = shutil.copyfile(source, tmp_path / f"p{i}.want")
        churn(source, rng, pieces=2)
    synced = json.loads(rpfs("store", "sync", "--wait", "--json", check=True, timeout=120).stdout)
    assert synced["pending_packs"] == 0 and synced["error"] is None, synced
    rpfs("point", "delete", "vm@p1", "vm@p3", "--purge", check=True)
    return kept


def gc(rpfs, *extra: str) -> dict:
    return json.loads(rpfs("gc", "--threshold", "1", "--json", *extra, check=True,
                           timeout=300).stdout)


def assert_exact_from_the_store(rpfs, repo: Path, mount, kept: dict[str, Path]) -> None:
    """Every kept point reads exact through the mount, its cache emptied first."""
    shutil.rmtree(repo / "cache")
    mnt, _ = mount()
    try:
        for name, want in kept.items():
            assert_same_bytes(point_image(mnt, "vm", name), want)
    finally:
        rpfs("umount", mnt, check=True, timeout=60)


def assert_recovers_exact(rpfs, s3_server, tmp_path: Path, kept: dict[str, Path]) -> None:
    """`init --from-store` in a fresh folder takes the newest checkpoint in the bucket:
    it names no deleted pack (check clean) and the kept points read exact."""
    other = Rpfs(tmp_path / "recovered", dict(rpfs.env))
    other("init", "--from-store", f"s3://{s3_server.bucket}/repo", "--s3-endpoint",
          s3_server.endpoint, "--cache-size", "64M", check=True, timeout=120)
    assert_check_clean(other)
    with Mounter(other, tmp_path / "recovered-mnt") as mount:
        mnt, _ = mount()
        for name, want in kept.items():
            assert_same_bytes(point_image(mnt, "vm", name), want)
        other("umount", mnt, check=True, timeout=60)


def assert_index_matches_the_bucket(rpfs, repo: Path, s3_server, retired: int = 0) -> dict:
    """Every pack in the bucket is recorded as stored, but `retired` packs waiting for
    their grace; `rpfs info` counts the bucket's bytes; check is clean. info's figures."""
    bucket, stored = bucket_packs(s3_server), stored_packs(repo)
    assert stored.items() <= bucket.items(), "every stored pack is in the bucket"
    assert len(bucket) - len(stored) == retired, (sorted(bucket), sorted(stored))
    figures = json.loads(rpfs("info", "--json", check=True).stdout)
    assert (figures["store_packs"], figures["store_bytes"]) == (len(bucket),
                                                                sum(bucket.values()))
    assert figures["store_retired_packs"] == retired and figures["pending_packs"] == 0
    assert_check_clean(rpfs)
    return figures


def test_gc_compacts_on_the_store_and_deletes_the_old_objects(
        rpfs, s3_repo, s3_server, mount, tmp_path):
    repo = s3_repo
    set_grace(repo, 0)
    kept = history(rpfs, tmp_path)
    before = bucket_packs(s3_server)
    done = gc(rpfs)
    assert_recovers_exact(rpfs, s3_server, tmp_path, kept)  # before a daemon pushes one
    assert done["stopped"] is None and done["packs_compacted"] == len(before), done
    assert done["objects_deleted"] == len(before) and done["objects_waiting"] == 0
    after = bucket_packs(s3_server)
    assert not after.keys() & before.keys(), "the compacted packs' objects are gone"
    assert after and after == stored_packs(repo), "the new packs are in the store, stored"
    live = json.loads(rpfs("info", "--json", check=True).stdout)["stored_bytes"]
    assert sum(after.values()) <= 1.05 * live < sum(before.values())
    assert_index_matches_the_bucket(rpfs, repo, s3_server)
    assert_exact_from_the_store(rpfs, repo, mount, kept)
    text = rpfs("info", check=True).stdout
    assert "in the store:" in text and "pending upload:" in text


def test_old_objects_stay_for_the_grace_and_a_later_gc_deletes_them(
        rpfs, s3_repo, s3_server, mount, tmp_path):
    repo = s3_repo  # the default grace: 10 minutes
    kept = history(rpfs, tmp_path)
    before = bucket_packs(s3_server)
    done = gc(rpfs)
    assert done["stopped"] is None and done["objects_deleted"] == 0, done
    assert done["objects_waiting"] == len(before)
    assert before.items() <= bucket_packs(s3_server).items(), "still there for readers"
    assert not (repo / "cache" / "packs").exists() or not any(
        p.name in {k.split("/")[1] for k in before} for p in (repo / "cache" / "packs").iterdir()
    ), "their local copies went at once"
    assert_index_matches_the_bucket(rpfs, repo, s3_server, retired=len(before))
    assert_exact_from_the_store(rpfs, repo, mount, kept)
    early = gc(rpfs, "--threshold", "0.8")
    assert (early["packs_deleted"], early["objects_deleted"], early["objects_waiting"]) == (
        0, 0, len(before)), "a waiting object is not retired again"
    assert before.keys() <= bucket_packs(s3_server).keys()
    said = rpfs("gc", check=True, timeout=300).stdout
    assert f"0 objects of retired packs deleted, {len(before)} wait for the reader grace" in said
    rpfs.env["RPFS_NOW"] = iso(time.time() + 601)  # past the grace
    try:
        late = gc(rpfs, "--threshold", "0.8")
    finally:
        del rpfs.env["RPFS_NOW"]
    assert (late["objects_deleted"], late["objects_waiting"]) == (len(before), 0), late
    assert not bucket_packs(s3_server).keys() & before.keys()
    assert_index_matches_the_bucket(rpfs, repo, s3_server)
    assert_exact_from_the_store(rpfs, repo, mount, kept)


@pytest.mark.parametrize("hook", ["kill_after_gc_note", "kill_at_gc_move",
                                  "kill_after_pack_deletes"])
def test_a_gc_killed_between_upload_and_object_delete_resumes(
        rpfs, s3_repo, s3_server, mount, tmp_path, hook):
    """SIGKILLed after its copies are uploaded and noted (before any chunk moves), in a
    move, or just after the first old object is deleted (before the index says so): the
    next gc finishes, and nothing is left behind in the bucket."""
    repo = s3_repo
    set_grace(repo, 0)
    kept = history(rpfs, tmp_path)
    before = bucket_packs(s3_server)
    with armed(rpfs, **{hook: 1 if hook != "kill_at_gc_move" else 40}):
        killed = rpfs("gc", "--threshold", "1", "--json", timeout=300)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert_check_clean(rpfs)
    done = gc(rpfs)
    assert_recovers_exact(rpfs, s3_server, tmp_path, kept)
    assert done["stopped"] is None, done
    after = bucket_packs(s3_server)
    assert not after.keys() & before.keys() and after == stored_packs(repo)
    assert_index_matches_the_bucket(rpfs, repo, s3_server)
    assert_exact_from_the_store(rpfs, repo, mount, kept)


def test_a_pack_gc_deletes_during_its_upload_is_neither_stored_nor_left_in_the_bucket(
        rpfs, s3_repo, s3_server, tmp_path, monkeypatch):
    """The uploader PUTs a pack; before it records "stored", a gc retires and deletes
    that pack (its point was purged): the uploader deletes the object it put and records
    nothing, so the bucket and the index agree and check is clean."""
    repo = s3_repo
    set_grace(repo, 0)
    source = tmp_path / "vm.img"
    for name, seed in (("p1", 7), ("p2", 8)):  # nothing in common
        source.write_bytes(random.Random(seed).randbytes(8 * MiB))
        rpfs.capture("vm", source, name)
    rpfs("point", "delete", "vm@p1", "--purge", check=True)  # its pack names nothing now
    for name, value in s3_server.env().items():  # this process is the uploader
        monkeypatch.setenv(name, value)
    with Repository(repo) as opened:
        pack = min(opened.store.backend.pending.list())  # p1's
        tiered = opened.store.backend
        put = tiered.upload

        def put_then_gc(p: int) -> int:
            size = put(p)
            tiered.upload = put  # gc's own uploads go as usual
            assert f"packs/{pack_name(p)}" in bucket_packs(s3_server)
            done = gc_module.run(opened)  # p2's pack is all live: left alone
            assert (done["chunks_freed"], done["objects_deleted"]) == (128, 1), done
            return size

        tiered.upload = put_then_gc
        done = Uploader(opened).run(packs=[pack])
        assert done.error is None and done.packs == 0, done
    assert bucket_packs(s3_server) == {} and stored_packs(repo) == {}, "p2's is pending"
    assert_check_clean(rpfs)


def test_a_store_that_does_not_take_the_copies_stops_gc_before_any_chunk_moves(
        rpfs, s3_repo, s3_server, mount, tmp_path, monkeypatch):
    """The server frozen while gc uploads its first copy: the PUT fails after the retry
    bound, gc stops and says why, the old packs stay stored and name every chunk; the
    next gc uploads the copies and finishes."""
    repo = s3_repo
    set_grace(repo, 0)
    kept = history(rpfs, tmp_path)
    before = bucket_packs(s3_server)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    with Repository(repo) as opened:
        objects = opened.store.backend.objects
        put = objects.put

        def put_while_frozen(name: str, data) -> None:
            objects.put = put  # the first one only
            s3_server.pause()
            try:
                put(name, data)
            finally:
                s3_server.resume()

        objects.put = put_while_frozen
        stopped = gc_module.run(opened, threshold=1.0)
        with opened.index.read() as txn:
            moved = {loc.pack for _, loc in opened.index.iter_chunks(txn)} - {
                int(name[6:14]) for name in before}
    assert stopped["stopped"] and "store" in stopped["stopped"], stopped
    assert stopped["packs_compacted"] == stopped["objects_deleted"] == 0, stopped
    assert not moved, "no chunk names a copy the store does not hold"
    assert before.items() <= bucket_packs(s3_server).items()
    assert stored_packs(repo).keys() == before.keys()
    assert_check_clean(rpfs)
    done = gc(rpfs, "--threshold", "0.8")  # the copies are all live: not compacted again
    assert done["stopped"] is None and done["objects_deleted"] == len(before), done
    after = bucket_packs(s3_server)
    assert not after.keys() & before.keys() and after == stored_packs(repo)
    assert_index_matches_the_bucket(rpfs, repo, s3_server)
    assert_exact_from_the_store(rpfs, repo, mount, kept)
