"""Object store faults (issue 13), against the real S3 server on loopback (SeaweedFS,
tests/s3server.py): stopped (`stop`: nothing listens) or frozen (`pause`: a store that
accepts connections and never answers).

- Reads of data that is only in the store fail with EIO after the retry bound (logged
  with disk, point, block and pack), never with wrong bytes, the daemon alive; with the
  store back, the same reads succeed without a remount.
- Captures (the store stopped in the middle of one), writes and live snapshots go on
  locally while the store is down; `store status` shows the backlog (with its warning
  past --backlog-warn) and the last error; an unmount ends cleanly; with the store back,
  the daemon's passes upload the backlog.
- Credentials revoked while mounted: the same EIO, saying so; uploads held.
- Commands with the store down: status and points answer, check/gc/info fail with one
  line, verify does not call what it could not read verified.
- A daemon SIGKILLed during an upload (before its PUT, after it, in the middle of it):
  the next mount finishes it, and the bucket holds exactly the packs the index names.
- Refused credentials, a missing bucket, an endpoint that is not S3 or nothing at all:
  `init --store` and `mount` fail with one clear line, and init makes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    MiB,
    armed,
    assert_check_clean,
    assert_one_line_error,
    assert_same_bytes,
    pid_alive,
    point_image,
    wait_pid_exit,
)
from s3helpers import (
    bucket_packs,
    image,
    pwrite_all,
    random_writes,
    status,
    stored_packs,
    wait_uploaded,
)
from s3server import Identity, free_ports

from rpfs.store.format import pack_name
from rpfs.store.tiered import DOWN_QUIET

RETRY = 5.0  # --s3-retry of every repository here (the s3_repo fixture's too)


def init(rpfs, s3_server, *options: str, endpoint: str | None = None,
         bucket: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`rpfs init --store` on the server's bucket (prefix repo/), retried for RETRY s."""
    return rpfs("init", "--store", f"s3://{bucket or s3_server.bucket}/repo",
                "--s3-endpoint", endpoint or s3_server.endpoint, "--s3-retry", f"{RETRY:g}s",
                *options, check=check)


def direct_read(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` read with O_DIRECT: past the page cache, into the
    daemon (an aligned buffer, as O_DIRECT wants)."""
    import mmap

    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


@contextlib.contextmanager
def frozen(s3_server, freeze: bool = True) -> Iterator[None]:
    """The server paused (a store that never answers) for the block, if `freeze`."""
    if not freeze:
        yield
        return
    s3_server.pause()
    try:
        yield
    finally:
        s3_server.resume()


def log_since(repo: Path, start: int) -> str:
    return (repo / "rpfs.log").read_bytes()[start:].decode(errors="replace")


# -- reads of uncached data --------------------------------------------------------------


def uncached_point(rpfs, repo: Path, s3_server, mount, tmp_path: Path
                   ) -> tuple[Path, bytes, int]:
    """A point of 32 MiB in a repository with a 4 MiB cache, uploaded and mounted: its
    bytes are in the store only (its whole-pack copy did not fit the cache). Its first
    MiB is read once (through a GET); (its image, its bytes, the daemon's pid)."""
    rpfs.env.update(s3_server.env())
    init(rpfs, s3_server, "--cache-size", "4M", check=True)
    src = tmp_path / "v1.raw"
    image(src, random.Random(31), 32 * MiB)
    rpfs("capture", "web01", src, "--name", "p1", check=True)
    rpfs("store", "sync", "--wait", check=True)
    assert not list((repo / "packs").iterdir())
    want = src.read_bytes()
    mnt, _ = mount()
    img = point_image(mnt, "web01", "p1")
    assert direct_read(img, 0, MiB) == want[:MiB]  # through a GET
    assert status(rpfs)["gets"] > 0
    return img, want, mount.daemon_pid()


UNCACHED = 26 * MiB  # data in the store only (not the zero hole image() leaves at 16-24)


def failed_read(img: Path, fault: str) -> float:
    """`dd iflag=direct` of a MiB at UNCACHED, which must fail with EIO and write
    nothing; its seconds."""
    t0 = time.monotonic()
    res = subprocess.run(["dd", f"if={img}", "of=/dev/stdout", "bs=1M",
                          f"skip={UNCACHED // MiB}", "count=1", "iflag=direct"],
                         capture_output=True, timeout=120)
    took = time.monotonic() - t0
    err = res.stderr.decode(errors="replace")
    print(f"{fault}: dd exited {res.returncode} after {took:.1f} s (retry bound "
          f"{RETRY:g} s): {err.splitlines()[0] if err else ''}")
    assert res.returncode != 0 and os.strerror(errno.EIO) in err, err
    assert res.stdout == b"", f"dd wrote {len(res.stdout)} bytes of a failed read"
    return took


def eio_logged(repo: Path, start: int, *words: str) -> str:
    """The log line since `start` of a read failed with EIO; it names disk, point,
    block, pack and `words`."""
    text = log_since(repo, start)
    line = next((ln for ln in text.splitlines() if "read fails with EIO" in ln), None)
    assert line is not None, text
    for needle in ("disk web01", "point p1", "block ", "pack ", *words):
        assert needle in line, line
    return line


@pytest.mark.parametrize("fault", ["stop", "pause"])
def test_uncached_reads_fail_with_eio_in_the_bound_then_succeed(
        fault, rpfs, repo_dir, s3_server, mount, tmp_path):
    """With the store down a direct read of bytes only it holds fails with EIO within the
    bound, the daemon serves on and the log names disk, point, block and pack; with the
    store back the same read is exact, without a remount."""
    img, want, daemon = uncached_point(rpfs, repo_dir, s3_server, mount, tmp_path)
    log_start = (repo_dir / "rpfs.log").stat().st_size

    getattr(s3_server, fault)()
    took = failed_read(img, fault)
    assert took < 2 * RETRY, f"EIO after {took:.1f} s, bound {RETRY} s"
    assert pid_alive(daemon)
    segments = repo_dir / "cache" / "segments"
    assert not [p.name for p in segments.iterdir() if p.name.startswith(".")]
    eio_logged(repo_dir, log_start, "store unavailable")
    s = status(rpfs)  # status needs no store, and tells the truth
    assert s["pending_packs"] == 0 and s["stored_packs"] > 0, s

    getattr(s3_server, "start" if fault == "stop" else "resume")()
    time.sleep(DOWN_QUIET)  # the second after a failed GET in which reads fail at once
    assert direct_read(img, UNCACHED, MiB) == want[UNCACHED : UNCACHED + MiB]
    assert pid_alive(daemon)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert_same_bytes(img, (tmp_path / "v1.raw"))
    mount.cleanup()
    assert_check_clean(rpfs)


def test_credentials_revoked_while_mounted_fail_reads_and_hold_uploads(
        rpfs, repo_dir, s3_server, mount, tmp_path):
    """The daemon's key taken out of the server's identities (a restart with another
    key): reads of bytes only the store holds fail with EIO saying the store refused the
    credentials, a new capture stays pending with that error; the key back, both go
    through, without a remount."""
    img, want, daemon = uncached_point(rpfs, repo_dir, s3_server, mount, tmp_path)
    log_start = (repo_dir / "rpfs.log").stat().st_size
    good = s3_server.identity
    s3_server.stop()
    s3_server.identity = Identity("rpfs-other-key", "rpfs-other-secret")
    try:
        s3_server.start()
        failed_read(img, "revoked")
        assert pid_alive(daemon)
        eio_logged(repo_dir, log_start, "refused the credentials", "InvalidAccessKeyId")
        src = tmp_path / "v2.raw"
        image(src, random.Random(34), 8 * MiB)
        rpfs("capture", "db01", src, "--name", "p2", check=True)
        s = wait_status(rpfs, lambda s: s["last_error"], "failing")
        assert "refused the credentials" in s["last_error"] and s["pending_packs"] == 1, s
    finally:
        s3_server.stop()
        s3_server.identity = good
        s3_server.start()
    assert direct_read(img, UNCACHED, MiB) == want[UNCACHED : UNCACHED + MiB]
    assert wait_uploaded(rpfs)["last_error"] is None
    assert bucket_packs(s3_server) == stored_packs(repo_dir)
    assert_same_bytes(point_image(img.parent.parent.parent, "db01", "p2"), src)
    mount.cleanup()
    assert_check_clean(rpfs)


def test_commands_that_need_the_store_say_so_when_it_is_down(
        rpfs, repo_dir, s3_server, mount, tmp_path):
    """With the store stopped and no daemon: status and points answer from local state;
    check, gc and info (each LISTs the store) fail with one line saying the store does not
    answer (not an I/O error to look for in dmesg); verify reads nothing, says so and
    fails, recording no pack as verified; with the store back it verifies them sound."""
    uncached_point(rpfs, repo_dir, s3_server, mount, tmp_path)
    mount.cleanup()
    s3_server.stop()
    for args in (["store", "status"], ["points"]):
        t0 = time.monotonic()
        rpfs(*args, check=True)
        assert time.monotonic() - t0 < RETRY, f"rpfs {args} waited for the store"
    for command in ("check", "gc", "info"):
        line = assert_one_line_error(rpfs(command), "s3://", "store unavailable",
                                     "try again when the object store answers")
        print(f"{command}: {line}")
        assert "dmesg" not in line
    t0 = time.monotonic()
    res = rpfs("verify")
    took = time.monotonic() - t0
    print(f"verify with the store down: {took:.1f} s: {res.stdout.strip()}")
    assert res.returncode == 1, res.stdout
    assert took < 6 * RETRY, f"verify waited out the bound again and again: {took:.1f} s"
    assert "cannot be read now and are not verified" in res.stdout
    s3_server.start()
    report = json.loads(rpfs("verify", "--json").stdout)
    assert report["sound"] and report["unreadable"] == 0 and report["packs_verified"] == 1
    assert_check_clean(rpfs)


# -- a store that refuses, is not there, or is not S3 --------------------------------------


def test_refused_missing_or_wrong_stores_are_one_clear_error_at_init_and_mount(
        rpfs, repo_dir, s3_server, mount, tmp_path):
    """Each wrong store is one line naming what is wrong, a non-zero exit and nothing
    made (init) or nothing mounted (mount), within the retry bound; at mount, a store that
    does not answer at all (it did at init) is an outage: it mounts, with one warning."""
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    not_s3 = f"http://127.0.0.1:{s3_server.ports['master']}"  # weed's master: HTTP, not S3
    good = s3_server.env()
    cases = [  # (what, identity, endpoint, bucket, words of the error); "frozen": paused
        ("wrong secret", s3_server.wrong_secret, None, None,
         ["refused the credentials", "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"]),
        ("unknown key", s3_server.unknown_key, None, None,
         ["refused the credentials", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"]),
        ("missing bucket", None, None, "no-such-bucket",
         ["s3://no-such-bucket/repo", "no such bucket"]),
        ("not S3", None, not_s3, None, [not_s3, "does not answer as an S3 store"]),
        ("closed port", None, closed, None, [closed, "cannot be reached",
                                             "connection refused"]),
        ("frozen", None, None, None, ["cannot be reached", "no answer in time"]),
    ]
    for what, identity, endpoint, bucket, words in cases:
        rpfs.env.update(s3_server.env(identity))
        t0 = time.monotonic()
        with frozen(s3_server, what == "frozen"):
            res = init(rpfs, s3_server, endpoint=endpoint, bucket=bucket)
        took = time.monotonic() - t0
        line = assert_one_line_error(res, *words)
        print(f"init, {what}: {took:.1f} s: {line}")
        assert took < 2 * RETRY + 5, f"init, {what}: {took:.1f} s"
        assert not repo_dir.exists(), f"init, {what}: made {list(repo_dir.iterdir())}"

    rpfs.env.update(good)
    init(rpfs, s3_server, check=True)
    config_path = repo_dir / "rpfs.json"
    config = json.loads(config_path.read_text())
    mnt = tmp_path / "mnt"
    for what, identity, endpoint, bucket, words in cases:
        rpfs.env.update(s3_server.env(identity))
        store = {**config["store"]}
        if endpoint:
            store["endpoint"] = endpoint
        if bucket:
            store["url"] = f"s3://{bucket}/repo"
        config_path.write_text(json.dumps({**config, "store": store}))
        t0 = time.monotonic()
        with frozen(s3_server, what == "frozen"):
            _, res = mount(mnt, check=False)
        took = time.monotonic() - t0
        assert took < 2 * RETRY + 10, f"mount, {what}: {took:.1f} s"
        if what in ("closed port", "frozen"):
            # no answer from an endpoint that answered at init: an outage, so it serves
            # what is local, and says what will fail
            assert res.returncode == 0, res.stderr
            warned = [line for line in res.stderr.splitlines()
                      if line.startswith("rpfs: warning: ")]
            assert len(warned) == 1 and all(w in warned[0] for w in [*words, "EIO"]), \
                res.stderr
            print(f"mount, {what}: {took:.1f} s: {warned[0]}")
            rpfs("umount", mnt, check=True, timeout=90)
            continue
        line = assert_one_line_error(res, *words)
        print(f"mount, {what}: {took:.1f} s: {line}")
        assert not os.path.ismount(mnt)
    config_path.write_text(json.dumps(config))
    rpfs.env.update(good)
    mount(mnt)  # the right store: it mounts


# -- writes while the store is down --------------------------------------------------------


def wait_status(rpfs, ready, what: str, timeout: float = 60) -> dict:
    """`store status` polled until `ready(status)`; the status that was."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(rpfs)
        if ready(s):
            return s
        assert time.monotonic() < deadline, f"not {what} after {timeout} s: {s}"
        time.sleep(0.5)


def test_captures_and_snapshots_go_on_while_the_store_is_down_and_upload_after(
        rpfs, repo_dir, s3_server, mount, tmp_path):
    """The server stopped during a capture, then a clone written and snapshotted through
    the mount: all complete locally and read exact; `store status` shows the backlog,
    its warning past --backlog-warn, and the store's error; once the server is back the
    daemon's passes upload it all, and the bucket holds every pack the index stores."""
    rpfs.env.update(s3_server.env())
    init(rpfs, s3_server, "--backlog-warn", "1M", check=True)
    rng = random.Random(32)
    src1, src2 = tmp_path / "v1.raw", tmp_path / "v2.raw"
    image(src1, rng, 24 * MiB)
    image(src2, rng, 24 * MiB)
    rpfs("capture", "web01", src1, "--name", "p1", check=True)
    mnt, _ = mount()
    wait_uploaded(rpfs)
    rpfs("clone", "web01@p1", "c1", check=True)

    gate = tmp_path / "gate"  # the capture's pack writes wait while it exists
    gate.touch()
    before = set((repo_dir / "packs").iterdir())
    with armed(rpfs, pack_gate=gate):
        capture = rpfs.popen("capture", "web01", src2, "--name", "p2",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while set((repo_dir / "packs").iterdir()) == before:  # it is writing its pack
        assert capture.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    s3_server.stop()  # while it captures
    gate.unlink()
    _, err = capture.communicate(timeout=120)
    assert capture.returncode == 0, err
    clone = mnt / "disks" / "c1.img"
    plain = tmp_path / "c1.plain"
    plain.write_bytes(src1.read_bytes())
    pwrite_all(clone, plain, random_writes(rng, 30, within=24 * MiB))
    rpfs("snapshot", "c1", "--name", "s1", check=True)

    down = wait_status(rpfs, lambda s: s["last_error"] and s["pending_bytes"] > MiB,
                       "failing with a backlog")
    print("with the store down:", json.dumps(down))
    assert "store unavailable" in down["last_error"], down
    assert down["warning"] and "wait for upload" in down["warning"], down
    assert down["last_error"] in down["warning"]
    said = rpfs("store", "status", check=True)
    assert "store unavailable" in said.stdout, said.stdout
    assert said.stderr.startswith("rpfs: warning: ") and "wait for upload" in said.stderr
    assert "pending" in rpfs("points", check=True).stdout
    sync = rpfs("store", "sync", "--wait")  # on demand: the failure as one error line
    assert_one_line_error(sync, "upload stopped", "store unavailable", "stays pending")
    for disk, point, want in (("web01", "p1", src1), ("web01", "p2", src2),
                              ("c1", "s1", plain)):
        assert_same_bytes(point_image(mnt, disk, point), want)
    assert_same_bytes(clone, plain)

    # unmounted with the store down: the daemon ends cleanly (its last index checkpoint
    # stays local), and the next mount, with the store back, uploads the backlog
    daemon = mount.daemon_pid()
    log_start = (repo_dir / "rpfs.log").stat().st_size
    t0 = time.monotonic()
    res = rpfs("umount", mnt, timeout=120)
    print(f"unmounted with the store down in {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stderr
    assert wait_pid_exit(daemon, 3 * RETRY)
    text = log_since(repo_dir, log_start)
    assert "Traceback" not in text and "unmounted" in text, text
    t0 = time.monotonic()
    s3_server.start()
    mount(mnt)
    up = wait_uploaded(rpfs)
    print(f"backlog of {down['pending_bytes']} bytes uploaded "
          f"{time.monotonic() - t0:.1f} s after the start")
    assert up["last_error"] is None and up["warning"] is None, up
    assert not list((repo_dir / "packs").iterdir())
    assert bucket_packs(s3_server) == stored_packs(repo_dir)
    assert "pending" not in rpfs("points", check=True).stdout
    mount.cleanup()
    assert_check_clean(rpfs)


# -- SIGKILL during uploads ----------------------------------------------------------------


def pack_states(repo: Path) -> dict[int, str]:
    """Pack -> its store record's state ("uploading", "stored"), read from the index."""
    from rpfs.index import Index

    index = Index(repo / "index", copy=False)
    try:
        with index.read() as txn:
            return {p: r["state"] for p, r in index.pack_states(txn).items()}
    finally:
        index.close()


def bucket_objects(s3_server, prefix: str = "repo/") -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def killed_daemon(mount, mnt: Path, pid: int, timeout: float = 60) -> None:
    """Wait for the daemon `pid` to be gone (SIGKILLed by a hook or the test) and undo
    its dead FUSE connection."""
    assert wait_pid_exit(pid, timeout), f"daemon {pid} still alive after {timeout} s"
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.parametrize("moment", ["before_put", "mid_put", "after_put"])
def test_a_daemon_killed_during_an_upload_finishes_it_at_the_next_mount(
        moment, rpfs, s3_repo, s3_server, mount, tmp_path):
    """The daemon SIGKILLed as it uploads the second of three packs: after its
    "uploading" record and before the PUT, in the PUT (the store frozen, so it hangs
    there), or after the PUT and before the "stored" record. The next mount finishes it:
    every pack stored, nothing left pending, the bucket holds exactly the packs the index
    names (and rpfs.json and the index checkpoints), check clean, points exact."""
    repo = s3_repo
    rng = random.Random(33)
    sources = []
    for i in range(3):
        src = tmp_path / f"v{i}.raw"
        image(src, rng, 16 * MiB)
        sources.append(src)
    mnt = tmp_path / "mnt"
    if moment == "mid_put":
        rpfs("capture", "vm", sources[0], "--name", "p0", check=True)
        mount(mnt)
        wait_uploaded(rpfs)
        pid = mount.daemon_pid()
        s3_server.pause()
        try:
            for i in (1, 2):
                rpfs("capture", "vm", sources[i], "--name", f"p{i}", check=True)
            deadline = time.monotonic() + 30
            while "uploading" not in pack_states(repo).values():
                assert time.monotonic() < deadline, pack_states(repo)
                time.sleep(0.1)
            time.sleep(0.5)  # its PUT is on the wire, waiting for an answer
            os.kill(pid, signal.SIGKILL)  # the daemon this test mounted
            killed_daemon(mount, mnt, pid)
            t0 = time.monotonic()  # no daemon, the store frozen: status is local
            s = status(rpfs)
            assert time.monotonic() - t0 < RETRY, f"status took {time.monotonic() - t0} s"
            assert s["pending_packs"] == 2, s
        finally:
            s3_server.resume()
    else:
        for i, src in enumerate(sources):
            rpfs("capture", "vm", src, "--name", f"p{i}", check=True)
        with armed(rpfs, **{f"kill_{moment}": 2}):
            mount(mnt)
            pid = mount.daemon_pid()
        killed_daemon(mount, mnt, pid)
    states = pack_states(repo)
    parts = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket)
    print(f"{moment}: after the kill: {states}, in the bucket: "
          f"{sorted(bucket_packs(s3_server))}, multipart uploads left: "
          f"{[u['Key'] for u in parts.get('Uploads', [])]}")
    assert sorted(states.values()) == ["stored", "uploading"], states
    half = next(p for p, state in states.items() if state == "uploading")
    assert (repo / "packs" / pack_name(half)).exists()

    mount(mnt)
    wait_uploaded(rpfs)
    states = pack_states(repo)
    assert set(states.values()) == {"stored"} and len(states) == 3, states
    assert not list((repo / "packs").iterdir())
    assert bucket_packs(s3_server) == stored_packs(repo)
    others = {name for name in bucket_objects(s3_server) if not name.startswith("packs/")}
    assert all(name == "rpfs.json" or name.startswith("index/") for name in others), others
    for i, src in enumerate(sources):
        assert_same_bytes(point_image(mnt, "vm", f"p{i}"), src)
    mount.cleanup()
    assert_check_clean(rpfs)
