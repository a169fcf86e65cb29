"""`rpfs init --from-store`: a repository recovered from its object store alone.

The store holds the packs, `rpfs.json` as init wrote it, and the index checkpoints the
daemon pushed (checkpoint.push). Recovery takes the newest checkpoint that reads back
clean, into an empty folder, with the config the store holds (the endpoint and cache as
given now).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

from . import perms
from .checkpoint import REMOTE
from .errors import RpfsError
from .index import Index, IndexDamaged
from .repo import STORE_CONFIG, Config, Repository, _write_config
from .store.s3 import S3Objects, StoreConfig

log = logging.getLogger(__name__)


def recover(root: Path, store: StoreConfig) -> dict:
    """Make the repository at `root` (missing or empty) from `store`; what was found."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise RpfsError(f"{root} exists and is not an empty directory; recover into a new one")
    objects = S3Objects(store)
    objects.check()
    try:
        raw = json.loads(objects.get(STORE_CONFIG))
    except FileNotFoundError:
        raise RpfsError(f"{store.url} holds no rpfs repository (no {STORE_CONFIG})") from None
    config = replace(Config(**raw), store=asdict(store))
    names = sorted(objects.list(REMOTE), reverse=True)
    if not names:
        raise RpfsError(f"{store.url} holds no index checkpoint: nothing was uploaded "
                        "before the host was lost")
    root.mkdir(mode=perms.DIR_MODE, parents=True, exist_ok=True)
    for sub in ("index", "packs", "locks"):
        (root / sub).mkdir(mode=perms.DIR_MODE, exist_ok=True)
    skipped = []
    target = root / "index" / "data.mdb"
    for name in names:
        objects.download(name, target)
        os.chmod(target, 0o600)
        try:
            copy = Index(target, copy=True)
            try:
                copy.verify_records()
            finally:
                copy.close()
        except IndexDamaged as exc:
            skipped.append((name, exc.detail))
            continue
        break
    else:
        target.unlink(missing_ok=True)
        raise RpfsError(f"no index checkpoint in {store.url} reads back clean: "
                        + "; ".join(f"{n}: {p}" for n, p in skipped))
    _write_config(root, config)
    with Repository(root) as repo, repo.index.read() as txn:
        points = len(repo.index.list_points(txn))
    return {"store": store.url, "checkpoint": name[len(REMOTE):], "points": points,
            "disks": [], "skipped": skipped}
