"""Stored policies (`rpfs policy set|show|clear`): the command forms, their bad input,
the retention they apply (at once, and after each capture), and the daemon's schedule
taking points of a clone and pruning them as its clock (RPFS_NOW) moves by hours."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from helpers import MiB, assert_one_line_error, point_image, sha256_file, write_at

from rpfs.lifecycle import clock
from rpfs.lifecycle.retention import Policy
from rpfs.names import default_point_name
from rpfs.repo import Repository

T0 = "2027-03-01T00:00Z"
HOUR = 3600.0


def _at(hours: float) -> str:
    return str(clock.parse_instant(T0) + hours * HOUR)


def _policies(rpfs, *disk: str) -> list[dict]:
    return json.loads(rpfs("policy", "show", *disk, "--json", check=True).stdout)


def _captures(rpfs, tmp_path: Path, disk: str, hours: list[float]) -> None:
    """Points p0, p1, ... of `disk`, one an hour given, each of new random data."""
    source = tmp_path / f"{disk}.img"
    for i, h in enumerate(hours):
        source.write_bytes(random.Random(i).randbytes(256 << 10))
        rpfs.env["RPFS_NOW"] = _at(h)
        rpfs.capture(disk, source, f"p{i}")


def test_set_show_clear_and_the_retention_they_apply(rpfs, repo: Path, tmp_path: Path):
    _captures(rpfs, tmp_path, "d", [0, 1, 2, 3])
    done = rpfs("policy", "set", "d", "--keep-last", "2", check=True).stdout
    assert done.splitlines() == [
        "d: policy set: keep last 2",
        "2 of 4 points moved to the trash by its retention ('rpfs trash' lists them, "
        "'rpfs undelete' brings one back)"]
    assert [p["name"] for p in rpfs.points("d")] == ["p2", "p3"]
    assert sorted(e["name"] for e in json.loads(rpfs("trash", "--json", check=True).stdout)
                  ) == ["p0", "p1"]
    [shown] = _policies(rpfs)
    assert shown == {"disk": "d", "keep_last": 2, "keep_hourly": None, "keep_daily": None,
                     "keep_weekly": None, "keep_monthly": None, "keep_yearly": None,
                     "every": None, "next_point": None, "summary": "keep last 2"}

    # A capture applies the disk's policy after it: the oldest of three goes.
    source = tmp_path / "d.img"
    rpfs.env["RPFS_NOW"] = _at(4)
    res = rpfs("capture", "d", source, "--name", "p4", check=True)
    assert res.stdout.splitlines()[-1] == (
        "its policy's retention moved 1 points to the trash: p2")
    assert [p["name"] for p in rpfs.points("d")] == ["p3", "p4"]

    # Set replaces the whole policy (nothing merged from the old one), and applies to the
    # points there: p3 and p4 are of one day, whose newest point daily keeps.
    rpfs("policy", "set", "d", "--keep-daily", "7", check=True)
    assert [p["name"] for p in rpfs.points("d")] == ["p4"]
    [shown] = _policies(rpfs, "d")
    assert (shown["keep_last"], shown["keep_daily"]) == (None, 7)
    table = rpfs("policy", "show", check=True).stdout.splitlines()
    assert table == ["DISK  POLICY        NEXT POINT", "d     keep daily 7  -"]

    assert rpfs("policy", "clear", "d", check=True).stdout == (
        "d: policy cleared (its points stay)\n")
    assert rpfs("policy", "clear", "d", check=True).stdout == (
        "d: had no policy; nothing changed\n")
    assert _policies(rpfs) == []
    assert rpfs("policy", "show", "d", check=True).stdout == "disk d has no policy\n"
    assert [p["name"] for p in rpfs.points("d")] == ["p4"]


def test_bad_input_changes_nothing(rpfs, repo: Path, tmp_path: Path):
    _captures(rpfs, tmp_path, "d", [0, 1])
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    rpfs("policy", "set", "w", "--keep-last", "5", check=True)
    before = _policies(rpfs)
    for args, needle in [
        (["d", "--every", "1h"], "disk d holds captured points only: --every takes points "
                                 "of writable disks"),
        (["d", "--keep-daily", "-1"], "bad --keep-daily -1: use a whole number, 0 or more"),
        (["w", "--every", "3x"], "bad duration '3x'"),
        (["w", "--every", "10s"], "bad --every 10s: at least 1m"),
        (["w"], "give --every or at least one --keep-* option"),
        (["nosuch", "--keep-last", "1"], "no disk named 'nosuch'"),
        (["bad/name", "--keep-last", "1"], "bad/name"),
    ]:
        assert_one_line_error(rpfs("policy", "set", *args), needle)
    assert_one_line_error(rpfs("policy", "clear", "nosuch"), "no disk named 'nosuch'")
    assert_one_line_error(rpfs("policy", "show", "nosuch"), "no disk named 'nosuch'")
    assert _policies(rpfs) == before
    assert [p["name"] for p in rpfs.points("d")] == ["p0", "p1"]


def test_a_policy_goes_with_its_disk_and_a_newer_one_is_refused(rpfs, repo: Path):
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    rpfs("policy", "set", "w", "--every", "1d", "--keep-last", "3", check=True)
    rpfs("disk", "delete", "w", check=True)
    rpfs("disk", "create", "w", "--size", "1M", check=True)
    assert _policies(rpfs) == [], "a new disk of the name starts without the old policy"
    # A policy with a rule this rpfs does not know is refused, not read as absent.
    with Repository(repo) as opened, opened.index.write() as txn:
        raw = json.loads(Policy(keep_last=1).encode())
        opened.index.put_policy(txn, "w", json.dumps({**raw, "keep_minutely": 5}).encode())
    assert_one_line_error(rpfs("policy", "show"), "unknown key 'keep_minutely'")


def _wait_complete(rpfs, disk: str, name: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in rpfs.points(disk) if p["name"] == name]
        if found and found[0]["state"] == "complete":
            return found[0]
        assert time.monotonic() < deadline, f"no complete {disk}@{name}: {rpfs.points(disk)}"
        time.sleep(0.2)


def test_the_daemon_schedules_points_of_a_clone_and_prunes_them(
    rpfs, repo: Path, mount, tmp_path: Path
):
    """`--every 1h --keep-last 2` on a clone; each remount moves the daemon's clock an
    hour on. At its first look the daemon prunes (keeping the last 2 complete points),
    then takes the point that is due; every scheduled point reads back what the disk
    held when it was taken."""
    source = tmp_path / "src.img"
    source.write_bytes(random.Random(7).randbytes(4 * MiB))
    rpfs.env["RPFS_NOW"] = T0
    rpfs.capture("src", source, "base")
    rpfs("clone", "src@base", "c", check=True)
    mnt, _ = mount()
    done = rpfs("policy", "set", "c", "--every", "1h", "--keep-last", "2", check=True)
    assert done.stdout.splitlines() == ["c: policy set: every 1h, keep last 2",
                                        "next scheduled point: now"]
    image = mnt / "disks" / "c.img"
    # The first turn ran as the daemon started, before the policy: the next is in 30 s.
    rpfs("umount", mnt, check=True)

    expected: dict[str, str] = {}  # point name -> sha256 of the disk when it was taken
    state = sha256_file(source)  # the clone reads its origin until written
    rng = random.Random(11)
    for hour in range(1, 5):
        now = _at(hour + 0.01)
        rpfs.env["RPFS_NOW"] = now
        mount()
        taken = _wait_complete(rpfs, "c", default_point_name(float(now)))
        assert taken["description"] == "scheduled (every 1h)"
        assert taken["created"] == float(now)
        expected[taken["name"]] = state
        # keep-last 2 ran before the new point: the two newest earlier ones stay.
        want = sorted(expected)[-3:]
        assert sorted(p["name"] for p in rpfs.points("c")) == want, hour
        for point in want:
            assert sha256_file(point_image(mnt, "c", point)) == expected[point], point
        write_at(image, rng.randrange(0, 4 * MiB - 65536), rng.randbytes(65536))
        state = sha256_file(image)
        [policy] = _policies(rpfs, "c")
        assert policy["next_point"] == float(now) + HOUR
        rpfs("umount", mnt, check=True)
    trashed = sorted(e["name"] for e in json.loads(rpfs("trash", "--json", check=True).stdout))
    assert trashed == sorted(expected)[:1], "the oldest scheduled point went to the trash"
    assert [p["name"] for p in rpfs.points("src")] == ["base"], "the origin is not pruned"
