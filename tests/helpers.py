"""Helpers shared by the tests: source images, checksums, process and mount bookkeeping.

Everything here is plain functions; the fixtures that use them live in conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from rpfs.index import MAX_GEN, Index, decode_extent_key

MiB = 1 << 20
BS = 64 << 10  # the repository's default block size
# An incompressible block's pack record: the 41-byte header and its zstd frame, which
# holds the bytes as raw blocks (14 bytes of frame: store/format.py).
RAW_RECORD = BS + 41 + 14


# -- files and checksums -------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def sha256sum(path: Path) -> str:
    """The checksum by the real tool (`sha256sum`), as an operator would take it."""
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def cmp_files(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)


def assert_same_bytes(a: Path, b: Path) -> None:
    res = cmp_files(a, b)
    assert res.returncode == 0, f"cmp {a} {b}: {res.stdout}{res.stderr}"


def write_random(path: Path, size: int, seed: int | None = None, piece: int = 4 * MiB) -> None:
    """`size` bytes of random data: seeded (reproducible) or os.urandom (fast)."""
    rng = random.Random(seed) if seed is not None else None
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(piece, left)
            f.write(rng.randbytes(n) if rng else os.urandom(n))
            left -= n


def churn(path: Path, rng: random.Random, pieces: int, size: int = 4 * MiB) -> None:
    """Overwrite `pieces` pieces of `size` bytes at random 64 KiB-aligned offsets of the
    file with fresh random data (a history's next state)."""
    with open(path, "r+b") as f:
        total = f.seek(0, 2)
        for _ in range(pieces):
            f.seek(rng.randrange(0, total - size) // 65536 * 65536)
            f.write(rng.randbytes(size))


def sparse_copy(src: Path, dst: Path) -> None:
    """A copy of `src` that keeps its holes (the state of a source at a capture)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- ext4 images ---------------------------------------------------------------------------

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.\n"
)


def build_tree(root: Path, seed: int) -> dict[str, str]:
    """A deterministic folder of mixed files; returns {relative path: sha256}.

    Compressible text, seeded random binary, a duplicated file and a few subdirectories.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    files["README.txt"] = (LOREM * 200).encode()
    files["etc/config.ini"] = "".join(f"key{i} = value{i * 7}\n" for i in range(3000)).encode()
    files["var/log/syslog"] = "".join(
        f"Nov 22 06:{i % 60:02d}:00 host kernel: event {i} {LOREM[: i % 80]}\n"
        for i in range(20000)
    ).encode()
    files["data/random.bin"] = rng.randbytes(3 * MiB + 12345)
    files["data/small.bin"] = rng.randbytes(4096)
    files["data/copy-of-random.bin"] = files["data/random.bin"]  # a duplicated file
    files["home/user/notes.md"] = ("# notes\n" + LOREM * 30).encode()
    files["home/user/blob.dat"] = rng.randbytes(1 * MiB)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def tree_checksums(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `root` (lost+found skipped)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("lost+found") or not path.is_file():
            continue
        out[rel] = sha256_file(path)
    return out


def make_ext4(tree: Path, image: Path, size: int) -> None:
    """A `size`-byte ext4 image holding `tree`, built without root mounts (mkfs -d)."""
    image.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", str(size), str(image)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )


def debugfs_write(image: Path, commands: list[str]) -> None:
    """Change an ext4 image in place with `debugfs -w`; fails loudly if debugfs complains."""
    res = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    errors = [
        line for line in res.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")
    ]
    assert not errors, f"debugfs reported: {errors}"


def e2fsck_clean(image: Path) -> None:
    res = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert res.returncode == 0, f"e2fsck -fn {image}: rc {res.returncode}\n{res.stdout}{res.stderr}"


def qemu_identical(a: Path, b: Path) -> None:
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"qemu-img compare: {res.stdout}{res.stderr}"
    assert "Images are identical" in res.stdout


def _loop_devices_of(image: Path) -> list[str]:
    res = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    return [line.split(":", 1)[0] for line in res.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def loop_mount(image: Path, where: Path) -> Iterator[Path]:
    """`mount -o loop,ro image where`; always unmounted (and its loop device freed)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-o", "loop,ro", str(image), str(where)], check=True, capture_output=True
    )
    try:
        yield where
    finally:
        res = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if res.returncode != 0 and os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        for dev in _loop_devices_of(image):
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def fio_errors(report: dict) -> list[str]:
    """The errors a `fio --output-format=json` report names (a failed job, I/O or verify
    errors); empty when fio found none."""
    errors = []
    for job in report["jobs"]:
        if job.get("error"):
            errors.append(f"job {job['jobname']}: error {job['error']}")
        for key in ("total_err", "verify_errors"):
            if job.get(key):
                errors.append(f"job {job['jobname']}: {key} {job[key]}")
    return errors


# -- processes and mounts ------------------------------------------------------------------

FAULTS = Path(__file__).parent / "faults"  # sitecustomize.py: the fault hooks


@contextlib.contextmanager
def armed(rpfs, **hooks: object) -> Iterator[None]:
    """rpfs processes `rpfs` starts meanwhile carry the fault hooks `hooks` (each
    RPFS_TEST_<NAME>, tests/faults/sitecustomize.py): start a daemon inside, run the
    commands that must not carry them outside."""
    saved = dict(rpfs.env)
    path = os.environ.get("PYTHONPATH", "")
    rpfs.env.update(PYTHONPATH=f"{FAULTS}:{path}" if path else str(FAULTS),
                    **{f"RPFS_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
    try:
        yield
    finally:
        rpfs.env.clear()
        rpfs.env.update(saved)



def pid_alive(pid: int) -> bool:
    """True if a thread of `pid` runs (a zombie counts as exited). Every thread counts: a
    SIGKILLed daemon's main thread is a zombie before its other threads have exited, and
    until they have, its files (the daemon lock, the control socket) are still open."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return True
    return False


def wait_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def unescape_mount_field(field: str) -> str:
    """/proc/mounts and mountinfo write space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_fuse_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/mounts") as f:
        return any(
            unescape_mount_field(line.split()[1]) == target and "fuse" in line.split()[2]
            for line in f
        )


def mount_bdi(mountpoint: Path) -> str | None:
    """MAJ:MIN of the filesystem mounted at `mountpoint` (its /sys/class/bdi name)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape_mount_field(fields[4]) == str(mountpoint):
                found = fields[2]
    return found


def dir_size(path: Path) -> int:
    """Bytes allocated on disk under `path` (`du -sb --apparent-size` would hide holes)."""
    res = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[0])


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def disks_by_name(rpfs) -> dict[str, dict]:
    """`rpfs disks --json` by disk name."""
    out = json.loads(rpfs("disks", "--json", check=True).stdout)
    assert isinstance(out, list)
    return {d["name"]: d for d in out}


def local_files(repo: Path) -> set[str]:
    """The writable disks' local files, REPO/disks/*.raw."""
    folder = repo / "disks"
    return {p.name for p in folder.glob("*.raw")} if folder.is_dir() else set()


def point_image(mnt: Path, disk: str, point: str) -> Path:
    """The path of a point's image in the mount."""
    return mnt / "points" / disk / f"{point}.img"


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused command: non-zero exit, exactly one line `rpfs: error: ...` on stderr,
    containing every needle; returns that line."""
    assert res.returncode != 0, f"expected failure, got rc 0: {res.stdout}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("rpfs: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_check_clean(rpfs) -> dict:
    """`rpfs check` finds no inconsistency (what crashes leave is only reclaimable); its
    report."""
    res = rpfs("check", "--json", timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["problems"] == [], report["problems"]
    return report


# -- the index ------------------------------------------------------------------------------


def unread_extents(index: Index) -> list[str]:
    """Extents no reader reads, and lineages nothing reads, by a full scan: the survivor
    rule checked independently of purge's incremental search."""
    out = []
    with index.read() as txn:
        lineages = index.list_lineages(txn)
        readers: dict[int, set[int]] = {lin.id: set() for lin in lineages}
        for point in index.list_points(txn):
            readers[point.lineage].add(point.gen)
        for entry in index.list_trash(txn):
            readers[entry.point.lineage].add(entry.point.gen)
        for disk in index.list_disks(txn):
            readers[disk.lineage].add(MAX_GEN)
        for lin in lineages:
            if lin.parent is not None:
                readers[lin.parent].add(lin.parent_gen)
        for lin in lineages:
            if not readers[lin.id]:
                out.append(f"lineage {lin.id} has no reader")
            extents = [decode_extent_key(k) for k, _ in index._scan(
                txn, "extents", lin.id.to_bytes(8, "big"))]
            for i, (_, block, gen) in enumerate(extents):
                newer = extents[i - 1][2] if i and extents[i - 1][1] == block else MAX_GEN + 1
                if not any(gen <= r < newer for r in readers[lin.id]):
                    out.append(f"extent lineage {lin.id} block {block} gen {gen} unread")
    return out
