"""One 32 MiB `write()` into an image, from a buffer whose pages were never touched or from
one whose every page was written first (issue 16: a single write from a freshly malloc'ed
buffer took 28.9 s on an rpfs clone against 0.14 s from a touched one, the kernel seeming
to hand it to the daemon in 4 KiB pieces).

Both buffers come from the C library's malloc, as a program's would: glibc serves 32 MiB
from a fresh private anonymous mapping and returns an address 16 bytes into it. That
offset matters: on an rpfs clone (kernel 6.18) a write from an untouched page-aligned
mapping took 0.07 s against 0.05 s touched, but from the same mapping 16 bytes in 2.2 s,
and from malloc's buffer 4.1 s; touched buffers took 0.04 s however aligned.

Each write runs in a helper process (`python -m benchlib.write32m PATH OFFSET MODE TAG`):
a write stuck in a FUSE filesystem cannot be interrupted from inside, but its process can
be killed, so a write over WRITE_LIMIT_S is stopped and reported as None. The helper times
the pwrite alone; its fsync comes after, outside the timed part. Then a sample of the
region is read back (O_DIRECT, or buffered with the page cache dropped) and compared with
what was written; before an untouched (all-zero) buffer is written, those sample pages
are given non-zero content, so that zeros there prove the write.
"""

from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from .measure import BenchError, can_open_direct, drop_caches

WRITE_SIZE = 32 << 20
WRITE_LIMIT_S = 120.0  # a write taking longer is stopped: its figure is null
START_TIMEOUT = 60.0  # the helper's start-up and pattern fill, before it writes
FSYNC_TIMEOUT = 120.0  # after the write: fsync and the result line
SAMPLES = 8  # 4 KiB pages read back per write, spread over the region
PAGE = 4096
SCRIPTS = Path(__file__).resolve().parent.parent


def pattern(offset: int, tag: int, length: int = WRITE_SIZE) -> bytes:
    """The touched buffer's content for a write at `offset`: each 8-byte word holds its
    own offset plus `tag` << 48 (never zero, different in every run and every place)."""
    start = (tag << 48) + offset
    words = array.array("Q", range(start, start + length, 8))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


def sample_pages(offset: int) -> list[int]:
    """The SAMPLES page offsets read back of a write at `offset`: its first and last page
    and others evenly between."""
    step = (WRITE_SIZE - PAGE) // (SAMPLES - 1) // PAGE * PAGE
    return [offset + k * step for k in range(SAMPLES - 1)] + [offset + WRITE_SIZE - PAGE]


def expected(pos: int, touched: bool, tag: int) -> bytes:
    """The page at `pos` after the write: the pattern, or zeros from an untouched buffer."""
    return pattern(pos, tag, PAGE) if touched else bytes(PAGE)


class Write(NamedTuple):
    seconds: float | None  # None: the write ran over the limit and was stopped
    skew: int | None  # the buffer's address past a page boundary (None: not known)


def timed_write(path: Path, offset: int, touched: bool, tag: int,
                limit: float = WRITE_LIMIT_S) -> Write:
    """One 32 MiB pwrite at `offset` of `path` in a helper process: its seconds, or None if
    it ran over `limit` (the helper is killed). BenchError if the helper failed or the
    bytes read back differ from those written."""
    mode = "touched" if touched else "untouched"
    if not touched:
        mark_pages(path, offset)
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchlib.write32m", str(path), str(offset), mode, str(tag)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        start_new_session=True,
    )
    try:
        reader = _LineReader(proc)
        line = reader.line(START_TIMEOUT)
        if line != "writing":
            raise BenchError(f"32 MiB write helper did not start: {line or reader.error()}")
        line = reader.line(limit)
        if line != "written":
            if proc.poll() is None:
                return Write(None, None)  # still in the write: killed below
            raise BenchError(f"32 MiB write helper failed: {line or reader.error()}")
        line = reader.line(FSYNC_TIMEOUT)
        if not line:
            raise BenchError(f"32 MiB write helper: no result after its write "
                             f"({reader.error()})")
        try:
            result = json.loads(line)
        except ValueError:
            raise BenchError(f"32 MiB write helper said {line[:200]!r}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=FSYNC_TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    if result["written"] != WRITE_SIZE:
        raise BenchError(f"a 32 MiB write at {offset} of {path} wrote {result['written']} bytes")
    check_region(path, offset, touched, tag)
    seconds = float(result["seconds"])
    return Write(None if seconds > limit else seconds, result["skew"])


def mark_pages(path: Path, offset: int) -> None:
    """Write a non-zero page where the read-back samples of a write at `offset` lie, so that
    zeros read back there prove that an untouched (all-zero) buffer was written."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for pos in sample_pages(offset):
            os.pwrite(fd, b"\xa5" * PAGE, pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_region(path: Path, offset: int, touched: bool, tag: int) -> None:
    """Read the sample pages of the region back from the filesystem and compare them."""
    direct = can_open_direct(path)
    if not direct:
        drop_caches()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    try:
        for pos in sample_pages(offset):
            n = os.preadv(fd, [buf], pos)
            if n != PAGE or buf[:] != expected(pos, touched, tag):
                raise BenchError(
                    f"CONTENT MISMATCH: a 32 MiB write ({'touched' if touched else 'untouched'}"
                    f" buffer) at {offset} of {path} reads back different bytes at {pos}"
                )
    finally:
        buf.close()
        os.close(fd)


class _LineReader:
    """Lines of a process's stdout with timeouts (a blocked readline could not time out)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.data = b""

    def line(self, timeout: float) -> str:
        """The next line, or '' if the process ends or says nothing for `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if b"\n" in self.data:
                line, self.data = self.data.split(b"\n", 1)
                return line.decode(errors="replace").strip()
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                self.data += chunk
                continue
            if chunk == b"" or time.monotonic() >= deadline:
                return ""
            time.sleep(0.02)

    def error(self) -> str:
        if self.proc.poll() is None:
            return "timeout"
        err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return err[-1][:300] if err else f"exited {self.proc.returncode}"


def _helper(path: str, offset: int, touched: bool, tag: int) -> None:
    """The helper process: one timed pwrite of a freshly malloc'ed buffer, then fsync."""
    fd = os.open(path, os.O_WRONLY)
    libc = ctypes.CDLL(None)  # the C library this interpreter runs on
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    addr = libc.malloc(WRITE_SIZE)  # never freed: the process ends after this write
    if not addr:
        raise MemoryError("malloc of 32 MiB failed")
    buf = (ctypes.c_char * WRITE_SIZE).from_address(addr)  # no page of it touched yet
    if touched:
        ctypes.memmove(addr, pattern(offset, tag), WRITE_SIZE)
    print("writing", flush=True)
    t0 = time.perf_counter()
    written = os.pwrite(fd, buf, offset)
    seconds = time.perf_counter() - t0
    print("written", flush=True)
    os.fsync(fd)
    os.close(fd)
    print(json.dumps({"seconds": seconds, "written": written, "skew": addr % PAGE}),
          flush=True)


if __name__ == "__main__":
    _helper(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "touched", int(sys.argv[4]))
