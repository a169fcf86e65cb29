"""Time rpfs commands without Python's start-up: one long-lived process imports rpfs.cli
once, then runs `rpfs.cli.main(argv)` for each request and reports how long that took.

The bench uses it for the operations whose target is a fraction of a second (clone,
snapshot, rollback), where the interpreter's start-up and imports (about 0.2-0.3 s here,
reported as cli_startup_s) would otherwise be most of what is measured.

Protocol (one JSON document a line): the bench writes an argv list, this process answers
{"rc": int, "s": seconds, "out": str, "err": str}.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .measure import BenchError

SCRIPTS = str(Path(__file__).resolve().parents[1])


class CliTimer:
    """A child process serving timed `rpfs.cli.main` calls; stop it with close()."""

    def __init__(self, timeout: float = 600) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchlib.cli_timer"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (SCRIPTS, os.environ.get("PYTHONPATH")) if p)},
        )
        try:
            self.call("--version", check=False)  # imports done, and first-call costs paid
        except BenchError:
            self.close()
            raise

    def call(self, *argv: str | Path, check: bool = True) -> float:
        """Seconds `rpfs *argv` took inside main(); BenchError if it failed."""
        if self.proc.poll() is not None:
            raise BenchError(f"the rpfs timing process exited ({self.proc.returncode}): "
                             f"{self.proc.stderr.read().strip()[-300:]}")
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise BenchError(f"rpfs {' '.join(map(str, argv[:3]))}: no answer from the "
                             f"timing process in {self.timeout:.0f}s")
        reply = json.loads(line)
        if check and reply["rc"] != 0:
            words = (reply["err"].strip() or reply["out"].strip() or "no output").splitlines()
            raise BenchError(f"rpfs {' '.join(map(str, argv[:3]))} exited {reply['rc']}: "
                             f"{words[-1][:300]}")
        return reply["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    def __enter__(self) -> CliTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    from rpfs.cli.main import main as rpfs_main

    for line in sys.stdin:
        argv = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            t0 = time.perf_counter()
            try:
                rc = rpfs_main(argv)
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:
                rc = 1
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            elapsed = time.perf_counter() - t0
        reply = {"rc": rc or 0, "s": elapsed, "out": out.getvalue()[-4000:],
                 "err": err.getvalue()[-4000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
