"""NBD figures: rpfs's exports (`rpfs serve --nbd`: the second point, and a hydrated clone
of it) beside qemu-nbd serving the raw image (`raw`) and a qcow2 chain (`qemu`: a base
of the first version and an overlay holding the churned regions), each read with
nbdcopy (sequential, to `null:`) and with fio's nbd engine (4 KiB random reads, qd1 and
qd16). The FUSE figures of the same images are the seq_read_* and rand4k_* rows.
"""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .measure import MB, BenchError, drop_caches, fio, run, timed, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .runner import Bench

NBD_METRICS = ["nbd_seq_read_MBps", "nbd_rand4k_qd1_iops", "nbd_rand4k_qd1_mean_us",
               "nbd_rand4k_qd16_iops"]
NBD_CLONE_METRICS = ["nbd_clone_seq_read_MBps", "nbd_clone_rand4k_qd1_iops",
                     "nbd_clone_rand4k_qd16_iops"]
START_TIMEOUT = 60.0


def uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@contextmanager
def server(cmd: list[str | Path], sock: Path, log: Path) -> Iterator[None]:
    """Run an NBD server (`cmd`, listening at `sock`) for the block; always stopped."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: sock.exists() or proc.poll() is not None, START_TIMEOUT) \
                or proc.poll() is not None:
            raise BenchError(f"{Path(str(cmd[0])).name} did not listen at {sock}; see {log}")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nbd_reads(bench: Bench, system: str, export: str, prefix: str, random: bool = True
              ) -> None:
    """Sequential (nbdcopy) and, if `random`, fio 4 KiB random reads of `export`."""
    opts, r = bench.opts, bench.results
    bench.say(f"{system}: nbdcopy of {export.split('?')[0]}, {opts.runs} runs")
    seq = []
    for _ in range(opts.runs):
        drop_caches()
        seq.append(opts.size / MB / timed(["nbdcopy", export, "null:"]))
    r.add(system, f"{prefix}_seq_read_MBps", seq)
    if not random:
        return
    bench.say(f"{system}: fio (nbd engine) 4k random reads, qd1 and qd16, "
              f"{opts.runs} × {opts.fio_runtime:g}s")
    qd1, qd16 = [], []
    for _ in range(opts.runs):
        drop_caches()
        qd1.append(fio(export, "randread", opts.fio_runtime, 1))
    for _ in range(opts.runs):
        drop_caches()
        qd16.append(fio(export, "randread", opts.fio_runtime, 16))
    r.add(system, f"{prefix}_rand4k_qd1_iops", [x.iops for x in qd1])
    if prefix == "nbd":
        r.add(system, f"{prefix}_rand4k_qd1_mean_us", [x.mean_us for x in qd1])
    r.add(system, f"{prefix}_rand4k_qd16_iops", [x.iops for x in qd16])


def bench_nbd(bench: Bench) -> None:
    from .runner import DISK, churn_writes

    sample = bench.sample
    assert sample is not None
    repo = bench.work / "rpfs-repo"  # bench_rpfs's: the points p1 and p2
    sock = bench.work / "rpfs-nbd.sock"
    with server([*bench.rpfs_cmd, "-r", repo, "serve", "--nbd", f"unix:{sock}"], sock,
                bench.work / "rpfs-serve.log"):
        nbd_reads(bench, "rpfs", uri(sock, f"points/{DISK}/p2"), "nbd")
        bench.rpfs("-r", repo, "clone", f"{DISK}@p2", "nbdclone")
        bench.rpfs("-r", repo, "hydrate", "nbdclone")
        copy = bench.work / "nbdclone.raw"
        run(["nbdcopy", uri(sock, "disks/nbdclone"), copy])
        same = run(["cmp", copy, sample.churned], check=False)
        copy.unlink()
        if same.returncode != 0:
            bench.results.note("rpfs nbd: CONTENT MISMATCH between the clone over NBD and "
                               f"its point: {same.stdout.strip() or same.stderr.strip()}")
        nbd_reads(bench, "rpfs", uri(sock, "disks/nbdclone"), "nbd_clone")
        bench.rpfs("-r", repo, "disk", "delete", "nbdclone", "--with-points")

    qsock = bench.work / "qemu-nbd.sock"
    qemu_nbd = ["qemu-nbd", "--read-only", "--persistent", "--shared=16", f"--socket={qsock}"]
    with server([*qemu_nbd, "--format=raw", sample.churned], qsock,
                bench.work / "qemu-nbd-raw.log"):
        nbd_reads(bench, "raw", uri(qsock), "nbd")
    qsock.unlink(missing_ok=True)
    qdir = bench.work / "qemu-nbd"
    qdir.mkdir(exist_ok=True)
    base, overlay = qdir / "base.qcow2", qdir / "overlay.qcow2"
    bench.say("qemu: building a qcow2 chain (base + overlay of the churned regions)")
    t = time.perf_counter()
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", sample.base, base])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
    run(["qemu-io", "-f", "qcow2", overlay,
         *churn_writes(sample, qdir / "churn", compressed=False)])
    bench.say(f"qemu: chain built in {time.perf_counter() - t:.1f}s")
    with server([*qemu_nbd, "--format=qcow2", overlay], qsock,
                bench.work / "qemu-nbd-qcow2.log"):
        nbd_reads(bench, "qemu", uri(qsock), "nbd")
