"""The reader thread (rpfs/serve/readqueue.py) in process: reads that arrive while it is
busy are served together, each read gets its own answer or its own error, and a batch
whose call failed fails each of its reads instead of hanging them."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from rpfs.errors import CorruptChunk
from rpfs.serve.readqueue import ReadQueue


class Image:
    """A read_many that records its batches; the first call waits for `go`."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.thread: set[int] = set()
        self.started, self.go = threading.Event(), threading.Event()

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes | BaseException]:
        self.thread.add(threading.get_ident())
        self.batches.append(ranges)
        if len(self.batches) == 1:
            self.started.set()
            assert self.go.wait(10)
        return [CorruptChunk("00000001.pack", offset, "bad") if offset == 666
                else offset.to_bytes(8, "big") * (size // 8) for offset, size in ranges]


async def test_reads_queued_behind_a_busy_reader_are_one_batch_and_each_gets_its_own():
    queue, image = ReadQueue(), Image()
    got: dict[int, bytes | str] = {}

    async def read(offset: int) -> None:
        try:
            got[offset] = await queue.read(image.read_many, offset, 16)
        except CorruptChunk as exc:
            got[offset] = f"error at {exc.offset}"

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 1)
            await trio.to_thread.run_sync(image.started.wait, 10)  # the reader is busy
            for offset in (2, 666, 3, 4):
                nursery.start_soon(read, offset)
            await trio.testing.wait_all_tasks_blocked()
            image.go.set()
    finally:
        queue.close()
    # (trio starts the four tasks in an order of its choosing)
    assert [sorted(batch) for batch in image.batches] == [
        [(1, 16)], [(2, 16), (3, 16), (4, 16), (666, 16)]]
    assert got == {1: (1).to_bytes(8, "big") * 2, 2: (2).to_bytes(8, "big") * 2,
                   3: (3).to_bytes(8, "big") * 2, 4: (4).to_bytes(8, "big") * 2,
                   666: "error at 666"}
    assert threading.get_ident() not in image.thread and len(image.thread) == 1


@pytest.mark.parametrize("failure", ["raises", "answers short"])
async def test_a_batch_whose_call_fails_fails_each_of_its_reads(failure):
    def read_many(ranges: list[tuple[int, int]]) -> list[bytes | BaseException]:
        if failure == "raises":
            raise OSError(5, "index unreadable")
        return [b"x"] * (len(ranges) - 1)

    queue = ReadQueue()
    errors: list[str] = []

    async def read(offset: int) -> None:
        with pytest.raises((OSError, RuntimeError)) as err:
            await queue.read(read_many, offset, 4096)
        errors.append(str(err.value))

    try:
        async with trio.open_nursery() as nursery:
            for offset in range(3):
                nursery.start_soon(read, offset)
    finally:
        queue.close()
    assert len(errors) == 3
    assert all("index unreadable" in e if failure == "raises" else "results for" in e
               for e in errors)


async def test_close_ends_the_reader_thread_and_refuses_new_reads():
    queue = ReadQueue()
    assert await queue.read(lambda ranges: [b"a" * n for _, n in ranges], 0, 3) == b"aaa"
    thread = queue._thread
    assert thread is not None and thread.is_alive()
    queue.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await queue.read(lambda ranges: [b""], 0, 1)
