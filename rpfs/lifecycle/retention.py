"""Retention: which points of a disk a policy keeps, as a plan, with the rule that
decided each one.

The plan is pure (points and a policy in, decisions out; no index, no clock), so a
`--dry-run` prints exactly what a prune does, and the execution (each removal sent to
the trash in its own transaction, oldest first) lives elsewhere. restic splits its
pack prune the same way (internal/repository/prune.go: `PlanPrune` returns a plan that
`Execute` carries out, and `--dry-run` prints the plan), and so does PBS, whose
`compute_prune_info` marks every snapshot before its caller deletes any.

The bucket rules are PBS's, read in its documentation (docs/maintenance.rst, "Pruning")
and in `compute_prune_info` / `mark_selections` (pbs-datastore/src/prune.rs), and
checked against the cases of its tests/prune.rs, which tests/test_retention.py repeats:

- Points are taken newest first. One pass per option, in the order keep-last, hourly,
  daily, weekly, monthly, yearly; an option that is not set has no pass. Each point
  falls in one bucket of the pass: for keep-last the point itself, else its hour, day,
  ISO week (year and week of ISO 8601, so 2027-01-03 is in 2026-W53), month or year.
- A pass first notes the buckets that hold a point some earlier pass kept: those are
  used, and it walks past their points without a mark. Then, walking the points no pass
  has marked yet, the first point of a new bucket is kept (the newest in it), as long as
  the pass has kept fewer than N buckets; the first point of a new bucket past the N-th
  ends the pass. A later point of a bucket this pass kept is marked for removal, and a
  point once marked is not looked at again by later passes (so a monthly pass can skip a
  November point that a weekly pass removed because its week had a newer December point,
  and keep an older November point instead: PBS's own test expects that).
- Points the passes never reach are removed. Buckets with no points take no slot, so
  `--keep-daily 7` keeps the newest point of each of the 7 most recent days that have
  one, however far back they go.
- A protected point (PBS) takes no slot, marks no bucket as used and is kept. When no
  option is above 0, PBS's prune keeps every point ("keep all"); so does this plan.
- Buckets are computed in UTC here (PBS uses local time), as every time in rpfs is.

Beyond PBS, these are kept and outside the buckets (no slot, no used bucket): a held
point, a point still archiving (PBS keeps only its newest unfinished backup; a point
still being archived is never pruned here), and an on-demand point, one with an expiry
of its own (its expiry alone ends it). And the newest complete point of the disk is
never removed. The passes already keep it (the newest point a pass may take is the
first kept by the first pass above 0), so that rule is a final check of the plan, which
a change to the passes cannot get past.
"""

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from ..errors import RpfsError
from ..index import PointState
from .clock import iso


@dataclass(frozen=True)
class Policy:
    """How many buckets of each period to keep (None: that option is not set, and has no
    pass), and how often the daemon takes a point of the disk (`every`, in seconds)."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    every: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 1 if f.name == "every" else 0
            if value is not None and (type(value) is not int or value < low):
                option = "--" + f.name.replace("_", "-")
                raise RpfsError(f"bad {option} {value!r}: use a whole number, {low} or more")

    @property
    def keeps_something(self) -> bool:
        """Whether any keep option is above 0; when none is, the policy keeps every point
        (PBS's "keep all")."""
        return any(getattr(self, option) for option, _, _ in _PASSES)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Policy":
        """The policy `encode` stored; a key this rpfs does not know is refused rather
        than ignored (a keep rule read as absent would prune what it keeps)."""
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise RpfsError(f"bad stored policy {raw!r}: not a JSON object")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise RpfsError(f"bad stored policy {raw!r}: unknown key {unknown[0]!r}; "
                            "was it written by a newer rpfs?")
        return cls(**value)


@dataclass(frozen=True)
class Candidate:
    """What the plan needs to know of a point: its name (unique in its disk), when it
    was taken (seconds since the epoch), its state, its hold's tag and its own expiry."""

    name: str
    created: float
    state: PointState = PointState.COMPLETE
    hold: str | None = None  # the hold's tag: held points are never pruned
    expires: float | None = None  # an on-demand point's own expiry

    def __post_init__(self) -> None:
        # A record's plain string becomes the enum, and a state this plan does not know
        # is refused (ValueError) rather than taken for complete and pruned.
        object.__setattr__(self, "state", PointState(self.state))


@dataclass(frozen=True)
class Decision:
    """A point kept or removed, and the rule that decided it (printed by `--dry-run`)."""

    name: str
    keep: bool
    rule: str


def _utc(point: Candidate) -> datetime:
    return datetime.fromtimestamp(point.created, UTC)


# The passes in PBS's order: option, the rule of a point it keeps, the point's bucket.
_PASSES: tuple[tuple[str, str, Callable[[Candidate], str]], ...] = (
    ("keep_last", "keep-last {count}", lambda p: p.name),
    ("keep_hourly", "hourly {bucket}", lambda p: _utc(p).strftime("%Y-%m-%dT%H:00Z")),
    ("keep_daily", "daily {bucket}", lambda p: _utc(p).strftime("%Y-%m-%d")),
    ("keep_weekly", "weekly {bucket}",
     lambda p: "{}-W{:02d}".format(*_utc(p).isocalendar()[:2])),
    ("keep_monthly", "monthly {bucket}", lambda p: _utc(p).strftime("%Y-%m")),
    ("keep_yearly", "yearly {bucket}", lambda p: _utc(p).strftime("%Y")),
)

KEEP_OPTIONS = tuple(option for option, _, _ in _PASSES)  # the Policy's keep fields
NO_RULE = "no rule keeps it"


def plan(points: Iterable[Candidate], policy: Policy) -> list[Decision]:
    """A decision for every point of one disk, newest first."""
    ordered = sorted(points, key=lambda p: (p.created, p.name), reverse=True)
    kept: dict[str, str] = {}  # name -> the rule that keeps it
    for p in ordered:
        if p.hold is not None:
            kept[p.name] = f"held ({p.hold})"
        elif p.state == PointState.ARCHIVING:
            kept[p.name] = "still archiving"
        elif p.expires is not None:
            kept[p.name] = f"on-demand (expires {iso(p.expires)})"
    bucketed = [p for p in ordered if p.name not in kept]
    if policy.keeps_something:
        removed: set[str] = set()
        for option, rule, bucket in _PASSES:
            count = getattr(policy, option)
            if count is not None:
                _pass(bucketed, count, rule, bucket, kept, removed)
    else:
        kept.update((p.name, "no keep option above 0: keeps every point") for p in bucketed)
    newest = next((p for p in ordered if p.state == PointState.COMPLETE), None)
    if newest is not None and newest.name not in kept:
        kept[newest.name] = "newest complete point"
    return [Decision(p.name, p.name in kept, kept.get(p.name, NO_RULE)) for p in ordered]


def _pass(points: list[Candidate], count: int, rule: str,
          bucket: Callable[[Candidate], str], kept: dict[str, str], removed: set[str]) -> None:
    """One PBS pass over `points` (newest first, none outside the buckets): keep the
    newest point of each of the first `count` buckets that no earlier pass kept a point
    in, and mark the others it walks past in those buckets removed (a later pass does not
    look at them again)."""
    used = {bucket(p) for p in points if p.name in kept}
    taken: set[str] = set()
    for p in points:
        if p.name in kept or p.name in removed:
            continue
        key = bucket(p)
        if key in used:
            continue
        if key in taken:
            removed.add(p.name)
            continue
        if len(taken) >= count:
            break
        taken.add(key)
        kept[p.name] = rule.format(count=count, bucket=key)
