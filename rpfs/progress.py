"""Progress reporting for long work: a rich progress bar on a terminal, silence elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[ProgressFn]:
    """Yield a (done, total) callback that drives a bar on a terminal, else does nothing."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    # Imported here: the daemon and scripts never draw bars and need not carry rich.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
