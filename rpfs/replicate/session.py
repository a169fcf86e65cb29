"""Replication sessions: the receiver drives, the sender answers (pull, push, serve).

The driving side (the receiver) asks for the sender's catalog, decides which points it
wants (all, or the newest N, older ones too: backfill), and asks for each point's stream
relative to a point it holds; after the map it names the chunks it lacks, and the sender
sends those. Resuming an interrupted transfer is asking again: chunks that arrived are
registered here, so they are no longer asked for.

    driver -> Q {"op": "hello", "version", "mode": "pull" | "push", "disks", "last"}
    sender -> A {"version"}                       (push: the far side drives from here)
    driver -> Q {"op": "catalog", "disks"}        sender -> A catalog
    driver -> Q {"op": "send", "disk", "point", "have": [names]}
    sender -> H M E... F                          driver -> W... W(empty)
    sender -> A {"bytes"} C... T
    driver -> Q {"op": "bye", "summary"}
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import RpfsError
from ..lifecycle import marks
from ..progress import ProgressFn
from ..repo import Repository
from .receiver import held, receive_point, received
from .sender import catalog, choose_base, send_point
from .stream import (
    ANSWER,
    FAILED,
    REQUEST,
    VERSION,
    WANT,
    Reader,
    StreamError,
    Writer,
    decode_json,
)

log = logging.getLogger(__name__)

WANT_BATCH = 65536  # digests per want record


@dataclass
class Summary:
    """What a transfer did, for the --json summary."""

    points_published: list[str] = field(default_factory=list)
    points_present: int = 0
    marks_updated: list[str] = field(default_factory=list)
    chunk_bytes_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def disks(self) -> set[str]:
        """The disks that received points (whose retention runs next)."""
        return {ref.partition("@")[0] for ref in self.points_published}


def plan(source_points: list[dict], have: set[str], last: int | None) -> list[dict]:
    """The source points to fetch, oldest first: its complete points (the newest `last`
    of them) whose identity the target neither has nor received before."""
    complete = [p for p in source_points if p["complete"]]
    if last is not None:
        complete = complete[-last:] if last else []
    return [p for p in complete if p["identity"] not in have]


def drive(repo: Repository, reader: Reader, writer: Writer, disks: list[str],
          last: int | None, bar: Callable[[str], ProgressFn]) -> Summary:
    """Receive into `repo` what the sender at the other end of the channel has."""
    summary = Summary()
    writer.json(REQUEST, {"op": "catalog", "disks": disks})
    writer.flush()
    offer = reader.expect_json(ANSWER)
    if offer.get("block_size") != repo.block_size:
        raise RpfsError(f"the source has {offer.get('block_size')}-byte blocks and "
                        f"{repo.root} has {repo.block_size}-byte blocks: points move only "
                        "between repositories of one block size")
    for disk in offer.get("disks", []):
        name = disk["name"]
        todo = plan(disk["points"], set(held(repo, name)) | received(repo, name), last)
        summary.points_present += len(disk["points"]) - len(todo)
        for point in todo:
            have = held(repo, name)
            names = [p["name"] for p in disk["points"] if p["identity"] in have]
            writer.json(REQUEST, {"op": "send", "disk": name, "point": point["name"],
                                  "have": names})
            writer.flush()
            with bar(f"pull {name}@{point['name']}") as progress:
                got = receive_point(repo, reader, ask=_asker(reader, writer),
                                    progress=progress)
            summary.points_published.append(got.ref)
            summary.chunk_bytes_received += got.bytes_stored
        summary.marks_updated += _sync_marks(repo, name, disk["points"])
    writer.json(REQUEST, {"op": "bye", "summary": vars(summary)})
    writer.flush()
    return summary


def _asker(reader: Reader, writer: Writer):
    def ask(missing: list[bytes]) -> int:
        for i in range(0, len(missing), WANT_BATCH):
            writer.record(WANT, b"".join(missing[i:i + WANT_BATCH]))
        writer.record(WANT)
        writer.flush()
        return int(reader.expect_json(ANSWER).get("bytes", 0))
    return ask


def _sync_marks(repo: Repository, disk: str, source_points: list[dict]) -> list[str]:
    """Holds and descriptions of points the target has: a hold the source has is added
    (never released: a hold here is the target's to release), a description follows."""
    changed = []
    have = held(repo, disk)
    for p in source_points:
        mine = have.get(p["identity"])
        if mine is None:
            continue
        if p.get("hold") and mine.hold is None:
            marks.hold(repo.index, mine.ref, p["hold"])
            changed.append(mine.ref)
        if (p.get("description") or "") != mine.description:
            marks.describe(repo.index, mine.ref, p.get("description") or "")
            changed.append(mine.ref)
    return changed


def answer(repo: Repository, reader: Reader, writer: Writer) -> dict:
    """Answer a driver's requests until it says bye; its summary."""
    while True:
        request = decode_json(REQUEST, reader.expect(REQUEST))
        op = request.get("op")
        if op == "bye":
            return request.get("summary") or {}
        if op == "catalog":
            writer.json(ANSWER, catalog(repo, list(request.get("disks") or [])))
        elif op == "send":
            _send(repo, reader, writer, request)
        else:
            raise StreamError(f"unknown request {op!r}")
        writer.flush()


def _send(repo: Repository, reader: Reader, writer: Writer, request: dict) -> None:
    disk, name = str(request.get("disk")), str(request.get("point"))
    index = repo.index
    with index.read() as txn:
        point = index.point_named(txn, disk, name)
        have = [p for p in (index.get_point(txn, disk, str(n)) for n in request.get("have", []))
                if p is not None]
        base = choose_base(index, txn, point, have)

    def wanted(named: list[bytes]) -> list[bytes]:
        writer.flush()
        asked: list[bytes] = []
        while payload := reader.expect(WANT):
            asked += [payload[i:i + 32] for i in range(0, len(payload), 32)]
        return asked

    send_point(repo, writer, point.ref, None if base is None else base.ref, wanted,
               announce=lambda total: writer.json(ANSWER, {"bytes": total}))
    writer.trailer()


@contextlib.contextmanager
def telling(writer: Writer) -> Iterator[None]:
    """An RpfsError in the block is told to the other side (which may be gone already)
    before it goes on up: the other side then fails with this side's reason."""
    try:
        yield
    except RpfsError as exc:
        with contextlib.suppress(OSError):
            writer.json(FAILED, {"message": str(exc)})
            writer.flush()
        raise


def hello(reader: Reader, writer: Writer, mode: str, disks: list[str],
          last: int | None) -> None:
    """Start a session with the far side (`rpfs serve --stdio`) as puller or pusher."""
    writer.json(REQUEST, {"op": "hello", "version": VERSION, "mode": mode, "disks": disks,
                          "last": last})
    writer.flush()
    reader.expect_json(ANSWER)


def greet(reader: Reader, writer: Writer) -> dict:
    """The far side's half of `hello`: the near side's request, once answered."""
    request = decode_json(REQUEST, reader.expect(REQUEST))
    if request.get("op") != "hello" or request.get("mode") not in ("pull", "push"):
        raise StreamError("the near side did not start with a hello")
    if request.get("version") != VERSION:
        raise StreamError(f"the near side speaks version {request.get('version')!r}; this "
                          f"rpfs speaks version {VERSION}")
    return request
