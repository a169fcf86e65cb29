"""`rpfs prune` end to end, through the daemon: --dry-run changes nothing; without it the
points the policy does not keep go to the trash, leave the mount at once, and the kept
ones read back bit-exact. Point times come from RPFS_NOW (the one clock), so no sleeping.
The bucket rules themselves are table-tested in test_retention.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from helpers import assert_one_line_error

# name -> when it is taken (UTC)
TAKEN = {
    "p1": "2026-11-01T10:00Z",
    "p2": "2026-11-01T12:00Z",
    "p3": "2026-11-02T09:00Z",
    "p4": "2026-11-03T09:00Z",
    "p5": "2026-11-10T09:00Z",
}


def test_prune_dry_run_then_for_real(rpfs, mounted: Path, tmp_path: Path):
    rng = random.Random(5)
    source = tmp_path / "source.img"
    data = bytearray(rng.randbytes(512 << 10))
    sums = {}
    for name, when in TAKEN.items():
        data[: 64 << 10] = rng.randbytes(64 << 10)
        source.write_bytes(data)
        rpfs.env["RPFS_NOW"] = when
        rpfs.capture("d", source, name)
        sums[name] = hashlib.sha256(data).hexdigest()
    rpfs.env.pop("RPFS_NOW")
    images = mounted / "points" / "d"
    assert sorted(os.listdir(images)) == [f"{n}.img" for n in TAKEN]

    plan = json.loads(rpfs("prune", "d", "--keep-daily", "2", "--dry-run", "--json",
                           check=True).stdout)
    assert [(p["name"], p["keep"], p["rule"]) for p in plan] == [
        ("p5", True, "daily 2026-11-10"),
        ("p4", True, "daily 2026-11-03"),
        ("p3", False, "no rule keeps it"),
        ("p2", False, "no rule keeps it"),
        ("p1", False, "no rule keeps it"),
    ]
    table = rpfs("prune", "d", "--keep-daily", "2", "--dry-run", check=True).stdout
    assert "p3" in table and "would remove" in table
    assert table.endswith("3 of 5 points would go to the trash (--dry-run: nothing changed)\n")
    assert [p["name"] for p in rpfs.points("d")] == list(TAKEN), "--dry-run changed nothing"

    done = rpfs("prune", "d", "--keep-daily", "2", check=True).stdout
    assert done.endswith("3 of 5 points moved to the trash ('rpfs undelete' brings one back)\n")
    assert [p["name"] for p in rpfs.points("d")] == ["p4", "p5"]
    assert sorted(os.listdir(images)) == ["p4.img", "p5.img"]
    trashed = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert sorted(p["name"] for p in trashed) == ["p1", "p2", "p3"]
    for name in ("p4", "p5"):
        assert hashlib.sha256((images / f"{name}.img").read_bytes()).hexdigest() == sums[name]
    rpfs("undelete", "d@p1", check=True)
    assert hashlib.sha256((images / "p1.img").read_bytes()).hexdigest() == sums["p1"]


def test_bad_policies_are_one_line_errors_and_change_nothing(rpfs, repo: Path, tmp_path: Path):
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(6).randbytes(256 << 10))
    for name in ("p1", "p2"):
        rpfs.capture("d", source, name)
    assert_one_line_error(rpfs("prune", "d", "--keep-daily", "-1"),
                          "bad --keep-daily -1: use a whole number, 0 or more")
    assert_one_line_error(rpfs("prune", "nosuch", "--keep-last", "1"), "no disk named 'nosuch'")
    assert [p["name"] for p in rpfs.points("d")] == ["p1", "p2"]
    # No keep option above 0: every point is kept (PBS's "keep all").
    plan = json.loads(rpfs("prune", "d", "--json", check=True).stdout)
    assert all(p["keep"] for p in plan), plan
