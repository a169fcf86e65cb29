"""The deterministic sample disk: an ext4 image about 60 % used, and its churned twin.

Content: ext4's metadata plus files up to 60 % of the disk, split 25:20:10 between
compressible text, incompressible random data and duplicates of those files; the rest is
free space. The second point overwrites a seeded 5 % of the disk's 64 KiB regions with
random data. Everything
comes from one seed: the same size and seed give the same bytes, on any machine with the
same mke2fs (checked in tests by building twice).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
CHURN_REGION = 64 << 10
FIXED_TIME = 1_700_000_000  # file times and mke2fs's clock
FS_UUID = "5d1b2c3e-0f4a-4b6c-8d7e-9a0b1c2d3e4f"

# 256 characters with roughly English letter frequencies: text that zstd halves.
_TEXT_TABLE = bytes(
    (b"eeeeeeeeeeeeetttttttttaaaaaaaaoooooooiiiiiiinnnnnnnsssssshhhhhhrrrrrrddddlllll"
     b"ccccuuummmwwwffggyyppbbvkjxqz,.'-EETTAAOOIINNSSHHRR0123456789"
     b"                                                                    "
     b"\n\n\n\n\n\n\n\n" * 2)[:256]
)
assert len(_TEXT_TABLE) == 256

USED = 0.60  # of the disk, counting ext4's own metadata
SHARES = {"text": 25, "random": 20, "dup": 10}  # how the data part of that is split


@dataclass
class Sample:
    base: Path  # the first point's image
    churned: Path  # the second point's image: base with churn applied
    changed: Path  # JSON list of the churned extents, as `rpfs capture --changed` reads
    size: int
    files: int
    used_bytes: int
    churn_regions: int


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return b"".join(rng.randbytes(min(MiB, n - i)) for i in range(0, n, MiB))


def _text_bytes(rng: random.Random, n: int) -> bytes:
    return _random_bytes(rng, n).translate(_TEXT_TABLE)


def _file_sizes(rng: random.Random, budget: int) -> list[int]:
    sizes = []
    while budget >= MiB:
        s = min(budget, rng.choice((1, 2, 3, 4, 6, 8)) * MiB)
        sizes.append(s)
        budget -= s
    return sizes


def build_tree(tree: Path, data_bytes: int, seed: int) -> int:
    """Write about `data_bytes` of files under `tree`, the image's content; returns how many."""
    rng = random.Random(seed)
    total = sum(SHARES.values())
    budgets = {kind: data_bytes * share // total for kind, share in SHARES.items()}
    made: list[Path] = []
    for kind, make in (("text", _text_bytes), ("random", _random_bytes)):
        d = tree / kind
        for i, s in enumerate(_file_sizes(rng, budgets[kind])):
            sub = d / f"{i // 64:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            p = sub / f"{kind}-{i:05d}.{'txt' if kind == 'text' else 'bin'}"
            p.write_bytes(make(rng, s))
            made.append(p)
    dup_budget = budgets["dup"]
    dup_dir = tree / "dup"
    dup_dir.mkdir(parents=True, exist_ok=True)
    i = 0
    for src in rng.sample(made, len(made)):
        s = src.stat().st_size
        if s > dup_budget:
            continue
        shutil.copyfile(src, dup_dir / f"copy-{i:05d}-{src.name}")
        dup_budget -= s
        i += 1
    count = 0
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in [*files, *dirs]:
            os.utime(Path(root) / name, (FIXED_TIME, FIXED_TIME))
            count += name in files
    os.utime(tree, (FIXED_TIME, FIXED_TIME))
    return count


def make_ext4(image: Path, tree: Path, size: int) -> None:
    """An ext4 image of `size` bytes populated from `tree`, with fixed UUIDs and times."""
    with open(image, "wb") as f:
        f.truncate(size)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "rpfsbench", "-U", FS_UUID,
         "-E", f"hash_seed={FS_UUID},root_owner=0:0,nodiscard",
         "-d", str(tree), str(image)],
        check=True, env=env, stdin=subprocess.DEVNULL,
    )
    # mke2fs copies each inode's times from the source tree, whose ctime nobody can set and
    # whose atime reading moves: pin them all, so the image depends on the seed and size only.
    script = "".join(
        f"sif {'/' + str(p.relative_to(tree)) if p != tree else '/'} {field} {FIXED_TIME}\n"
        for p in sorted([tree, *tree.rglob("*")])
        for field in ("atime", "ctime", "mtime", "crtime")
    )
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)], input=script.encode(), check=True,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def used_bytes(image: Path) -> int:
    out = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in out.splitlines())
    )
    bs = int(fields["Block size"])
    return (int(fields["Block count"]) - int(fields["Free blocks"])) * bs


def churn_regions(size: int, seed: int, fraction: float = 0.05) -> list[int]:
    """Offsets of the 64 KiB regions the second point rewrites (sorted)."""
    n = size // CHURN_REGION
    rng = random.Random(f"churn-{seed}")
    return sorted(r * CHURN_REGION for r in rng.sample(range(n), max(1, round(n * fraction))))


def apply_churn(image: Path, size: int, seed: int) -> list[int]:
    rng = random.Random(f"churn-data-{seed}")
    offsets = churn_regions(size, seed)
    with open(image, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(rng.randbytes(CHURN_REGION))
    return offsets


def build_sample(workdir: Path, size: int, seed: int = 1) -> Sample:
    """Build base.img, churned.img and changed.json in `workdir` (which must exist)."""
    tree = workdir / "tree"
    tree.mkdir()
    base = workdir / "base.img"
    make_ext4(base, tree, size)  # empty: how much ext4 itself takes at this size
    files = build_tree(tree, max(0, int(size * USED) - used_bytes(base)), seed)
    make_ext4(base, tree, size)
    shutil.rmtree(tree)
    churned = workdir / "churned.img"
    shutil.copyfile(base, churned)
    offsets = apply_churn(churned, size, seed)
    changed = workdir / "changed.json"
    changed.write_text(json.dumps([{"start": o, "length": CHURN_REGION} for o in offsets]))
    return Sample(base, churned, changed, size, files, used_bytes(base), len(offsets))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()
