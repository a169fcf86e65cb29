"""The retention plan (PBS's bucket rules and rpfs's safety rules) and the lifecycle clock
(RPFS_NOW, durations, instants), on synthetic point times: no repository, no mount."""

from __future__ import annotations

import random
import time
from datetime import UTC, date, datetime

import pytest

from rpfs.errors import RpfsError
from rpfs.index import PointState
from rpfs.lifecycle import clock
from rpfs.lifecycle.retention import NO_RULE, Candidate, Policy, plan


def ts(text: str) -> float:
    """`2026-11-30T12:00` (UTC) as seconds since the epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def points(*times: str) -> list[Candidate]:
    """Complete points named after their UTC creation time."""
    return [Candidate(t, ts(t)) for t in times]


def kept(pts: list[Candidate], policy: Policy) -> set[str]:
    return {d.name for d in plan(pts, policy) if d.keep}


def rules(pts: list[Candidate], policy: Policy) -> dict[str, str]:
    return {d.name: d.rule for d in plan(pts, policy)}


# PBS's tests/prune.rs lists, the same cases as there, so the passes match PBS's exactly.
PBS_SIMPLE = ["2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15",
              "2019-12-04T12:59:15"]
PBS_SIMPLE2 = ["2018-11-15T11:59:15", "2019-11-15T11:59:15", "2019-11-21T11:59:15",
               "2019-11-22T11:59:15", "2019-11-29T11:59:15", "2019-12-01T11:59:15",
               "2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15"]
PBS_HOURLY = ["2019-11-15T09:39:15", "2019-11-15T10:49:15", "2019-11-15T10:59:15",
              "2019-11-15T11:39:15", "2019-11-15T11:49:15", "2019-11-15T11:59:15"]

# Around the turn of 2026: 2026 has 53 ISO weeks (it starts on a Thursday), so 2026-W53
# runs from Monday 2026-12-28 to Sunday 2027-01-03, and 2027-W01 starts on 2027-01-04.
YEAR_END = ["2026-12-27T10:00", "2026-12-28T10:00", "2027-01-01T10:00", "2027-01-03T10:00",
            "2027-01-04T10:00"]

# Four points on 2026-11-30, one on each of the three days before.
BUSY_DAY = ["2026-11-27T12:00", "2026-11-28T12:00", "2026-11-29T12:00", "2026-11-30T01:00",
            "2026-11-30T07:00", "2026-11-30T13:00", "2026-11-30T19:00"]

CASES = [
    # (id, point times, policy, kept)
    ("pbs-last-4", PBS_SIMPLE, Policy(keep_last=4), set(PBS_SIMPLE)),
    ("pbs-last-3", PBS_SIMPLE, Policy(keep_last=3), set(PBS_SIMPLE[1:])),
    ("pbs-last-2", PBS_SIMPLE, Policy(keep_last=2), set(PBS_SIMPLE[2:])),
    ("pbs-last-1", PBS_SIMPLE, Policy(keep_last=1), {PBS_SIMPLE[3]}),
    ("pbs-last-2-daily-2", PBS_SIMPLE, Policy(keep_last=2, keep_daily=2), set(PBS_SIMPLE)),
    ("pbs-daily-3", PBS_SIMPLE, Policy(keep_daily=3), set(PBS_SIMPLE) - {PBS_SIMPLE[2]}),
    ("pbs-daily-2", PBS_SIMPLE, Policy(keep_daily=2), {PBS_SIMPLE[1], PBS_SIMPLE[3]}),
    ("pbs-weekly-5", PBS_SIMPLE, Policy(keep_weekly=5), {PBS_SIMPLE[3]}),
    ("pbs-daily-1-weekly-5", PBS_SIMPLE, Policy(keep_daily=1, keep_weekly=5),
     {PBS_SIMPLE[3]}),
    ("pbs-monthly-6", PBS_SIMPLE, Policy(keep_monthly=6), {PBS_SIMPLE[3]}),
    ("pbs-yearly-7", PBS_SIMPLE, Policy(keep_yearly=7), {PBS_SIMPLE[3]}),
    ("pbs-weekly-monthly-yearly", PBS_SIMPLE,
     Policy(keep_weekly=5, keep_monthly=6, keep_yearly=7), {PBS_SIMPLE[3]}),
    ("pbs-hourly-3", PBS_HOURLY, Policy(keep_hourly=3),
     {"2019-11-15T09:39:15", "2019-11-15T10:59:15", "2019-11-15T11:59:15"}),
    ("pbs-hourly-2", PBS_HOURLY, Policy(keep_hourly=2),
     {"2019-11-15T10:59:15", "2019-11-15T11:59:15"}),
    ("pbs2-daily-1", PBS_SIMPLE2, Policy(keep_daily=1), {"2019-12-04T11:59:15"}),
    ("pbs2-last-1-daily-1", PBS_SIMPLE2, Policy(keep_last=1, keep_daily=1),
     {"2019-12-03T11:59:15", "2019-12-04T11:59:15"}),
    ("pbs2-daily-weekly", PBS_SIMPLE2, Policy(keep_daily=1, keep_weekly=1),
     {"2019-12-01T11:59:15", "2019-12-04T11:59:15"}),
    # The weekly pass removes 11-29 (its week, 2019-W48, kept 12-01), so the monthly pass
    # does not look at it again and keeps 11-22 for November.
    ("pbs2-daily-weekly-monthly", PBS_SIMPLE2,
     Policy(keep_daily=1, keep_weekly=1, keep_monthly=1),
     {"2019-11-22T11:59:15", "2019-12-01T11:59:15", "2019-12-04T11:59:15"}),
    ("pbs2-monthly-yearly", PBS_SIMPLE2, Policy(keep_monthly=1, keep_yearly=1),
     {"2018-11-15T11:59:15", "2019-12-04T11:59:15"}),
    # 2026-11-30 and 2026-12-01 share 2026-W49: the weekly pass keeps 12-01 and removes
    # 11-30, so November's monthly point is 11-02, not 11-30.
    ("weekly-removal-stands-for-monthly", ["2026-11-02T09:00", "2026-11-30T09:00",
                                           "2026-12-01T09:00"],
     Policy(keep_weekly=1, keep_monthly=2), {"2026-12-01T09:00", "2026-11-02T09:00"}),
    # Weeks across the year boundary: 2027-01-01 and 2027-01-03 are in 2026-W53 with
    # 2026-12-28, so W53 is one bucket (a calendar-year week would make it two).
    ("iso-weekly-2", YEAR_END, Policy(keep_weekly=2), {"2027-01-04T10:00", "2027-01-03T10:00"}),
    ("iso-weekly-3", YEAR_END, Policy(keep_weekly=3),
     {"2027-01-04T10:00", "2027-01-03T10:00", "2026-12-27T10:00"}),
    ("iso-weekly-1-yearly-2", YEAR_END, Policy(keep_weekly=1, keep_yearly=2),
     {"2027-01-04T10:00", "2026-12-28T10:00"}),
    ("monthly-2-year-end", YEAR_END, Policy(keep_monthly=2),
     {"2027-01-04T10:00", "2026-12-28T10:00"}),
    # keep-last and daily overlapping: the two newest are on 11-30, so the daily pass finds
    # that day used and spends its slots on 11-29 and 11-28.
    ("last-2-daily-2-overlap", BUSY_DAY, Policy(keep_last=2, keep_daily=2),
     {"2026-11-30T19:00", "2026-11-30T13:00", "2026-11-29T12:00", "2026-11-28T12:00"}),
    ("daily-2", BUSY_DAY, Policy(keep_daily=2), {"2026-11-30T19:00", "2026-11-29T12:00"}),
    ("hourly-3", BUSY_DAY, Policy(keep_hourly=3),
     {"2026-11-30T19:00", "2026-11-30T13:00", "2026-11-30T07:00"}),
    # Gaps: days, months and years without points take no slot.
    ("daily-3-gaps", ["2026-11-01T08:00", "2026-11-10T08:00", "2026-11-10T20:00",
                      "2026-11-20T08:00", "2026-11-30T08:00"], Policy(keep_daily=3),
     {"2026-11-30T08:00", "2026-11-20T08:00", "2026-11-10T20:00"}),
    ("monthly-2-gaps", ["2026-01-15T00:00", "2026-03-01T00:00", "2026-03-31T23:59",
                        "2026-09-09T09:00"], Policy(keep_monthly=2),
     {"2026-09-09T09:00", "2026-03-31T23:59"}),
    ("yearly-2-gaps", ["2020-06-01T00:00", "2024-01-01T00:00", "2024-12-31T23:00",
                       "2026-02-01T00:00"], Policy(keep_yearly=2),
     {"2026-02-01T00:00", "2024-12-31T23:00"}),
    ("weekly-2-gaps", ["2026-10-05T00:00", "2026-11-02T00:00", "2026-11-08T23:59",
                       "2026-11-30T00:00"], Policy(keep_weekly=2),
     {"2026-11-30T00:00", "2026-11-08T23:59"}),
]


@pytest.mark.parametrize(("times", "policy", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bucket_rules(times: list[str], policy: Policy, expected: set[str]) -> None:
    decisions = plan(points(*reversed(times)), policy)  # given in any order
    assert [d.name for d in decisions] == sorted(times, reverse=True)  # newest first
    assert {d.name for d in decisions if d.keep} == expected
    assert all(d.rule == NO_RULE for d in decisions if not d.keep)


def test_2026_has_53_iso_weeks() -> None:
    """The year-boundary cases rely on it."""
    assert date(2026, 12, 28).isocalendar()[:2] == (2026, 53)
    assert date(2027, 1, 3).isocalendar()[:2] == (2026, 53)
    assert date(2027, 1, 4).isocalendar()[:2] == (2027, 1)
    assert date(2025, 12, 28).isocalendar()[:2] == (2025, 52)  # 2025 has 52


def test_rules_name_the_bucket() -> None:
    """`--dry-run` prints these: each kept point says which pass and which bucket."""
    pts = points("2025-06-01T00:00", "2026-10-10T00:00", "2026-11-20T00:00",
                 "2026-11-29T00:00", "2026-11-30T10:00", "2026-11-30T11:30",
                 "2026-11-30T12:00")
    policy = Policy(keep_last=1, keep_hourly=2, keep_daily=2, keep_monthly=1, keep_yearly=2)
    assert rules(pts, policy) == {
        "2026-11-30T12:00": "keep-last 1",
        "2026-11-30T11:30": "hourly 2026-11-30T11:00Z",
        "2026-11-30T10:00": "hourly 2026-11-30T10:00Z",
        "2026-11-29T00:00": "daily 2026-11-29",
        "2026-11-20T00:00": "daily 2026-11-20",
        "2026-10-10T00:00": "monthly 2026-10",
        "2025-06-01T00:00": "yearly 2025",
    }
    assert rules(points(*YEAR_END), Policy(keep_last=1, keep_weekly=2)) == {
        "2027-01-04T10:00": "keep-last 1",
        "2027-01-03T10:00": "weekly 2026-W53",
        "2027-01-01T10:00": NO_RULE,
        "2026-12-28T10:00": NO_RULE,
        "2026-12-27T10:00": "weekly 2026-W52",
    }


def test_buckets_are_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """23:30 and 00:30 UTC are two days wherever the machine is."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        pts = points("2026-11-29T23:30", "2026-11-30T00:30")
        assert kept(pts, Policy(keep_daily=2)) == {"2026-11-29T23:30", "2026-11-30T00:30"}
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


DAYS = ["2026-11-26T12:00", "2026-11-27T12:00", "2026-11-28T12:00", "2026-11-29T12:00",
        "2026-11-30T12:00"]


def marked(name: str, **facts: object) -> list[Candidate]:
    """DAYS as points, the one on `name` with `facts` (hold, state, expires)."""
    return [Candidate(t, ts(t), **facts) if t == name else Candidate(t, ts(t)) for t in DAYS]


def test_held_point_is_kept_and_takes_no_slot() -> None:
    pts = marked("2026-11-28T12:00", hold="legal")
    assert rules(pts, Policy(keep_daily=3)) == {
        "2026-11-30T12:00": "daily 2026-11-30",
        "2026-11-29T12:00": "daily 2026-11-29",
        "2026-11-28T12:00": "held (legal)",
        "2026-11-27T12:00": "daily 2026-11-27",
        "2026-11-26T12:00": NO_RULE,
    }


def test_held_point_marks_no_bucket_used() -> None:
    """PBS's protected backups: the newest of a day is held, the day's newest point
    outside the hold is still the daily one."""
    pts = [Candidate("a", ts("2026-11-30T08:00")),
           Candidate("b", ts("2026-11-30T09:00"), hold="legal")]
    assert rules(pts, Policy(keep_daily=1)) == {"b": "held (legal)", "a": "daily 2026-11-30"}


def test_on_demand_point_is_kept_outside_the_buckets() -> None:
    expiry = ts("2027-01-31T00:00")
    pts = marked("2026-11-30T12:00", expires=expiry)
    assert rules(pts, Policy(keep_last=2)) == {
        "2026-11-30T12:00": "on-demand (expires 2027-01-31T00:00:00Z)",
        "2026-11-29T12:00": "keep-last 2",
        "2026-11-28T12:00": "keep-last 2",
        "2026-11-27T12:00": NO_RULE,
        "2026-11-26T12:00": NO_RULE,
    }
    # Its own expiry decides, also when it lies in the past (the expiry check acts on it).
    old = marked("2026-11-26T12:00", expires=ts("2026-11-27T00:00"))
    assert kept(old, Policy(keep_last=1)) == {"2026-11-30T12:00", "2026-11-26T12:00"}


def test_archiving_point_is_never_pruned() -> None:
    pts = marked("2026-11-30T12:00", state=PointState.ARCHIVING)
    assert rules(pts, Policy(keep_last=1)) == {
        "2026-11-30T12:00": "still archiving",
        "2026-11-29T12:00": "keep-last 1",  # the archiving point took no slot
        "2026-11-28T12:00": NO_RULE,
        "2026-11-27T12:00": NO_RULE,
        "2026-11-26T12:00": NO_RULE,
    }
    older = marked("2026-11-27T12:00", state=PointState.ARCHIVING)
    assert kept(older, Policy(keep_last=1)) == {"2026-11-30T12:00", "2026-11-27T12:00"}


def test_candidate_state_from_a_record() -> None:
    """A record's plain string works; a state the plan does not know is refused, never
    taken for complete."""
    pts = [Candidate("a", ts("2026-11-29T12:00")),
           Candidate("b", ts("2026-11-30T12:00"), "archiving")]
    assert rules(pts, Policy(keep_last=1)) == {"b": "still archiving", "a": "keep-last 1"}
    with pytest.raises(ValueError):
        Candidate("c", 0.0, "deleting")


def test_hold_is_named_before_other_facts() -> None:
    pts = [Candidate("p", ts("2026-11-30T12:00"), PointState.ARCHIVING, "legal", ts("2027-01-01"))]
    assert rules(pts, Policy(keep_last=1)) == {"p": "held (legal)"}


@pytest.mark.parametrize("policy", [Policy(), Policy(keep_last=0, keep_daily=0, keep_yearly=0)],
                         ids=["unset", "zeros"])
def test_policy_keeping_nothing_keeps_everything(policy: Policy) -> None:
    """PBS's prune keeps every backup when no keep option is above 0."""
    assert not policy.keeps_something
    decisions = plan(points(*DAYS), policy)
    assert all(d.keep for d in decisions)
    assert {d.rule for d in decisions} == {"no keep option above 0: keeps every point"}


def test_zero_options_have_no_effect() -> None:
    """`--keep-last 0` next to `--keep-daily 2` is a pass that keeps nothing (PBS)."""
    assert kept(points(*BUSY_DAY), Policy(keep_last=0, keep_daily=2)) == \
        kept(points(*BUSY_DAY), Policy(keep_daily=2))


def test_no_points_no_decisions() -> None:
    assert plan([], Policy(keep_last=3)) == []


def test_random_histories_keep_the_safety_rules() -> None:
    """Seeded random histories and policies: every point decided once; held, archiving
    and on-demand points kept with their rule; the newest complete point kept; no pass
    keeps more buckets than its count, nor two points of one bucket."""
    rng = random.Random(11)
    options = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
               "keep_yearly")
    for _ in range(300):
        start = ts("2025-12-20T00:00")
        pts = []
        for i in range(rng.randrange(0, 40)):
            pts.append(Candidate(
                f"p{i}", start + rng.uniform(0, 3 * 365 * 86400),
                PointState.ARCHIVING if rng.random() < 0.05 else PointState.COMPLETE,
                "legal" if rng.random() < 0.1 else None,
                start if rng.random() < 0.1 else None))
        policy = Policy(**{o: rng.choice([None, 0, 1, 2, 5]) for o in options})
        decisions = plan(pts, policy)
        by_name = {d.name: d for d in decisions}
        assert sorted(by_name) == sorted(p.name for p in pts)
        for p in pts:
            if p.hold or p.state is PointState.ARCHIVING or p.expires:
                assert by_name[p.name].keep
                assert by_name[p.name].rule.startswith(("held", "still", "on-demand"))
        complete = [p for p in pts if p.state is PointState.COMPLETE]
        if complete:
            assert by_name[max(complete, key=lambda p: (p.created, p.name)).name].keep
        for label in ("hourly", "daily", "weekly", "monthly", "yearly"):
            buckets = [d.rule for d in decisions if d.rule.startswith(label + " ")]
            assert len(buckets) == len(set(buckets)) <= (getattr(policy, f"keep_{label}") or 0)
        last = sum(d.rule.startswith("keep-last") for d in decisions)
        assert last <= (policy.keep_last or 0)


# -- Policy -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep_daily": -1}, "bad --keep-daily -1: use a whole number, 0 or more"),
    ({"keep_last": True}, "bad --keep-last True: use a whole number, 0 or more"),
    ({"keep_weekly": "4"}, "bad --keep-weekly '4': use a whole number, 0 or more"),
    ({"keep_yearly": 1.5}, "bad --keep-yearly 1.5: use a whole number, 0 or more"),
    ({"every": 0}, "bad --every 0: use a whole number, 1 or more"),
])
def test_policy_refuses_bad_counts(kwargs: dict, message: str) -> None:
    with pytest.raises(RpfsError) as exc:
        Policy(**kwargs)
    assert str(exc.value) == message


def test_policy_json_round_trip() -> None:
    policy = Policy(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=6, every=3600)
    assert Policy.decode(policy.encode()) == policy
    assert Policy.decode(b"{}") == Policy()  # a record without the options it lacks
    assert Policy.decode(b'{"keep_daily": 2}') == Policy(keep_daily=2)


@pytest.mark.parametrize(("raw", "message"), [
    (b"[1]", "bad stored policy b'[1]': not a JSON object"),
    (b"{", "bad stored policy b'{': not a JSON object"),
    (b'{"keep_within": 3}',
     "bad stored policy b'{\"keep_within\": 3}': unknown key 'keep_within'; "
     "was it written by a newer rpfs?"),
    (b'{"keep_daily": -2}', "bad --keep-daily -2: use a whole number, 0 or more"),
])
def test_policy_decode_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(RpfsError) as exc:
        Policy.decode(raw)
    assert str(exc.value) == message


# -- the clock ----------------------------------------------------------------------------

def test_now_is_the_system_clock_without_rpfs_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RPFS_NOW", raising=False)
    before = time.time()
    assert before <= clock.now() <= time.time()
    monkeypatch.setenv("RPFS_NOW", "")
    assert before <= clock.now() <= time.time()


@pytest.mark.parametrize(("value", "expected"), [
    ("2027-01-31T00:00Z", "2027-01-31T00:00"),
    ("2027-01-31T00:00:00Z", "2027-01-31T00:00"),
    ("2027-01-31T06:30:15.5Z", "2027-01-31T06:30:15.5"),
    ("1800000000", "2027-01-15T08:00"),
    ("1800000000.25", "2027-01-15T08:00:00.25"),
])
def test_rpfs_now_sets_the_clock(monkeypatch: pytest.MonkeyPatch, value: str,
                                 expected: str) -> None:
    monkeypatch.setenv("RPFS_NOW", value)
    assert clock.now() == ts(expected)


@pytest.mark.parametrize("value", ["tomorrow", "2027-01-31T00:00", "2027-01-31T00:00+01:00",
                                   "2027-01-31Z", "2027-01-31T00:00z", "1e9", "-5", "0x10",
                                   "99999999999999", "9" * 400, "١٢"])
def test_bad_rpfs_now_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RPFS_NOW", value)
    with pytest.raises(RpfsError) as exc:
        clock.now()
    assert str(exc.value) == (
        f"bad RPFS_NOW {value!r}: use UTC ISO 8601 ending in Z, e.g. 2027-01-31T00:00Z, "
        "or seconds since the epoch")


def test_iso_reads_back() -> None:
    assert clock.iso(ts("2027-01-31T00:00")) == "2027-01-31T00:00:00Z"
    assert clock.parse_instant(clock.iso(1800000000)) == 1800000000


@pytest.mark.parametrize(("text", "seconds"), [
    ("45s", 45), ("90m", 5400), ("1h", 3600), ("10d", 864000), ("2w", 1209600),
    ("007d", 7 * 86400),
])
def test_durations(text: str, seconds: int) -> None:
    assert clock.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "10", "d", "1.5h", "10D", " 10d", "-1d", "10 d", "",
                                  "1h30m", "٣d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(RpfsError) as exc:
        clock.parse_duration(text)
    assert str(exc.value) == (
        f"bad duration {text!r}: use a number and one of s, m, h, d, w, e.g. 10d")


def test_duration_limits() -> None:
    with pytest.raises(RpfsError, match=r"^bad duration '0d': must be longer than 0$"):
        clock.parse_duration("0d")
    with pytest.raises(RpfsError, match="longer than any date rpfs can print"):
        clock.parse_duration("9" * 5000 + "w")  # more digits than int() converts
    with pytest.raises(RpfsError, match="longer than any date rpfs can print"):
        clock.parse_duration("600000w")


def test_expire_in_counts_from_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPFS_NOW", "2027-01-31T00:00Z")
    assert clock.parse_expire_in("10d") == ts("2027-02-10T00:00")
    with pytest.raises(RpfsError, match="bad duration '3x'"):
        clock.parse_expire_in("3x")
    monkeypatch.setenv("RPFS_NOW", "9999-12-01T00:00Z")
    with pytest.raises(RpfsError, match="after the year 9999"):
        clock.parse_expire_in("5w")


def test_expire_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPFS_NOW", "2026-12-02T03:00Z")
    assert clock.parse_expire_at("2027-01-31T00:00Z") == ts("2027-01-31T00:00")
    for past in ("2026-12-02T03:00Z", "2026-01-01T00:00Z"):
        with pytest.raises(RpfsError) as exc:
            clock.parse_expire_at(past)
        assert str(exc.value) == f"expiry {past} is in the past (now is 2026-12-02T03:00:00Z)"
    with pytest.raises(RpfsError) as exc:
        clock.parse_expire_at("2027-01-31T00:00")
    assert str(exc.value) == ("bad time '2027-01-31T00:00': use UTC ISO 8601 ending in Z, "
                              "e.g. 2027-01-31T00:00Z")
