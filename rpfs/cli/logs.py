"""Where the `rpfs` daemon's log goes: REPO/rpfs.log and stderr, through handlers that
outlive a log they cannot write.

Its own room because both the daemon's start (`mount`) and its tests need the handlers,
and the command entry point (`main`) needs none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from ..perms import open_log


class _Unfailing(logging.Handler):
    """A log handler that outlives a log it cannot write (the log is on the repository's
    filesystem, which may be full): one line on stderr per outage instead of a
    '--- Logging error ---' traceback per message, and a count once it writes again.
    Stalled archives are also shown by `rpfs disks` and `rpfs points`."""

    lost = 0  # messages that could not be written since the last that could
    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        self.lost += 1
        if self.lost == 1:
            with contextlib.suppress(Exception):  # stderr may be that same full log
                sys.stderr.write(f"rpfs: cannot write the log: {sys.exc_info()[1]}; "
                                 "messages are lost until it can\n")
                sys.stderr.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.failed = False
        super().emit(record)  # the stream or file handler's
        if self.lost and not self.failed:
            lost, self.lost = self.lost, 0
            with contextlib.suppress(Exception):
                self.stream.write(f"rpfs: the log could not be written for {lost} message(s) "
                                  "before this one; some may be missing\n")
                self.flush()


class _StderrLog(_Unfailing, logging.StreamHandler):
    pass


def file_log(root: Path) -> logging.Handler:
    """The daemon's handler of REPO/rpfs.log: created 0600, and outliving a full disk."""
    return _StderrLog(os.fdopen(open_log(root), "a"))


def daemon_logging(root: Path, to_terminal: bool) -> None:
    """Log the daemon's messages with their times. Spawned by `rpfs mount`, its stderr
    already is the log file; in a terminal (`mount --foreground`), log to both."""
    handlers: list[logging.Handler] = [_StderrLog()]
    if to_terminal and root.is_dir():
        handlers.append(file_log(root))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
