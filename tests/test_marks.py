"""Holds, descriptions and on-demand expiry: in process (the library and the service),
with the CLI without a daemon (bad input), and through the mount (the daemon's expiry
check after its clock moved)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from rpfs.capture import capture
from rpfs.disks.service import DiskService
from rpfs.errors import RpfsError
from rpfs.index import TrashRecord
from rpfs.lifecycle import clock, expiry, marks, trash
from rpfs.lifecycle.purge import refcount_errors
from rpfs.repo import Repository

BS = 4096
T0 = "2027-01-10T00:00Z"
DAY = 86400


@pytest.fixture
def captured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A repository with three captured points d@p1..p3 taken at T0; d@p3 expires a day
    later."""
    monkeypatch.setenv("RPFS_NOW", T0)
    rng = random.Random(7)
    root = tmp_path / "repo"
    Repository.init(root, BS).close()
    source = tmp_path / "source.img"
    with Repository(root) as repo:
        for name in ("p1", "p2", "p3"):
            source.write_bytes(rng.randbytes(8 * BS))
            capture(repo, "d", source, name, description=f"the {name}",
                    expires=clock.now() + DAY if name == "p3" else None)
        yield repo


def records(repo: Repository) -> dict[str, object]:
    with repo.index.read() as txn:
        return {p.name: p for p in repo.index.list_points(txn, "d")}


def test_capture_stores_description_and_expiry(captured: Repository):
    points = records(captured)
    assert [(p.description, p.expires, p.hold) for p in points.values()] == [
        ("the p1", None, None), ("the p2", None, None),
        ("the p3", clock.parse_instant(T0) + DAY, None)]


def test_a_hold_refuses_delete_and_purge_naming_its_tag(captured: Repository):
    marks.hold(captured.index, "d@p2", "legal")
    before = records(captured)
    for purge in (False, True):
        with pytest.raises(RpfsError) as exc:
            trash.delete(captured.index, ["d@p1", "d@p2"], purge=purge)
        assert str(exc.value) == ("point d@p2 is held (legal): cannot delete it; "
                                  "'rpfs release d@p2' first")
    assert records(captured) == before  # d@p1, named first, was not deleted either
    done = marks.release(captured.index, "d@p2")
    assert done["hold"] is None and done["done"] == "hold (legal) released"
    trash.delete(captured.index, ["d@p2"])
    assert sorted(records(captured)) == ["p1", "p3"]


def test_a_held_point_in_the_trash_is_not_purged(captured: Repository):
    """A trash entry that is held (delete refuses held points, so only a record edited
    by hand gets there) stops a purge before anything is dropped."""
    trash.delete(captured.index, ["d@p1", "d@p2"])
    with captured.index.write() as txn:
        [entry] = captured.index.list_trash(txn, "d", "p2")
        captured.index.delete_trash(txn, entry.point)
        entry.point.hold = "legal"
        captured.index.put_trash(txn, TrashRecord(entry.point, entry.deleted_at))
    with pytest.raises(RpfsError, match=r"point d@p2 is held \(legal\): cannot purge it"):
        trash.purge_trash(captured.index)
    assert [e["name"] for e in trash.listing(captured.index)] == ["p1", "p2"]
    assert refcount_errors(captured.index) == []


def test_prune_keeps_held_and_on_demand_points_with_their_rule(captured: Repository):
    marks.hold(captured.index, "d@p1", "legal")
    service = DiskService(captured)
    try:
        plan = service.prune("d", keep_last=1)
    finally:
        service.registry.close_all()
    assert [(p["name"], p["keep"], p["rule"]) for p in plan] == [
        ("p3", True, "on-demand (expires 2027-01-11T00:00:00Z)"),
        ("p2", True, "keep-last 1"),
        ("p1", True, "held (legal)"),
    ]
    assert sorted(records(captured)) == ["p1", "p2", "p3"]


def test_describe_and_hold_change_one_field(captured: Repository):
    before = records(captured)
    marks.describe(captured.index, "d@p1", "before 2.4")
    marks.hold(captured.index, "d@p1")
    after = records(captured)
    assert (after["p1"].description, after["p1"].hold) == ("before 2.4", marks.DEFAULT_TAG)
    after["p1"].description, after["p1"].hold = before["p1"].description, None
    assert after == before
    assert marks.hold(captured.index, "d@p1", "legal")["done"] == "held (legal, was hold)"


def test_bad_marks_change_nothing(captured: Repository):
    before = records(captured)
    for call, message in [
        (lambda: marks.hold(captured.index, "d@p9"), "disk d has no point 'p9'"),
        (lambda: marks.hold(captured.index, "d@p1", "a b"), "invalid hold tag 'a b'"),
        (lambda: marks.release(captured.index, "d@p1"), "point d@p1 is not held"),
        (lambda: marks.describe(captured.index, "d@p1", "two\nlines"), "bad description"),
        (lambda: marks.describe(captured.index, "d@p1", "x" * 257), "too long"),
    ]:
        with pytest.raises(RpfsError, match=message):
            call()
    assert records(captured) == before


def test_expire_moves_due_unheld_points_to_the_trash(
    captured: Repository, monkeypatch: pytest.MonkeyPatch
):
    assert expiry.expire(captured.index) == []  # not yet
    marks.hold(captured.index, "d@p3", "keep")
    monkeypatch.setenv("RPFS_NOW", "2027-01-12T00:00Z")
    assert expiry.expire(captured.index) == []  # held: waits for its release
    marks.release(captured.index, "d@p3")
    [gone] = expiry.expire(captured.index)
    assert (gone["disk"], gone["name"]) == ("d", "p3")
    assert sorted(records(captured)) == ["p1", "p2"]
    [entry] = trash.listing(captured.index)
    assert (entry["name"], entry["deleted_at"]) == ("p3", clock.now())
    trash.undelete(captured.index, "d@p3")  # back as it was, expiry and all
    assert records(captured)["p3"].expires == clock.parse_instant(T0) + DAY
    assert refcount_errors(captured.index) == []


def test_old_records_decode_with_the_defaults(captured: Repository):
    """A point record written before these fields existed reads as one without them."""
    with captured.index.write() as txn, txn.cursor(db=captured.index.db["points"]) as cursor:
        for key, raw in list(cursor):
            record = json.loads(raw)
            for name in ("description", "expires", "hold"):
                del record[name]
            txn.put(key, json.dumps(record).encode(), db=captured.index.db["points"])
    assert [(p.description, p.expires, p.hold) for p in records(captured).values()] == [
        ("", None, None)] * 3


def test_bad_input_on_the_command_line(rpfs, repo: Path, tmp_path: Path):
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(1).randbytes(256 << 10))
    rpfs.env["RPFS_NOW"] = T0
    assert_one_line_error(rpfs("capture", "d", source, "--expire-in", "3x"),
                          "bad duration '3x'")
    assert_one_line_error(rpfs("capture", "d", source, "--expire-at", "2027-01-01T00:00Z"),
                          "expiry 2027-01-01T00:00Z is in the past")
    assert json.loads(rpfs("disks", "--json", check=True).stdout) == []  # nothing changed
    rpfs.capture("d", source, "p1", "--expire-in", "2d", "--description", "before 2.4")
    assert_one_line_error(rpfs("hold", "d@p9"), "disk d has no point 'p9'")
    assert_one_line_error(rpfs("release", "d@p1"), "point d@p1 is not held")
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    assert_one_line_error(rpfs("snapshot", "w", "--expire-in", "0d"), "must be longer than 0")
    [p1] = rpfs.points()
    assert (p1["description"], p1["expires"], p1["hold"]) == (
        "before 2.4", clock.parse_instant(T0) + 2 * DAY, None)
    held = rpfs("hold", "d@p1", "--tag", "legal", check=True)
    assert held.stdout.startswith("d@p1: held (legal);")
    assert_one_line_error(rpfs("point", "delete", "d@p1"), "held (legal)")
    table = rpfs("points", check=True).stdout.splitlines()
    assert table[0].split()[-3:] == ["HOLD", "EXPIRES", "DESCRIPTION"]
    assert table[1].endswith("legal  2027-01-12 00:00:00Z  before 2.4")


def test_through_the_mount(rpfs, repo: Path, mount, tmp_path: Path):
    """With the daemon: a hold refuses delete and prune, description and expiry show in
    `points --json`, and a daemon whose clock has passed an expiry moves the point out
    of the mount."""
    rpfs.env["RPFS_NOW"] = T0
    mnt, _ = mount()
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(2).randbytes(256 << 10))
    rpfs.capture("d", source, "p1")
    source.write_bytes(random.Random(3).randbytes(256 << 10))
    rpfs.capture("d", source, "p2")
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    rpfs("snapshot", "w", "--name", "s1", "--expire-in", "1d", "--description", "pre-upgrade",
         check=True)
    rpfs("hold", "d@p1", "--tag", "legal", check=True)
    rpfs("point", "describe", "d@p2", "the second", check=True)
    assert_one_line_error(rpfs("point", "delete", "d@p1"), "point d@p1 is held (legal)")
    plan = json.loads(rpfs("prune", "d", "--keep-last", "1", "--json", check=True).stdout)
    assert [(p["name"], p["rule"]) for p in plan] == [("p2", "keep-last 1"),
                                                      ("p1", "held (legal)")]
    shown = {p["name"]: (p["hold"], p["expires"], p["description"]) for p in rpfs.points()}
    assert shown == {"p1": ("legal", None, ""), "p2": (None, None, "the second"),
                     "s1": (None, clock.parse_instant(T0) + DAY, "pre-upgrade")}
    assert sorted(p.name for p in (mnt / "points" / "w").iterdir()) == ["s1.img"]
    rpfs("umount", mnt, check=True)
    rpfs.env["RPFS_NOW"] = "2027-01-11T00:00Z"  # the expiry itself: due
    mount()
    deadline = time.monotonic() + 10  # the first check runs as the daemon starts serving
    while (mnt / "points" / "w" / "s1.img").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (mnt / "points" / "w" / "s1.img").exists()
    assert sorted(p["name"] for p in rpfs.points()) == ["p1", "p2"]
    [gone] = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert (gone["disk"], gone["name"]) == ("w", "s1")
