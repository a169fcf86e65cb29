"""The benchmark's own machinery: the ceiling filesystem, the sample disk, medians, the
targets and the JSON file. The benchmark itself never runs in tests (nothing is timed)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import itertools
import json
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rpfs.errors import RpfsError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
CEILINGFS = SCRIPTS / "ceilingfs.py"
sys.path.insert(0, str(SCRIPTS))
br = importlib.import_module("benchlib.results")
sample_mod = importlib.import_module("benchlib.sample")
runner = importlib.import_module("benchlib.runner")
cli_timer = importlib.import_module("benchlib.cli_timer")
measure = importlib.import_module("benchlib.measure")
background = importlib.import_module("benchlib.background")
s3_bench = importlib.import_module("benchlib.s3")
bench_mounts = importlib.import_module("benchlib.mounts")
write32m = importlib.import_module("benchlib.write32m")
ceilingfs = importlib.import_module("ceilingfs")

MiB = 1 << 20

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3",
)
needs_e2fsprogs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "dumpe2fs")),
    reason="needs e2fsprogs",
)


# -- medians, results, JSON --------------------------------------------------------------


def test_median_ignores_missing_values():
    assert br.median([3, 1, 2]) == 2
    assert br.median([4, 1, 3, 2]) == 2.5
    assert br.median([5, None, float("nan"), 1, 3]) == 3
    assert br.median([]) is None
    assert br.median([None]) is None


def test_add_takes_the_median_of_runs_and_keeps_them():
    r = br.Results(256 * MiB)
    e = r.add("rpfs", "seq_read_cold_MBps", [310.0, 290.0, 500.0])
    assert e.value == 310.0
    assert e.runs == [310.0, 290.0, 500.0]
    assert r.add("rpfs", "daemon_peak_rss_MiB", 88).value == 88.0
    assert r.add("rpfs", "snapshot_s", None, "no command").value is None
    assert r.get("rpfs", "seq_read_cold_MBps") == 310.0
    assert r.get("borg", "seq_read_cold_MBps") is None


def test_missing_marks_only_unrecorded_metrics_null():
    r = br.Results(MiB)
    r.add("rpfs", "clone_create_s", [0.01, 0.02, 0.03])
    r.missing("rpfs", ["clone_create_s", "snapshot_s"], "not measured: no snapshot yet")
    assert r.get("rpfs", "clone_create_s") == 0.02
    entry = r.entries[("rpfs", "snapshot_s")]
    assert entry.value is None
    assert entry.note == "not measured: no snapshot yet"


def _fake_results() -> br.Results:
    r = br.Results(2 << 30, {"cpus": 2})
    r.add("rpfs", "seq_read_cold_MBps", [700, 690, 710])
    r.add("ceiling", "seq_read_cold_MBps", [1000, 1000, 1000])  # no target on it
    r.add("borg", "seq_read_cold_MBps", [300, 300, 300])  # no target on it
    r.add("qemu", "seq_read_cold_MBps", [800, 800, 800])  # 700 < 800: FAIL
    r.add("rpfs", "clone_create_s", [0.05, 0.04, 0.06])  # PASS
    r.add("rpfs", "snapshot_s", [0.2, 0.3, 0.25])  # FAIL
    r.add("rpfs", "rollback_s", None, "not measured: no rollback command yet")  # n/a
    r.add("rpfs", "rand4k_qd1_mean_us", [100, 100, 100])
    r.add("qemu", "rand4k_qd1_mean_us", [90, 90, 90])  # 1.11 ≤ 1.25: PASS
    r.add("rpfs", "repo_bytes_added_incr", [5 * MiB] * 3)
    r.add("qemu", "repo_bytes_added_incr", [5 * MiB] * 3)  # equal: PASS (<=)
    r.add("rpfs", "daemon_peak_rss_MiB", [90.0])
    r.add("rpfs", "daemon_peak_rss_MiB_64G", [120.0])  # ≤ 150 but 1.33 × 90: FAIL growth
    r.note("a note")
    return r


def _verdicts(r: br.Results) -> dict[str, br.Verdict]:
    return {v.target.name: v for v in br.evaluate_targets(r)}


def test_targets_with_fake_numbers():
    v = _verdicts(_fake_results())
    qemu = v["point cold read ≥ qemu"]
    assert (qemu.status, qemu.ratio, qemu.required) == ("FAIL", 0.875, ">= 1")
    assert v["full capture ≥ 2 × borg"].status == "n/a"  # no capture measured
    assert v["full capture ≥ 2 × borg"].ratio is None
    assert v["clone < 0.1 s"].status == "PASS"
    assert v["clone < 0.1 s"].ratio == pytest.approx(0.5)
    assert v["snapshot < 0.1 s"].status == "FAIL"
    assert v["rollback < 0.1 s"].status == "n/a"
    qd1 = v["point rand4k qd1 mean latency ≤ 1.25 × qemu"]
    assert qd1.status == "PASS" and qd1.ratio == pytest.approx(100 / 90)
    assert v["incremental repo bytes ≤ qcow2 overlay"].status == "PASS"
    assert v["daemon peak RSS ≤ 150 MiB"].status == "PASS"
    assert v["daemon peak RSS ≤ 150 MiB at 64 GiB"].status == "PASS"
    growth = [t for name, t in v.items() if name.startswith("daemon RSS not growing")]
    assert growth[0].status == "FAIL"
    assert v["hydrated clone cold read ≥ 0.7 × raw"].status == "n/a"
    assert {t.status for t in v.values()} == {"PASS", "FAIL", "n/a"}


# issue 16's speed targets: (name, rpfs metric, reference (system, metric), reference
# value, an rpfs value that passes (the bound itself where it is exact), one that fails)
ISSUE16_TARGETS = [
    ("point rand4k qd16 ≥ 0.5 × ceiling", "rand4k_qd16_iops", ("ceiling", "rand4k_qd16_iops"),
     12658, 6329, 2224),
    ("point rand4k qd16 ≥ 0.5 × qemu", "rand4k_qd16_iops", ("qemu", "rand4k_qd16_iops"),
     15775, 8000, 7800),
    ("point rand4k qd1 mean latency ≤ 1.25 × qemu", "rand4k_qd1_mean_us",
     ("qemu", "rand4k_qd1_mean_us"), 184, 230, 352),
    ("hydrated clone rand4k qd16 ≥ 0.5 × ceiling", "clone_hydrated_rand4k_qd16_iops",
     ("ceiling", "rand4k_qd16_iops"), 12658, 6329, 6000),
    ("hydrated clone cold read ≥ 0.7 × raw", "clone_hydrated_read_MBps",
     ("raw", "seq_read_cold_MBps"), 2000, 1400, 395),
    ("copy-on-read first read ≥ 0.5 × point cold read", "clone_first_read_MBps",
     ("rpfs", "seq_read_cold_MBps"), 364, 182, 181),
    ("point cold read ≥ qemu", "seq_read_cold_MBps", ("qemu", "seq_read_cold_MBps"),
     599, 599, 364),
    ("full capture ≥ 2 × borg", "capture_full_MBps", ("borg", "capture_full_MBps"),
     140, 280, 248),
    ("incremental capture ≤ 0.5 × qemu overlay writes", "capture_incr_s",
     ("qemu", "capture_incr_s"), 2.4, 1.2, 1.3),
    ("clone rand4k write (fsync/32) ≥ qemu qcow2 overlay", "clone_rand4k_write_iops",
     ("qemu", "clone_rand4k_write_iops"), 4000, 4000, 851),
    ("32 MiB write from an untouched buffer ≤ 2 × touched", "write32m_untouched_s",
     ("rpfs", "write32m_touched_s"), 0.25, 0.5, 28.9),
    ("clone rand4k write qd16 ≥ 0.5 × ceiling", "rand4k_write_qd16_iops",
     ("ceiling", "rand4k_write_qd16_iops"), 20000, 10000, 851),
]


@pytest.mark.parametrize(("name", "metric", "other", "ref", "good", "bad"), ISSUE16_TARGETS,
                         ids=[case[0] for case in ISSUE16_TARGETS])
def test_issue16_targets_pass_and_fail_on_made_up_values(name, metric, other, ref, good, bad):
    r = br.Results(2 << 30)
    r.add(*other, [ref])
    assert _verdicts(r)[name].status == "n/a"  # rpfs's side not measured
    r.add("rpfs", metric, [good])
    verdict = _verdicts(r)[name]
    assert verdict.status == "PASS", verdict
    assert (verdict.value, verdict.reference) == (good, ref)
    r.add("rpfs", metric, [bad])
    assert _verdicts(r)[name].status == "FAIL"
    r.add(*other, None, "not measured: no peer")
    assert _verdicts(r)[name].status == "n/a"


def test_issue16_targets_replace_the_old_speed_targets():
    names = {t.name for t in br.TARGETS}
    assert {case[0] for case in ISSUE16_TARGETS} <= names
    for old in ("point cold read ≥ 0.6 × ceiling", "point cold read ≥ 3 × borg",
                "point cold read ≥ 3 × restic", "hydrated clone read ≥ 0.8 × ceiling",
                "unhydrated clone read ≥ 0.5 × ceiling", "rand4k qd1 mean latency ≤ qemu"):
        assert old not in names
    for kept in ("clone < 0.1 s", "snapshot < 0.1 s", "rollback < 0.1 s",
                 "daemon peak RSS ≤ 150 MiB", "incremental repo bytes ≤ qcow2 overlay",
                 "cold read from the store ≥ 0.5 × local", "capture to the store ≥ 0.8 × local",
                 f"clone rand4k p99 during gc ≤ {br.GC_READ_SLOWDOWN:g} × quiet"):
        assert kept in names
    for t in br.TARGETS:  # every metric a target names is one the table knows
        assert t.metric in br.METRICS, t.name
        assert t.other is None or t.other[1] in br.METRICS, t.name


def test_new_write_rows_print_with_their_units():
    r = br.Results(256 * MiB)
    r.add("rpfs", "write32m_untouched_s", [28.9, 30.1, 29.5], "no page touched")
    r.add("rpfs", "write32m_touched_s", [0.141, 0.139, 0.142])
    r.add("rpfs", "rand4k_write_qd16_iops", [851.4])
    r.add("ceiling", "rand4k_write_qd16_iops", [20000])
    r.add("rpfs", "clone_hydrated_rand4k_qd16_iops", [5180.2])
    lines = br.render_table(r).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(
        ("write32m_", "rand4k_write_", "clone_hydrated_"))}
    assert rows["write32m_untouched_s"] == ["29.500*"]
    assert rows["write32m_touched_s"] == ["0.141"]
    assert rows["rand4k_write_qd16_iops"] == ["851", "20000"]
    assert rows["clone_hydrated_rand4k_qd16_iops"] == ["5180"]
    untouched = next(line for line in lines
                     if line.startswith("32 MiB write from an untouched buffer"))
    assert "FAIL" in untouched and "209.22" in untouched


def test_target_bounds_are_strict_or_not_as_written():
    r = br.Results(MiB)
    r.add("rpfs", "clone_create_s", 0.1)
    r.add("rpfs", "daemon_peak_rss_MiB", 150)
    v = _verdicts(r)
    assert v["clone < 0.1 s"].status == "FAIL"  # < 0.1: 0.1 itself fails
    assert v["daemon peak RSS ≤ 150 MiB"].status == "PASS"  # ≤ 150: 150 passes


def test_json_shape(tmp_path: Path):
    r = _fake_results()
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = br.write_json(r, tmp_path / "bench-results", when)
    assert path.name == "20250102T030405Z.json"
    data = json.loads(path.read_text())
    assert set(data) == {"machine", "size_bytes", "results", "targets", "notes"}
    assert data["machine"] == {"cpus": 2}
    assert data["size_bytes"] == 2 << 30
    assert data["notes"] == ["a note"]
    for item in data["results"]:
        assert {"system", "metric", "value"} <= set(item)
        assert item["value"] is None or isinstance(item["value"], float)
    by_key = {(i["system"], i["metric"]): i for i in data["results"]}
    assert by_key[("rpfs", "seq_read_cold_MBps")]["value"] == 700
    assert by_key[("rpfs", "seq_read_cold_MBps")]["runs"] == [700, 690, 710]
    assert by_key[("rpfs", "rollback_s")]["value"] is None
    assert "no rollback" in by_key[("rpfs", "rollback_s")]["note"]
    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert statuses["point rand4k qd1 mean latency ≤ 1.25 × qemu"] == "PASS"
    assert statuses["point cold read ≥ qemu"] == "FAIL"
    assert statuses["full capture ≥ 2 × borg"] == "n/a"
    assert all({"target", "rule", "status", "ratio", "required"} <= set(t) for t in data["targets"])
    # a second run in the same second gets its own file
    again = br.write_json(r, tmp_path / "bench-results", when)
    assert again != path and again.exists() and path.exists()
    assert not list((tmp_path / "bench-results").glob("*.tmp"))


def test_table_shows_values_targets_and_notes():
    text = br.render_table(_fake_results())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "rpfs", "ceiling", "borg", "qemu"]
    row = next(line for line in lines if line.startswith("seq_read_cold_MBps"))
    assert row.split() == ["seq_read_cold_MBps", "700", "1000", "300", "800"]
    assert any(line.startswith("rollback_s") and "-*" in line for line in lines)
    snap = next(line for line in lines if line.startswith("snapshot < 0.1 s "))
    assert "FAIL" in snap and "2.50" in snap
    assert "a note" in text
    assert "no rollback command yet" in text


def test_commands_not_there_yet_give_null_metrics_with_a_note(tmp_path: Path):
    r = br.Results(256 * MiB)
    bench = runner.Bench(runner.Options(size=256 * MiB, log=lambda _: None), r, tmp_path)
    bench.commands = {"clone": False, "hydrate": False, "snapshot": False, "rollback": False}
    runner.bench_clones(bench, tmp_path / "repo", tmp_path / "mnt", "bench@p2", "", 3)
    runner.bench_clones(
        bench, tmp_path / "repo", tmp_path / "mnt", "big@p1", "_64G", 3, reads=False
    )
    for metric in [
        *runner.CLONE_METRICS,
        "snapshot_s",
        "rollback_s",
        "clone_create_s_64G",
        "snapshot_s_64G",
        "rollback_s_64G",
    ]:
        entry = r.entries[("rpfs", metric)]
        assert entry.value is None, metric
        assert "no 'clone' command" in entry.note
    item = next(i for i in r.to_json()["results"] if i["metric"] == "clone_create_s")
    assert (item["system"], item["value"]) == ("rpfs", None)


def test_cli_timer_times_rpfs_commands_in_one_process(tmp_path: Path):
    repo = tmp_path / "repo"
    with cli_timer.CliTimer(timeout=120) as timer:
        pid = timer.proc.pid
        assert 0 <= timer.call("-r", repo, "init") < 60
        assert (repo / "rpfs.json").exists()
        assert timer.call("-r", repo, "points") >= 0
        with pytest.raises(measure.BenchError, match="exited 1"):
            timer.call("-r", repo, "restore", "nodisk@nopoint", tmp_path / "out.img")
        assert timer.call("-r", repo, "init", check=False) >= 0  # fails: already a repo
    assert timer.proc.poll() is not None
    assert not Path(f"/proc/{pid}").exists() or timer.proc.returncode is not None


def test_gc_read_target_is_twice_the_quiet_p99():
    name = f"clone rand4k p99 during gc ≤ {br.GC_READ_SLOWDOWN:g} × quiet"
    r = br.Results(256 * MiB)
    r.add("rpfs", "gc_rand4k_qd1_p99_quiet_us", [200, 210, 190])
    r.add("rpfs", "gc_rand4k_qd1_p99_us", [400, 380, 420])
    v = _verdicts(r)[name]
    assert (v.status, v.ratio, v.required) == ("PASS", 2.0, "<= 2")
    r.add("rpfs", "gc_rand4k_qd1_p99_us", [450, 380, 420])
    assert _verdicts(r)[name].status == "FAIL"
    data = r.to_json()
    assert {i["metric"] for i in data["results"]} == {"gc_rand4k_qd1_p99_quiet_us",
                                                       "gc_rand4k_qd1_p99_us"}
    assert next(t for t in data["targets"] if t["target"] == name)["ratio"] == 2.1
    row = next(line for line in br.render_table(r).splitlines()
               if line.startswith("gc_rand4k_qd1_p99_us"))
    assert row.split() == ["gc_rand4k_qd1_p99_us", "420"]


def test_no_gc_command_gives_null_gc_metrics(tmp_path: Path):
    r = br.Results(256 * MiB)
    bench = runner.Bench(runner.Options(size=256 * MiB, log=lambda _: None), r, tmp_path)
    bench.commands = {"gc": False}
    runner.bench_gc(bench)
    for metric in runner.GC_METRICS:
        entry = r.entries[("rpfs", metric)]
        assert entry.value is None and "no 'gc' command" in entry.note, metric


def test_covered_share_of_a_window():
    assert background.covered([], 0, 10) == 0
    assert background.covered([(0, 10)], 0, 10) == 1
    assert background.covered([(-5, 2), (3, 4), (9, 20)], 0, 10) == pytest.approx(0.4)
    assert background.covered([(1, 2)], 5, 5) == 0


def test_repeat_runs_a_command_back_to_back_until_stopped(tmp_path: Path):
    repo = tmp_path / "repo"
    with cli_timer.CliTimer(timeout=120) as timer:
        timer.call("-r", repo, "init")
    loop = background.Repeat(["-r", repo, "gc", "--threshold", "1"]).start()
    t0 = time.monotonic()
    time.sleep(1.0)
    t1 = time.monotonic()
    intervals = loop.stop()
    assert len(intervals) >= 3
    assert all(a < b for a, b in intervals)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(intervals))
    assert background.covered(intervals, t0, t1) > 0.5
    failing = background.Repeat(["-r", tmp_path / "nothere", "gc"]).start()
    time.sleep(0.2)
    with pytest.raises(measure.BenchError, match="exited"):
        failing.stop()
    assert failing.intervals == []


@needs_e2fsprogs
def test_part_dead_repository_has_packs_worth_compacting(tmp_path: Path):
    r = br.Results(32 * MiB)
    bench = runner.Bench(runner.Options(size=32 * MiB, log=lambda _: None), r, tmp_path)
    bench.rpfs_cmd = runner.rpfs_command()
    bench.sample = sample_mod.build_sample(_mk(tmp_path / "sample"), 32 * MiB, seed=3)
    repo = tmp_path / "repo"
    point = runner.build_part_dead(bench, repo)
    assert point == f"{runner.DISK}@g{runner.GC_CHURNS}"
    points = json.loads(bench.rpfs("-r", repo, "points", "--json").stdout)
    assert [p["name"] for p in points] == [f"g{runner.GC_CHURNS}"]
    info = json.loads(bench.rpfs("-r", repo, "info", "--json").stdout)
    assert 0.05 < info["dead_bytes"] / info["pack_bytes"] < 0.5
    plan = json.loads(
        bench.rpfs("-r", repo, "gc", "--threshold", "1", "--dry-run", "--json").stdout
    )
    assert plan["chunks_freed"] > 0
    assert 0 < plan["bytes_copied"] < plan["pack_bytes_before"]  # part dead, not all


# -- the sample disk ---------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_e2fsprogs
def test_sample_disk_is_deterministic_and_churn_is_listed(tmp_path: Path):
    size = 32 * MiB
    a = sample_mod.build_sample(_mk(tmp_path / "a"), size, seed=7)
    b = sample_mod.build_sample(_mk(tmp_path / "b"), size, seed=7)
    assert _sha(a.base) == _sha(b.base)
    assert _sha(a.churned) == _sha(b.churned)
    assert a.base.stat().st_size == size
    assert 0.5 < a.used_bytes / size < 0.7
    fsck = subprocess.run(["e2fsck", "-fn", str(a.base)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    changed = json.loads(a.changed.read_text())
    regions = size // sample_mod.CHURN_REGION
    assert len(changed) == a.churn_regions == round(regions * 0.05)
    listed = {e["start"] for e in changed}
    assert all(e["length"] == sample_mod.CHURN_REGION for e in changed)
    base, churned = a.base.read_bytes(), a.churned.read_bytes()
    step = sample_mod.CHURN_REGION
    differing = {
        off for off in range(0, size, step) if base[off : off + step] != churned[off : off + step]
    }
    assert differing == listed
    other = sample_mod.build_sample(_mk(tmp_path / "c"), size, seed=8)
    assert _sha(other.base) != _sha(a.base)


def _mk(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


# -- the 32 MiB write ---------------------------------------------------------------------


def test_write32m_pattern_and_sample_pages():
    size = write32m.WRITE_SIZE
    data = write32m.pattern(size, 3, 1 << 16)
    assert data[:8] == ((3 << 48) + size).to_bytes(8, "little")
    assert data[4096:4104] == ((3 << 48) + size + 4096).to_bytes(8, "little")
    assert write32m.pattern(size + 4096, 3, 4096) == data[4096:8192]  # a page of the whole
    assert write32m.pattern(size, 4, 4096) != data[:4096]  # each run its own
    assert b"\0" * 8 not in [data[i : i + 8] for i in range(0, len(data), 8)]
    pages = write32m.sample_pages(size)
    assert len(pages) == write32m.SAMPLES and pages == sorted(set(pages))
    assert pages[0] == size and pages[-1] == 2 * size - 4096
    assert all(p % 4096 == 0 for p in pages)


def test_write32m_times_one_write_in_a_helper_and_checks_it(tmp_path: Path):
    """On a plain file: the helper's figure, the bytes checked, and a write over the limit
    reported as None."""
    image = tmp_path / "image.img"
    size = write32m.WRITE_SIZE
    with open(image, "wb") as f:
        f.truncate(3 * size)
    seconds, skew = write32m.timed_write(image, size, touched=True, tag=1)
    assert seconds is not None and 0 < seconds < 60
    assert skew is not None and 0 <= skew < 4096  # glibc: 16
    with open(image, "rb") as f:
        f.seek(size)
        assert f.read(size) == write32m.pattern(size, 1)
    seconds, _ = write32m.timed_write(image, size, touched=False, tag=2)
    assert seconds is not None and 0 < seconds < 60
    with open(image, "rb") as f:
        f.seek(size)
        assert f.read(size) == bytes(size)  # the marks at the sample pages are gone too
    write32m.check_region(image, size, touched=False, tag=2)
    with open(image, "r+b") as f:  # a wrong byte on a sample page is found
        f.seek(write32m.sample_pages(size)[3] + 100)
        f.write(b"x")
    with pytest.raises(measure.BenchError, match="CONTENT MISMATCH"):
        write32m.check_region(image, size, touched=False, tag=2)
    assert write32m.timed_write(image, 2 * size, touched=True, tag=3, limit=0).seconds is None


# -- the ceiling filesystem --------------------------------------------------------------


def test_ceilingfs_sizes_and_pattern():
    assert ceilingfs.parse_size("4096") == 4096
    assert ceilingfs.parse_size("64K") == 64 << 10
    assert ceilingfs.parse_size("256MiB") == 256 << 20
    assert ceilingfs.parse_size("2G") == 2 << 30
    with pytest.raises(RpfsError):
        ceilingfs.parse_size("lots")
    data = ceilingfs.pattern_bytes(1 << 16)
    assert len(data) == 1 << 16
    assert data[8:16] == (8).to_bytes(8, "little")
    assert ceilingfs.pattern_bytes(13) == data[:13]


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@contextlib.contextmanager
def _ceiling(source: str | Path, mnt: Path) -> Iterator[subprocess.Popen]:
    """ceilingfs serving `source` at `mnt`; always unmounted and its process stopped."""
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(CEILINGFS), str(source), str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode().strip() if ready else ""  # "" if it died
        if line != "ready":
            proc.wait(timeout=30)
            pytest.fail(f"ceilingfs did not start: {proc.stderr.read().decode()}")
        assert _mounted(mnt)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def ceiling(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen]]:
    source = tmp_path / "source.bin"
    # not a multiple of the page size, and varied content
    source.write_bytes(os.urandom(3 * MiB + 12345))
    mnt = tmp_path / "mnt"
    with _ceiling(source, mnt) as proc:
        yield source, mnt, proc
    assert not _mounted(mnt)
    assert proc.poll() is not None


@needs_fuse
def test_ceiling_serves_the_source_bytes(ceiling):
    source, mnt, _ = ceiling
    image = mnt / "image.img"
    assert os.listdir(mnt) == ["image.img"]
    st = image.stat()
    assert st.st_size == source.stat().st_size
    assert st.st_blksize == 1 << 20
    assert oct(st.st_mode & 0o777) == oct(0o644)
    subprocess.run(["cmp", str(image), str(source)], check=True)
    out = subprocess.run(
        ["dd", f"if={image}", "bs=1M", "status=none"], capture_output=True, check=True
    ).stdout
    assert out == source.read_bytes()
    # an unaligned read in the middle
    with open(image, "rb") as f:
        f.seek(1_000_001)
        assert f.read(7777) == source.read_bytes()[1_000_001 : 1_000_001 + 7777]
    # dropping the page cache makes the next read come from the filesystem again
    if os.geteuid() == 0:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        subprocess.run(["cmp", str(image), str(source)], check=True)


@needs_fuse
def test_ceiling_stores_writes_in_memory_and_is_tuned_like_rpfs(ceiling):
    source, mnt, _ = ceiling
    image = mnt / "image.img"
    before = source.read_bytes()
    size = len(before)
    expect = bytearray(before)
    with open(image, "r+b", buffering=0) as f:
        assert f.write(b"a" * 5000) == 5000  # unaligned, over a page boundary
        f.seek(2 * MiB + 7)
        assert f.write(b"b" * 100) == 100
        os.fsync(f.fileno())  # a no-op, but it must answer
        f.seek(size - 10)
        assert f.write(b"c" * 30) == 10  # the image does not grow
        with pytest.raises(OSError) as err:
            f.write(b"d")
        assert err.value.errno == errno.ENOSPC
    expect[:5000] = b"a" * 5000
    expect[2 * MiB + 7 : 2 * MiB + 107] = b"b" * 100
    expect[size - 10 :] = b"c" * 10
    assert image.read_bytes() == expect
    fd = os.open(image, os.O_RDONLY | os.O_DIRECT)  # from the filesystem, not the cache
    buf = mmap.mmap(-1, 1 << 16)
    try:
        assert os.preadv(fd, [buf], 0) == 1 << 16
        assert buf[:] == expect[: 1 << 16]
    finally:
        buf.close()
        os.close(fd)
    assert image.stat().st_size == size
    assert source.read_bytes() == before  # SOURCE was copied, never written
    with pytest.raises(OSError):
        os.truncate(image, size + 4096)
    with pytest.raises(OSError):
        open(image, "wb")  # noqa: SIM115 (O_TRUNC)
    with pytest.raises(OSError):
        (mnt / "new").write_bytes(b"x")
    assert image.stat().st_size == size
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                dev = fields[2]
                assert "fuse.ceilingfs" in line
                assert "allow_other" in line and "default_permissions" in line
    from rpfs.serve.daemon import READ_AHEAD_KB

    assert int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text()) == READ_AHEAD_KB


@needs_fuse
def test_ceiling_pattern_source_and_unmount_ends_it(tmp_path: Path):
    mnt = tmp_path / "mnt"
    with _ceiling("pattern:1M", mnt) as proc:
        data = (mnt / "image.img").read_bytes()
        assert data == ceilingfs.pattern_bytes(1 << 20)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(timeout=20) == 0
    assert not _mounted(mnt)


@needs_fuse
def test_ceiling_refuses_a_missing_source(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(
        [sys.executable, str(CEILINGFS), str(tmp_path / "nope"), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "cannot load" in res.stderr
    assert not _mounted(mnt)


# -- the --s3 section ---------------------------------------------------------------------


def test_s3_targets_compare_the_store_with_local_beside_it():
    r = br.Results(256 * MiB)
    r.add("rpfs", "s3_cold_read_local_MBps", [600, 620, 580])
    r.add("rpfs", "s3_cold_read_MBps", [290, 310, 300])  # 0.5: PASS (>=)
    r.add("rpfs", "s3_capture_local_MBps", [300, 300, 300])
    r.add("rpfs", "s3_capture_MBps", [230, 235, 239])  # 0.78: FAIL
    r.add("rpfs", "s3_capture_stored_MBps", [100, 100, 100])  # no target of its own
    v = _verdicts(r)
    read = v["cold read from the store ≥ 0.5 × local"]
    assert (read.status, read.ratio, read.required) == ("PASS", 0.5, ">= 0.5")
    capture = v["capture to the store ≥ 0.8 × local"]
    assert capture.status == "FAIL" and capture.ratio == pytest.approx(235 / 300)
    row = next(line for line in br.render_table(r).splitlines()
               if line.startswith("s3_capture_stored_MBps"))
    assert row.split() == ["s3_capture_stored_MBps", "100"]


@needs_fuse
@needs_e2fsprogs
def test_s3_section_measures_rpfs_local_and_on_the_store(tmp_path: Path, monkeypatch):
    """The section's code on a 32 MiB sample, one run, its own SeaweedFS; restic only if
    it is installed (no apt-get from a test)."""
    monkeypatch.setattr(runner, "apt_install", lambda bench, pkgs: None)
    r = br.Results(32 * MiB)
    bench = runner.Bench(runner.Options(size=32 * MiB, runs=1, log=lambda _: None), r,
                         tmp_path)
    bench.rpfs_cmd = runner.rpfs_command()
    bench.sample = sample_mod.build_sample(_mk(tmp_path / "sample"), 32 * MiB, seed=3)
    s3_bench.bench_s3(bench)
    assert not [n for n in r.notes if "stopped early" in n], r.notes
    for metric in s3_bench.RPFS_S3_METRICS:
        assert r.get("rpfs", metric) > 0, metric
    assert r.get("rpfs", "s3_get_KiB") >= 256  # spans of records, not blocks
    assert r.get("rpfs", "s3_capture_stored_MBps") < r.get("rpfs", "s3_capture_MBps")
    statuses = {v.target.name: v.status for v in br.evaluate_targets(r)}
    assert statuses["cold read from the store ≥ 0.5 × local"] in ("PASS", "FAIL")
    restic = [r.entries[("restic", m)] for m in s3_bench.RESTIC_S3_METRICS]
    if shutil.which("restic"):
        assert all(e.value and e.value > 0 for e in restic), restic
    else:
        assert all(e.value is None and "no restic" in e.note for e in restic)
    assert not bench_mounts.mounts_under(tmp_path)
    assert not _weed_running(tmp_path)


def _weed_running(root: Path) -> bool:
    """Whether a weed process started in `root` (its cwd) is still alive."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cwd").resolve() == root / "s3":
                return True
    return False
