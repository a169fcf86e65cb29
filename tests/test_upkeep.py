"""The daemon's own gc and rolling verify: run when their interval has passed since they
last ran (an index note, set back here instead of waiting a day), not at all when off,
and never at a repository's first start."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from helpers import MiB, assert_check_clean, point_image, sha256_file

from rpfs.maintenance import schedule
from rpfs.repo import Repository


def _purged_history(rpfs, tmp_path: Path) -> str:
    source = tmp_path / "vm.img"
    rng = random.Random(4)
    source.write_bytes(rng.randbytes(8 * MiB))
    rpfs.capture("vm", source, "p1")
    source.write_bytes(rng.randbytes(8 * MiB))
    rpfs.capture("vm", source, "p2")
    rpfs("point", "delete", "vm@p1", "--purge", check=True)
    return sha256_file(source)


def _pack_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "packs").glob("*.pack"))


def _last_ran(repo: Path, **when: float) -> dict:
    """Set (and return) the upkeep note: when each job last ran."""
    with Repository(repo) as opened, opened.index.write() as txn:
        if when:
            opened.index.put_note(txn, schedule.NOTE, when)
        return opened.index.get_note(txn, schedule.NOTE) or {}


def test_the_daemon_runs_gc_and_verify_when_due(rpfs, repo: Path, mount, tmp_path: Path):
    p2 = _purged_history(rpfs, tmp_path)
    mnt, _ = mount()  # the first start only starts counting
    first = _last_ran(repo)
    assert set(first) == {"gc", "verify"}
    assert _pack_bytes(repo) > 12 * MiB, "no gc at the first start"
    rpfs("umount", mnt, check=True)
    _last_ran(repo, gc=time.time() - 86400 - 60, verify=time.time() - 86400 - 60)
    mnt, _ = mount()
    deadline = time.monotonic() + 30
    while _pack_bytes(repo) > 9 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pack_bytes(repo) <= 9 * MiB, "the daemon's gc gave p1's space back"
    deadline = time.monotonic() + 30
    while _last_ran(repo)["verify"] < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.2)
    with Repository(repo) as opened, opened.index.read() as txn:
        assert opened.index.verified(txn), "the daemon's verify turn recorded its packs"
    assert sha256_file(point_image(mnt, "vm", "p2")) == p2
    log = (repo / "rpfs.log").read_text()
    assert "the daemon's gc: " in log and "the daemon's verify: " in log
    assert_check_clean(rpfs)


def test_off_means_never(rpfs, repo: Path, mount, tmp_path: Path):
    _purged_history(rpfs, tmp_path)
    rpfs("config", "set", "gc-interval", "off", check=True)
    rpfs("config", "set", "verify-interval", "off", check=True)
    _last_ran(repo, gc=0.0, verify=0.0)
    before = _pack_bytes(repo)
    mount()
    time.sleep(2)  # the first look runs as the daemon starts serving
    assert _pack_bytes(repo) == before
    assert _last_ran(repo) == {"gc": 0.0, "verify": 0.0}
    shown = json.loads(rpfs("config", "show", "--json", check=True).stdout)
    assert (shown["gc_interval"], shown["verify_interval"]) == (0, 0)
