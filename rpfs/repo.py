"""The repository on disk: its layout, configuration, locks, index and chunk store.

    REPO/rpfs.json     format version, block size, hash and codec (written last by init)
    REPO/index/        LMDB environment (rpfs.index); it records block size, hash and codec too
    REPO/index-checkpoints/   recent consistent copies of the index (rpfs.checkpoint)
    REPO/packs/        NNNNNNNN.pack files (rpfs.store.local)
    REPO/locks/        fcntl locks: daemon.lock, disk-NAME.lock
    REPO/rpfs.log      the daemon's log
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import perms
from .errors import CorruptChunk, RpfsError
from .index import ChunkLoc, Index
from .lifecycle.trash import TRASH_DAYS
from .space import Space, parse_reserve
from .store.backend import PackBackend
from .store.format import decode_chunk, pack_name
from .store.local import LocalBackend, fsync_dir
from .store.packs import PackStore
from .store.s3 import S3Objects, StoreConfig, parse_url
from .store.tiered import TieredBackend

log = logging.getLogger(__name__)

# Format 2: the index has `gens`, `trash` and `policies` (point lifecycle). An rpfs that
# reads format 1 only would write extents that `gens` does not list (a purge would never
# drop them) and would not see the trash, so it must refuse the repository.
# Format 3: packs get records of codecs 2 and 3 (zstd frames with a content checksum,
# store/format.py), which an rpfs of format 2 cannot decode. Records written before stay
# as they are and read as before. rpfs.json says 3 from the first open by this rpfs on.
FORMAT = 3
READS = (1, 2, 3)  # formats 1 and 2 are upgraded at their first open
DEFAULT_REPO = "/var/lib/rpfs"
MIN_BLOCK, MAX_BLOCK = 4 << 10, 4 << 20
HASH, CODEC = "blake3", "zstd"
_PERCENT = re.compile(r"(\d+(\.\d+)?)%")
MAX_TRASH_DAYS = 36500  # a century: a deadline past it would not print (year 9999)
DAY = 86400
STORE_CONFIG = "rpfs.json"  # in the object store: the repository's config at init
MAX_INTERVAL = 366 * DAY
# The settings `rpfs config set` changes: rpfs.json key -> the command's name for it.
SETTINGS = {"trash_days": "trash-days", "gc_interval": "gc-interval",
            "verify_interval": "verify-interval"}


def pack_backend(root: Path, config: Config) -> PackBackend:
    """Where the packs of the repository at `root` are kept: the one place that says so.
    With a store: pending packs in REPO/packs, the read cache in REPO/cache, the rest in
    the bucket (store/tiered.py)."""
    if config.store is None:
        return LocalBackend(root / "packs")
    store = store_config(config)
    return TieredBackend(root, S3Objects(store), store.cache_size)


def store_config(config: Config) -> StoreConfig:
    assert config.store is not None
    return StoreConfig(**config.store)


def repo_path(arg: str | None) -> Path:
    """The repository named by -r/--repo, else $RPFS_REPO, else /var/lib/rpfs."""
    return Path(arg or os.environ.get("RPFS_REPO") or DEFAULT_REPO).absolute()


@dataclass(frozen=True)
class Config:
    block_size: int
    format: int = FORMAT
    hash: str = HASH
    codec: str = CODEC
    reserve: int | str | None = None  # free-space floor: bytes or "N%"; None: the default
    trash_days: int = TRASH_DAYS  # how long a deleted point can be undeleted; 0: no trash
    gc_interval: int = DAY  # seconds between the daemon's own gc runs; 0: never
    verify_interval: int = DAY  # seconds between the daemon's rolling verify turns; 0: never
    store: dict | None = None  # the object store holding the packs (s3.StoreConfig's fields)

    def recorded(self) -> dict:
        """What the index records of this config, at init, and must keep agreeing with:
        a point's blocks only read right with the block size, hash and codec that wrote
        them."""
        return {"block_size": self.block_size, "hash": self.hash, "codec": self.codec}


def _valid_block_size(v: object) -> bool:
    return type(v) is int and MIN_BLOCK <= v <= MAX_BLOCK and not v & (v - 1)


def _valid_reserve(v: object) -> bool:
    if v is None:  # the default (written as null by rpfs before the key was checked)
        return True
    if type(v) is int:
        return v >= 0
    match = _PERCENT.fullmatch(v) if type(v) is str else None
    return match is not None and float(match.group(1)) < 100


def _valid_trash_days(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_TRASH_DAYS


def _valid_interval(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_INTERVAL


def parse_trash_days(text: str) -> int:
    """`--trash-days N`, `config set trash-days N`: whole days, ASCII digits (int() takes
    other scripts' digits and '+1'); raises RpfsError."""
    if not re.fullmatch(r"[0-9]{1,6}", text) or not _valid_trash_days(int(text)):
        raise RpfsError(f"invalid trash-days {text!r}: give a whole number of days from 0 "
                        f"(no trash: a delete purges at once) to {MAX_TRASH_DAYS}")
    return int(text)


# key: (required, test, what the value must be); exact types: a bool is no int
_CONFIG_KEYS = {
    "format": (True, lambda v: type(v) is int, "an integer"),
    "block_size": (True, _valid_block_size,
                   f"a power of two from {MIN_BLOCK} to {MAX_BLOCK} (an integer)"),
    "hash": (True, lambda v: v == HASH, f'"{HASH}"'),
    "codec": (True, lambda v: v == CODEC, f'"{CODEC}"'),
    "reserve": (False, _valid_reserve,
                'a number of bytes >= 0, a string "N%" with N < 100, or null'),
    "trash_days": (False, _valid_trash_days, f"an integer from 0 to {MAX_TRASH_DAYS}"),
    "gc_interval": (False, lambda v: _valid_interval(v), f"seconds from 0 to {MAX_INTERVAL}"),
    "verify_interval": (False, lambda v: _valid_interval(v),
                        f"seconds from 0 to {MAX_INTERVAL}"),
    "store": (False, lambda v: _valid_store(v),
              'null or {"url": "s3://BUCKET/PREFIX", "endpoint": URL or null, "region": '
              'NAME or null, "cache_size": bytes > 0, "retry_seconds": seconds > 0, '
              '"backlog_warn": bytes >= 0, "grace_seconds": seconds >= 0}'),
}


def _valid_store(v: object) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict) or set(v) - set(StoreConfig.__dataclass_fields__):
        return False
    try:
        parse_url(v.get("url"))  # type: ignore[arg-type]
    except (RpfsError, TypeError):
        return False
    size, retry = v.get("cache_size", 1), v.get("retry_seconds", 1)
    warn, grace = v.get("backlog_warn", 1), v.get("grace_seconds", 0)
    return (all(type(v.get(k)) in (str, type(None)) for k in ("endpoint", "region"))
            and type(size) is int and size > 0 and type(warn) is int and warn >= 0
            and type(retry) in (int, float) and retry > 0
            and type(grace) in (int, float) and 0 <= grace < float("inf"))


def load_config(root: Path) -> Config:
    """rpfs.json, checked strictly: a JSON object with known keys of exact types.

    RpfsError names the file and the first bad key; for a key the index records, it
    says the value to put back when the index can tell.
    """
    path = root / "rpfs.json"
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RpfsError(
            f"no rpfs repository at {root}: run 'rpfs init' or pass -r/--repo "
            "(or set RPFS_REPO)"
        ) from None
    except OSError as exc:
        raise RpfsError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError
        raise RpfsError(f"{path} is not valid JSON ({exc}){_put_back(root, None)}") from None
    if not isinstance(raw, dict):
        raise RpfsError(f"{path} must hold a JSON object, not {type(raw).__name__}"
                        f"{_put_back(root, None)}")
    for key in raw:
        if key not in _CONFIG_KEYS:
            raise RpfsError(f"{path}: unknown key {key!r} (known: {', '.join(_CONFIG_KEYS)}); "
                            "remove it")
    for key, (required, valid, what) in _CONFIG_KEYS.items():
        if key not in raw:
            if required:
                raise RpfsError(f"{path}: key {key!r} is missing{_put_back(root, key)}")
            continue
        if not valid(raw[key]):
            raise RpfsError(f"{path}: {key!r} must be {what}, not {json.dumps(raw[key])}"
                            f"{_put_back(root, key)}")
    if raw["format"] not in READS:
        raise RpfsError(f"{root} has repository format {raw['format']} ({path}), this rpfs "
                        f"reads formats {READS[0]} to {READS[-1]}: use a newer rpfs")
    return Config(**raw)


def _put_back(root: Path, key: str | None) -> str:
    """The end of a bad-config message: what to write instead (the index records the
    block size, hash and codec, so it can tell those when it opens)."""
    if key == "format":
        return f'; put back "format": {FORMAT}'
    if key in ("reserve", *SETTINGS):
        return "; fix it, or remove it to get the default"
    recorded = None
    with contextlib.suppress(RpfsError):
        index = Index(root / "index")
        recorded = index.recorded
        index.close()
    if recorded is not None and key in recorded:
        return f"; the index records {json.dumps({key: recorded[key]})[1:-1]}: put that back"
    if recorded is not None and key is None:
        values = json.dumps({"format": FORMAT, **recorded})
        return f"; rpfs.json was probably edited: put back {values}"
    return "; rpfs.json was probably edited: put back what 'rpfs init' wrote"


class Repository:
    """An open repository. Cheap to open; safe to use from several threads."""

    def __init__(self, root: Path, *, readonly: bool = False) -> None:
        """Open the repository at `root`. `readonly`: change nothing there, not even what
        an open otherwise brings up to date (the index's missing databases, the config
        record, the format): for the far side of a pull (`rpfs serve`), which only
        reads."""
        self.root = root
        self.readonly = readonly
        self.config = load_config(root)
        perms.check_owner(root)
        self.block_size = self.config.block_size
        self.index = Index(root / "index", readonly=readonly)
        self.store = PackStore(pack_backend(root, self.config), self.block_size)
        self.space = Space(root, self.config.reserve)
        try:
            self._check_recorded()
            if self.config.format < FORMAT and not readonly:
                self._upgrade()
        except BaseException:
            self.close()
            raise

    def _upgrade(self) -> None:
        """Say format 3 in rpfs.json once the index opened cleanly (its open added format
        2's databases), before anything writes a record: an older rpfs then refuses the
        repository instead of writing extents that the lifecycle's `gens` would not list
        (format 1) or failing to decode records of codecs 2 and 3 (format 2). Nothing
        else changes: a format 1 repository is a format 2 one without those databases,
        and a format 2 one a format 3 one with legacy records only. (A damaged index or
        rpfs.json fails before this, and leaves rpfs.json as it was.)"""
        self.config = replace(self.config, format=FORMAT)
        _write_config(self.root, self.config)
        log.info("%s: repository format %d now (rpfs older than checked pack records "
                 "cannot open it)", self.root, FORMAT)

    def _check_recorded(self) -> None:
        """rpfs.json must agree with what the index recorded at init."""
        want, have = self.config.recorded(), self.index.recorded
        if have is None:
            if not self.readonly:
                self._record_config(want)
            return
        wrong = [key for key in want if have.get(key) != want[key]]
        if wrong:
            says = ", ".join(f"{key} {json.dumps(want[key])}" for key in wrong)
            back = json.dumps({key: have.get(key) for key in wrong})[1:-1]
            raise RpfsError(
                f"{self.root / 'rpfs.json'} says {says} but the index was made with {back}: "
                f"rpfs.json was probably edited; put back {back} (a repository's block size, "
                "hash and codec never change); nothing was read or written"
            )

    def _record_config(self, want: dict) -> None:
        """Record the config in an index made before the index held it (format 1 all the
        same, so no format change).

        Whichever command opens such a repository first does it, reader or writer: every
        open already runs a write transaction (to open the databases), and the sooner the
        record exists the sooner an edit of rpfs.json is caught. An edit made before that
        moment is caught by the size of a stored block, checked first.
        """
        stored = self._stored_block_size()
        if stored is not None and stored != want["block_size"]:
            raise RpfsError(
                f"{self.root / 'rpfs.json'} says block_size {want['block_size']} but the "
                f"stored blocks are {stored} bytes; rpfs.json was probably edited: put back "
                f"\"block_size\": {stored}; nothing was read or written"
            )
        self.index.record_config(want)
        log.info("%s: recorded block size, hash and codec in the index", self.root)

    def _stored_block_size(self) -> int | None:
        """The size of one stored block (all are full blocks), None if there is none or
        it cannot be read."""
        with self.index.read() as txn:
            first = next(self.index.iter_chunks(txn), None)
        if first is None:
            return None
        digest, loc = first
        where = (pack_name(loc.pack), loc.offset)
        try:
            record = self.store.backend.read(loc.pack, loc.offset, loc.length)
            return len(decode_chunk(record, digest, MAX_BLOCK, where))
        except (OSError, CorruptChunk) as exc:
            log.warning("%s: cannot check the block size against pack %s: %s",
                        self.root, where[0], exc)
            return None

    def check_store(self) -> None:
        """With a store: that it answers as S3, has the bucket and takes our credentials
        (StoreRefused says which is wrong); nothing for a local repository."""
        backend = self.store.backend
        if isinstance(backend, TieredBackend):
            backend.objects.check()

    def set_setting(self, key: str, value: int) -> None:
        """Change one of SETTINGS (rpfs.json, atomically). A daemon sees it at once because
        this runs in the daemon when one serves (a control operation), not in a CLI
        process writing the file behind its back. A new trash period applies to the
        points already in the trash too: their purge time is always deleted_at + the
        period."""
        if key not in SETTINGS:
            raise RpfsError(f"unknown setting {key!r} (known: {', '.join(SETTINGS.values())})")
        _, valid, what = _CONFIG_KEYS[key]
        if not valid(value):
            raise RpfsError(f"invalid {SETTINGS[key]} {value!r}: {what}; nothing was changed")
        config = replace(self.config, **{key: value})
        _write_config(self.root, config)
        self.config = config  # one assignment: a reading thread sees the old or the new
        log.info("%s: %s set to %d", self.root, SETTINGS[key], value)

    @classmethod
    def init(
        cls, root: Path, block_size: int, reserve: int | str | None = None,
        trash_days: int = TRASH_DAYS, store: StoreConfig | None = None,
    ) -> Repository:
        """Create a repository at `root`, which must be missing or an empty directory;
        with `store`, its packs go to that object store, which must answer, accept our
        credentials and hold no repository yet (checked before anything is made)."""
        if not _valid_block_size(block_size):
            raise RpfsError(
                f"invalid block size {block_size}: use a power of two from 4K to 4M"
            )
        reserve = parse_reserve(reserve)
        if (root / "rpfs.json").exists():
            raise RpfsError(f"{root} is already an rpfs repository; nothing was changed")
        if root.is_dir():
            perms.check_owner(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RpfsError(
                f"{root} exists and is not an empty directory; choose another path"
            )
        if not _valid_trash_days(trash_days):
            raise RpfsError(f"invalid trash-days {trash_days}: from 0 to {MAX_TRASH_DAYS}")
        objects = None
        if store is not None:
            objects = S3Objects(store)
            objects.check()
            if objects.list(STORE_CONFIG):
                raise RpfsError(f"{store.url} already holds an rpfs repository: recover it "
                                "with 'rpfs init --from-store', or choose another prefix")
        root.mkdir(mode=perms.DIR_MODE, parents=True, exist_ok=True)
        for sub in ("index", "packs", "locks"):
            (root / sub).mkdir(mode=perms.DIR_MODE, exist_ok=True)
        config = Config(block_size=block_size, reserve=reserve, trash_days=trash_days,
                        store=None if store is None else asdict(store))
        Index(root / "index", create=config.recorded()).close()
        if objects is not None:  # the bucket says what its packs are (init --from-store)
            objects.put(STORE_CONFIG, config_bytes(config))
        _write_config(root, config)
        perms.enforce(root)  # an existing directory, or a umask that took bits away
        return cls(root)

    def close(self) -> None:
        self.store.close()
        self.index.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def locate(self, digest: bytes) -> ChunkLoc | None:
        """Where chunk `digest` is now (a fresh read of the index), None if not stored."""
        with self.index.read() as txn:
            return self.index.get_chunk(txn, digest)

    def allocate_pack(self) -> int:
        """A fresh pack id, committed at once so no other writer can take it."""
        with self.index.write() as txn:
            return self.index.next_id(txn, "pack")

    # -- locks ----------------------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def lock_disk(
        self, disk: str, holder: str = "a capture of it runs, or a daemon has it open"
    ) -> int:
        """Take a disk's exclusive lock; returns the fd that holds it (close to release)."""
        fd = _try_lock(self._lock_path(f"disk-{disk}"))
        if fd is None:
            raise RpfsError(f"disk {disk} is busy: {holder}; wait for it to finish")
        return fd

    @contextlib.contextmanager
    def disk_lock(self, disk: str) -> Iterator[None]:
        """Exclusive right to change a disk (capture, snapshot, rollback, open for writing)."""
        fd = self.lock_disk(disk)
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """One gc at a time, in any process (two would compact the same packs)."""
        fd = _try_lock(self._lock_path("gc"))
        if fd is None:
            raise RpfsError("another gc of this repository is running; wait for it to finish")
        try:
            yield
        finally:
            os.close(fd)

    def disk_lock_free(self, disk: str) -> bool:
        """True if nobody holds the disk's lock (so a capture record of it is dead)."""
        try:
            with self.disk_lock(disk):
                return True
        except RpfsError:
            return False

    def daemon_lock(self) -> int:
        """Take the one-daemon-per-repository lock; returns the fd to keep open.

        The lock keeps the record of the last daemon until `record_daemon`: a daemon that
        fails to start leaves it alone, and with it what `rpfs umount` needs to clean up
        the mount that daemon left behind.
        """
        return _daemon_lock(self.root)

    @staticmethod
    def record_daemon(lock_fd: int, info: dict) -> None:
        """Write the running daemon's pid and mountpoint into its lock (see daemon_lock)."""
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, json.dumps(info).encode(), 0)


def config_bytes(config: Config) -> bytes:
    """rpfs.json's text for `config` (its unset keys left out)."""
    fields = {k: v for k, v in asdict(config).items() if v is not None}
    return (json.dumps(fields, indent=1) + "\n").encode()


def _write_config(root: Path, config: Config) -> None:
    """rpfs.json, whole or not at all (a temporary file, fsynced, renamed over it)."""
    tmp = root / "rpfs.json.tmp"
    tmp.unlink(missing_ok=True)  # left by a crash; touch() would keep its mode
    tmp.touch(mode=perms.FILE_MODE)
    tmp.write_bytes(config_bytes(config))
    with open(tmp) as f:
        os.fsync(f.fileno())
    tmp.rename(root / "rpfs.json")
    fsync_dir(root)  # the rename itself, durable


def _try_lock(path: Path) -> int | None:
    """An exclusive flock of `path` (created if missing): the fd that holds it, or None
    if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _daemon_lock(root: Path) -> int:
    fd = _try_lock(root / "locks" / "daemon.lock")
    if fd is None:
        other = read_daemon_info(root) or {}
        raise RpfsError(
            f"repository {root} is already served by rpfs daemon pid "
            f"{other.get('pid', '?')} at {other.get('mountpoint', '?')}; "
            "run 'rpfs umount' there first"
        )
    return fd


def lock_everything(root: Path) -> list[int]:
    """The daemon lock and every disk's lock, for a change of the whole index (`rpfs
    index restore`); the fds that hold them. RpfsError if a daemon serves the repository
    or a disk is busy (then nothing is held)."""
    fds = [_daemon_lock(root)]
    try:
        for path in sorted((root / "locks").glob("disk-*.lock")):
            fd = _try_lock(path)
            if fd is None:
                disk = path.name[len("disk-") : -len(".lock")]
                raise RpfsError(f"disk {disk} is busy (a capture of it runs, or it is open); "
                                "wait for it to finish")
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def read_daemon_info(root: Path) -> dict | None:
    """Pid and mountpoint of the daemon serving the repository at `root`, if one runs."""
    try:
        fd = os.open(root / "locks" / "daemon.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a daemon runs
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
        return None
    finally:
        os.close(fd)


def last_daemon_info(root: Path) -> dict:
    """What the last daemon of `root` wrote in its lock (pid, mountpoint), running or not:
    a daemon that was killed leaves it behind, and with it the mount it left dead."""
    try:
        return json.loads((root / "locks" / "daemon.lock").read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
