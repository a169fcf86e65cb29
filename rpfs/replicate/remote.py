"""The far side of a pull or push: `rpfs serve --stdio` started on another repository of
this host, or through ssh (or the `--rsh` command that replaces it), with its standard
input and output as the channel."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import RpfsError
from .stream import Reader, Writer


def far_command(location: str, rsh: str | None, remote_rpfs: str) -> list[str]:
    """The command that runs `rpfs serve --stdio` at `location`: a path on this host, or
    ssh://[USER@]HOST[:PORT]/PATH."""
    if not location.startswith("ssh://"):
        if rsh is not None:
            raise RpfsError("--rsh applies to ssh://HOST/PATH locations only")
        path = Path(location).absolute()
        return [sys.executable, "-m", "rpfs.cli", "-r", str(path), "serve", "--stdio"]
    url = urlsplit(location)
    if not url.hostname or not url.path or url.path == "/":
        raise RpfsError(f"bad location {location!r}: write ssh://[USER@]HOST[:PORT]/PATH")
    try:
        port = url.port
    except ValueError:
        raise RpfsError(f"bad port in {location!r}") from None
    host = f"{url.username}@{url.hostname}" if url.username else url.hostname
    remote = [*shlex.split(remote_rpfs), "-r", url.path, "serve", "--stdio"]
    return [*shlex.split(rsh or "ssh"), *(["-p", str(port)] if port else []), host,
            shlex.join(remote)]


class FarSide:
    """A running far side; its stderr is kept to explain its failure."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise RpfsError(f"cannot start {command[0]}: {exc.strerror}") from None
        self._err: list[bytes] = []
        self._drain = threading.Thread(target=self._read_err, daemon=True)
        self._drain.start()
        self.reader = Reader(self.proc.stdout, "the stream from the far side")
        self.writer = Writer(self.proc.stdin)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err.append(line)

    def why(self) -> str:
        """The far side's last words, once it has ended."""
        self.close()
        lines = [line.decode(errors="replace").strip() for line in self._err]
        lines = [line for line in lines if line]
        rc = self.proc.returncode
        said = f": {lines[-1]}" if lines else ""
        return f"the far side ({shlex.join(self.command[:3])} ...) exited {rc}{said}"

    def close(self) -> None:
        """End our side of the channel, and wait for the far side to end (it ends at the
        end of its input); one that does not within a minute is killed."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)


@contextlib.contextmanager
def far_side(location: str, rsh: str | None, remote_rpfs: str) -> Iterator[FarSide]:
    far = FarSide(far_command(location, rsh, remote_rpfs))
    try:
        yield far
    except (RpfsError, OSError) as exc:
        if far.proc.poll() is not None or isinstance(exc, BrokenPipeError):  # it ended
            raise RpfsError(f"{exc}; {far.why()}") from None
        raise
    finally:
        far.close()
