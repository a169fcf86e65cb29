"""Stored policies: per disk, how often the daemon takes a point and which points the
retention keeps.

A policy is a `retention.Policy` in the index's `policies` database, one per disk, and
goes with its disk. It replaces the whole previous one when set (what `rpfs policy show`
prints is what runs, with nothing merged from an older setting).

The schedule needs no state of its own: a disk with `every` is due when its newest point
(of any kind, taken by the schedule or by hand) is `every` old or older, by the one
clock (`clock.now`). So a point taken by hand moves the next scheduled one, the
operator's promise ("a point at least every hour") is what is kept, a daemon that was
down takes the missed point at its first look, and a moved clock moves the schedule.
Only writable disks can be scheduled: the daemon takes their points itself (`rpfs
snapshot`), while a captured disk's points come from outside (`rpfs capture` from cron).
"""

from __future__ import annotations

import dataclasses

import lmdb

from ..errors import RpfsError
from ..index import Index
from ..names import check_name
from ..repo import Repository
from .clock import fmt_duration
from .retention import Policy

MIN_EVERY = 60  # seconds: the daemon looks at the schedules every SCHEDULE_INTERVAL


def set_policy(index: Index, disk: str, policy: Policy) -> Policy:
    """Store `policy` as the policy of `disk`, replacing the one it had."""
    if policy == Policy():
        raise RpfsError("give --every or at least one --keep-* option (or 'rpfs policy clear "
                        f"{disk}' to drop the policy)")
    if policy.every is not None and policy.every < MIN_EVERY:
        raise RpfsError(f"bad --every {fmt_duration(policy.every)}: at least "
                        f"{fmt_duration(MIN_EVERY)} (the daemon looks every 30 s)")
    with index.write() as txn:
        record = index.disk_named(txn, check_name(disk, "disk name"))
        if policy.every is not None and not record.writable:
            raise RpfsError(
                f"disk {disk} holds captured points only: --every takes points of writable "
                "disks; run 'rpfs capture' on a schedule of yours (cron, a systemd timer) "
                "and give the policy --keep-* options only"
            )
        index.put_policy(txn, disk, policy.encode())
    return policy


def clear_policy(index: Index, disk: str) -> bool:
    """Drop the policy of `disk`; whether it had one."""
    with index.write() as txn:
        index.disk_named(txn, check_name(disk, "disk name"))
        return index.delete_policy(txn, disk)


def policy_of(index: Index, txn: lmdb.Transaction, disk: str) -> Policy | None:
    raw = index.get_policy(txn, disk)
    return None if raw is None else Policy.decode(raw)


def has_retention(repo: Repository, disk: str) -> bool:
    """Whether `disk` has a stored policy that keeps something (so a new point of it calls
    for its retention: `rpfs capture` asks before it opens the disk service)."""
    with repo.index.read() as txn:
        stored = policy_of(repo.index, txn, disk)
    return stored is not None and stored.keeps_something


def policies(index: Index, disk: str | None = None) -> list[tuple[str, Policy, float | None]]:
    """(disk, policy, when its next scheduled point is due or None) of every disk with a
    policy, or of `disk` alone (an unknown disk is an error; one without a policy, an
    empty list)."""
    with index.read() as txn:
        if disk is not None:
            index.disk_named(txn, check_name(disk, "disk name"))
            stored = [(disk, raw) for raw in [index.get_policy(txn, disk)] if raw is not None]
        else:
            stored = index.list_policies(txn)
        out = []
        for name, raw in stored:
            policy = Policy.decode(raw)
            out.append((name, policy, next_point_at(index, txn, name, policy)))
        return out


def next_point_at(index: Index, txn: lmdb.Transaction, disk: str, policy: Policy
                  ) -> float | None:
    """When the schedule takes the next point of `disk` (None: the policy has no
    `every`): `every` after its newest point; at once if it has none."""
    if policy.every is None:
        return None
    newest = max((p.created for p in index.list_points(txn, disk)), default=None)
    return 0.0 if newest is None else newest + policy.every


def describe(policy: Policy) -> str:
    """`every 1h, keep last 3, daily 7`: a policy as `rpfs policy show` prints it."""
    keeps = [f"{f.name.removeprefix('keep_')} {value}"
             for f in dataclasses.fields(policy)
             if f.name.startswith("keep_") and (value := getattr(policy, f.name)) is not None]
    parts = [f"every {fmt_duration(policy.every)}"] if policy.every is not None else []
    if keeps:
        parts.append("keep " + ", ".join(keeps))
    elif policy.every is not None:
        parts.append("keep every point")
    return ", ".join(parts)


def shown(disk: str, policy: Policy, next_at: float | None) -> dict:
    """A policy as `rpfs policy show --json` gives it: the options (null: not set, as for
    prune) and when the next scheduled point is due."""
    return {"disk": disk, **dataclasses.asdict(policy), "next_point": next_at,
            "summary": describe(policy)}
