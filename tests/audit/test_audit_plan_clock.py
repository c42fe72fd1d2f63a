"""The audit's plan when the clock was stepped: entries verified "in the future" (while
the clock was ahead) are due, not left alone until the clock catches up."""

from __future__ import annotations

import pytest

from nbankd.audit.model import CacheEntry, FileStat
from nbankd.audit.plan import DAY, DUE, SLICE, HashPolicy, due, hash_reason, plan_hashes

SHA = "a" * 40
ST = FileStat(size=10, mtime_ns=1_000, inode=7, ctime_ns=2_000)
NOW = 1000 * DAY
YEAR = 365 * DAY
SCRUB = HashPolicy(run_started=NOW, run_id="this-run", scrub_days=30, every=DAY)
NO_SCRUB = HashPolicy(run_started=NOW, run_id="this-run", scrub_days=0, every=DAY)


def entry(verified_at: float, name: str = "r1", run_id: str = "earlier") -> CacheEntry:
    return CacheEntry(name, ST.size, ST.mtime_ns, ST.inode, ST.ctime_ns, SHA, verified_at, run_id)


@pytest.mark.parametrize(
    ("verified_at", "scrub", "expected"),
    [
        (NOW - DAY, 30 * DAY, False),
        (NOW, 30 * DAY, False),
        (NOW - 30 * DAY, 30 * DAY, True),
        (NOW + 1.0, 30 * DAY, True),
        (NOW + YEAR, 30 * DAY, True),
        (NOW + YEAR, None, False),  # scrubbing off: never due
        (NOW - YEAR, None, False),
    ],
)
def test_due(verified_at: float, scrub: float | None, expected: bool) -> None:
    assert due(verified_at, now=NOW, scrub=scrub) is expected


@pytest.mark.parametrize(
    ("cached", "policy", "reason"),
    [
        (entry(NOW + YEAR), SCRUB, DUE),
        (entry(NOW + DAY), SCRUB, DUE),
        (entry(NOW - DAY), SCRUB, None),
        (entry(NOW + YEAR), NO_SCRUB, None),
        (entry(NOW + YEAR, run_id="this-run"), SCRUB, None),  # read by this (resumed) run
    ],
)
def test_hash_reason_after_a_clock_step(
    cached: CacheEntry, policy: HashPolicy, reason: str | None
) -> None:
    assert hash_reason(cached, ST, SHA, now=NOW, policy=policy) == reason


def test_plan_reads_every_entry_verified_ahead_and_slices_the_rest() -> None:
    """Three entries read a year ahead are due; the slice still picks from the others."""
    names = [f"r{i}" for i in range(6)]
    cache = {n: entry(NOW + YEAR if i < 3 else NOW - DAY * i / 10, n) for i, n in enumerate(names)}
    policy = HashPolicy(run_started=NOW, run_id="this-run", scrub_days=3, every=DAY)
    plan = plan_hashes(
        dict.fromkeys(names, ST), dict.fromkeys(names, SHA), cache, now=NOW, policy=policy
    )
    assert {n: r for n, r in plan.items() if r == DUE} == dict.fromkeys(names[:3], DUE)
    assert all(plan.get(n) in (None, SLICE) for n in names[3:])
