"""Repository file modes: the repository is private to its owner.

The index names every disk and point and holds block hashes, the packs and local files
hold the disks' bytes, and the log names them all: nobody but the owner (root) may read
any of it. So the repository directory and every directory in it are 0700 and every other
file 0600, whatever the umask was when they were made. rpfs creates its files with those
modes; `enforce` checks the whole tree (at `rpfs init` and at daemon start) and corrects
what an older rpfs, a restore from backup or a careless `chmod` left.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from pathlib import Path

from .errors import RpfsError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def check_owner(root: Path) -> None:
    """RpfsError unless the repository directory is this process's user's.

    Its mode does not protect it from its owner, who may rename and replace anything in
    it: swap in an index or packs of their own, or make `rpfs.log` a symlink to a file
    of root's, which the daemon then appends to.
    """
    uid = os.stat(root).st_uid
    if uid != os.geteuid():
        raise RpfsError(
            f"{root} is owned by {_user(uid)}, not by {_user(os.geteuid())}, who runs rpfs: "
            "its owner could replace the repository's files; chown it or choose another"
        )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_log(root: Path) -> int:
    """An fd appending to REPO/rpfs.log, which is created 0600 if missing; never through
    a symlink (whoever made it would have root append to the file it names)."""
    path = root / "rpfs.log"
    try:
        return os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            FILE_MODE,
        )
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RpfsError(f"{path} is a symlink (to {os.readlink(path)}); rpfs logs only to a "
                        "file of its own: remove the symlink") from None


def enforce(root: Path) -> list[str]:
    """Make `root` and everything under it 0700 (directories) or 0600 (other files).

    One walk; only a wrong mode costs a chmod. Symlinks are neither followed nor changed
    (chmod would change their target, which may lie outside the repository). Each
    correction is logged as a warning; the messages are returned for the caller to relay.
    Entries that vanish during the walk (a pack being written, a lock file) are skipped.
    """
    corrected: list[str] = []

    def check(path: str, st: os.stat_result) -> None:
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
        have = stat.S_IMODE(st.st_mode)
        if have == want:
            return
        try:
            os.chmod(path, want)
        except FileNotFoundError:
            return
        except OSError as exc:  # not the owner, a read-only filesystem: say so, go on
            message = (f"cannot correct the mode of {path} ({have:04o}, should be "
                       f"{want:04o}): {exc.strerror}")
        else:
            message = f"corrected the mode of {path} from {have:04o} to {want:04o}"
        log.warning("%s", message)
        corrected.append(message)

    check(str(root), os.stat(root))  # the root may be a symlink to the real directory
    pending = [str(root)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_symlink():
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            check(entry.path, st)
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return corrected
