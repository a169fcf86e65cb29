"""The trash period as a repository setting (`init --trash-days`, `config set
trash-days`, 0 turning the trash off) and the daemon's own purge of what it let expire.
The clock is RPFS_NOW (no sleeping for days)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from rpfs.capture import capture
from rpfs.disks.service import DiskService
from rpfs.errors import RpfsError
from rpfs.lifecycle.clock import iso
from rpfs.lifecycle.purge import refcount_errors
from rpfs.repo import Repository
from rpfs.serve.daemon import _TrashPurge

DAY = 86400
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _two_disks(root: Path, tmp_path: Path) -> None:
    """d@p1, d@p2 and e@p1, captured at T0."""
    rng = random.Random(7)
    source = tmp_path / "source.img"
    with Repository(root) as repo:
        for disk, name in (("d", "p1"), ("d", "p2"), ("e", "p1")):
            source.write_bytes(rng.randbytes(64 << 10))
            capture(repo, disk, source, name)


def test_a_repository_without_the_key_opens_with_14_days(tmp_path: Path):
    root = tmp_path / "repo"
    Repository.init(root, 4096).close()
    config = json.loads((root / "rpfs.json").read_text())
    assert config["trash_days"] == 14
    del config["trash_days"]  # as rpfs wrote it before the setting existed
    (root / "rpfs.json").write_text(json.dumps(config))
    with Repository(root) as repo:
        assert repo.config.trash_days == 14
    for bad in (-1, "3", True, 36501):
        (root / "rpfs.json").write_text(json.dumps({**config, "trash_days": bad}))
        with pytest.raises(RpfsError, match="'trash_days' must be an integer from 0 to"):
            Repository(root)


def test_init_and_config_set_check_their_input(rpfs, repo_dir: Path):
    for bad in ("-1", "x", "1.5", "٣", "36501"):
        res = rpfs("init", "--trash-days", bad)
        assert_one_line_error(res, f"invalid trash-days {bad!r}")
        assert not repo_dir.exists(), "a refused init made nothing"
    rpfs("init", "--trash-days", "3", check=True)
    shown = json.loads(rpfs("config", "show", "--json", check=True).stdout)
    assert shown["trash_days"] == 3 and shown["reserve"] is None
    before = (repo_dir / "rpfs.json").read_bytes()
    for bad in ("-1", "x", ""):
        assert_one_line_error(rpfs("config", "set", "trash-days", bad), "invalid trash-days")
    assert (repo_dir / "rpfs.json").read_bytes() == before
    rows = [line.split(None, 1) for line in rpfs("config", "show", check=True).stdout.splitlines()]
    assert ["trash-days", "3 (trash period 3 days)"] in rows


def test_a_changed_period_applies_to_the_trash_and_0_turns_it_off(rpfs, repo: Path,
                                                                  tmp_path: Path):
    _two_disks(repo, tmp_path)
    rpfs.env["RPFS_NOW"] = str(T0)
    rpfs("point", "delete", "d@p1", check=True)
    [held] = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert held["purge_after"] == T0 + 14 * DAY
    rpfs("config", "set", "trash-days", "2", check=True)
    [held] = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert held["purge_after"] == T0 + 2 * DAY, "the new period applies to the trash"
    rpfs.env["RPFS_NOW"] = str(T0 + 3 * DAY)
    assert rpfs("trash", "purge", "--expired", check=True).stdout == "d@p1: purged\n"

    rpfs("config", "set", "trash-days", "0", check=True)
    done = rpfs("point", "delete", "d@p2", check=True).stdout
    assert done == "d@p2: deleted and purged (the trash is off: trash-days is 0)\n"
    pruned = rpfs("prune", "e", "--keep-last", "0", check=True).stdout
    assert json.loads(rpfs("trash", "--json", check=True).stdout) == []
    assert pruned.endswith("points deleted and purged (the trash is off: trash-days is 0)\n")
    with Repository(repo) as opened:
        assert refcount_errors(opened.index) == []


def test_the_daemons_purge_leaves_an_open_image_its_point_until_it_closes(
    tmp_path: Path, monkeypatch, caplog
):
    """The periodic purge does not wait for open images: an expired point whose image is
    open is marked purge_on_close (said once in the log, however many rounds), the others
    go at once; its close purges it."""
    root = tmp_path / "repo"
    Repository.init(root, 4096, trash_days=1).close()
    _two_disks(root, tmp_path)
    monkeypatch.setenv("RPFS_NOW", str(T0))
    with Repository(root) as repo:
        service = DiskService(repo)
        try:
            point = service.registry.open_point("d", "p1")  # as the mount's open counts it
            service.delete_points(["d@p1", "e@p1"])
            purger = _TrashPurge(service)
            purger.purge_once()
            assert len(service.list_trash()) == 2, "not expired yet: nothing goes"
            monkeypatch.setenv("RPFS_NOW", str(T0 + DAY + 1))
            with caplog.at_level(logging.INFO, logger="rpfs.serve.daemon"):
                purger.purge_once()
                purger.purge_once()
            assert [(p["disk"], p["name"], p["purge_on_close"])
                    for p in service.list_trash()] == [("d", "p1", True)]
            said = [r.getMessage() for r in caplog.records]
            since = f"trash period of 1 days over since {iso(T0 + DAY)}"
            assert said.count(f"disk d: point p1: {since}: purged when its open image "
                              "closes") == 1
            assert f"disk e: point p1: {since}: purged" in said
            assert refcount_errors(repo.index) == []
            service.registry.close_point(point)
            assert service.list_trash() == []
            assert refcount_errors(repo.index) == []
        finally:
            service.registry.close_all()


def _wait_for(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_the_daemon_sees_a_new_period_and_purges_by_itself(rpfs, repo: Path, mount,
                                                           tmp_path: Path):
    """Through the daemon: `config set` changes its period (the trash it lists shows it);
    restarted with the clock moved past it, it purges the expired point by itself and
    logs it; the survivor reads back the same."""
    _two_disks(repo, tmp_path)
    rpfs.env["RPFS_NOW"] = str(T0)
    mnt, _ = mount()
    survivor = (mnt / "points" / "d" / "p2.img").read_bytes()
    rpfs("point", "delete", "d@p1", check=True)
    rpfs("config", "set", "trash-days", "3", check=True)
    [held] = json.loads(rpfs("trash", "--json", check=True).stdout)
    assert held["purge_after"] == T0 + 3 * DAY, "the daemon took the new period"
    assert json.loads((repo / "rpfs.json").read_text())["trash_days"] == 3
    rpfs("umount", mnt, check=True)
    rpfs.env["RPFS_NOW"] = str(T0 + 3 * DAY + 60)
    mount()
    assert _wait_for(lambda: json.loads(rpfs("trash", "--json", check=True).stdout) == [])
    log = (repo / "rpfs.log").read_text()
    assert "disk d: point p1: trash period of 3 days over since" in log
    assert (mnt / "points" / "d" / "p2.img").read_bytes() == survivor


def test_with_the_trash_off_an_expired_point_is_purged_at_once(tmp_path: Path, monkeypatch):
    """trash-days 0: the expiry check moves an expired point to the trash and purges it in
    the same turn, as a delete would (nothing waits for the trash's own turn)."""
    root = tmp_path / "repo"
    Repository.init(root, 4096, trash_days=0).close()
    source = tmp_path / "d.img"
    source.write_bytes(random.Random(5).randbytes(64 << 10))
    monkeypatch.setenv("RPFS_NOW", str(T0))
    with Repository(root) as repo:
        capture(repo, "d", source, point="p1", expires=T0 + DAY)
        source.write_bytes(random.Random(6).randbytes(64 << 10))
        capture(repo, "d", source, point="p2")
        service = DiskService(repo)
        monkeypatch.setenv("RPFS_NOW", str(T0 + DAY))
        try:
            assert [p["name"] for p in service.expire()] == ["p1"]
            assert service.list_trash() == []
            with repo.index.read() as txn:
                assert [p.name for p in repo.index.list_points(txn)] == ["p2"]
            assert refcount_errors(repo.index) == []
        finally:
            service.registry.close_all()
