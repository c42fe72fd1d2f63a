"""The audit's pure decisions: what to re-hash, how a walk compares with two listings,
which staging entries are leftovers, and the rolling scrub's coverage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbankd.audit.model import CacheEntry, FileStat
from nbankd.audit.plan import (
    CHANGED,
    DAY,
    DUE,
    FULL,
    NEW,
    SLICE,
    UNVERIFIED,
    HashPolicy,
    categorise,
    disagreements,
    hash_reason,
    listing_after,
    plan_hashes,
    slice_size,
    staging_leftovers,
)
from nbankd.registry.base import ResourceRecord

SHA = "a" * 40
OTHER = "b" * 40
ST = FileStat(size=10, mtime_ns=1_000, inode=7, ctime_ns=2_000)
NOW = 100 * DAY
RUN = "this-run"


def entry(
    verified_at: float,
    *,
    sha1: str = SHA,
    st: FileStat = ST,
    name: str = "r1",
    run_id: str = "an-earlier-run",
) -> CacheEntry:
    return CacheEntry(name, st.size, st.mtime_ns, st.inode, st.ctime_ns, sha1, verified_at, run_id)


POLICY = HashPolicy(run_started=NOW, run_id=RUN, scrub_days=30, every=DAY)


@pytest.mark.parametrize(
    ("cached", "stat", "registered", "policy", "reason"),
    [
        (None, ST, SHA, POLICY, NEW),
        (entry(NOW - DAY), FileStat(11, 1_000, 7, 2_000), SHA, POLICY, CHANGED),
        (entry(NOW - DAY), FileStat(10, 2_000, 7, 2_000), SHA, POLICY, CHANGED),
        (entry(NOW - DAY), FileStat(10, 1_000, 8, 2_000), SHA, POLICY, CHANGED),
        (entry(NOW - DAY), FileStat(10, 1_000, 7, 3_000), SHA, POLICY, CHANGED),
        (entry(NOW - DAY), ST, OTHER, POLICY, UNVERIFIED),
        (entry(NOW - DAY), ST, SHA.upper(), POLICY, None),
        (entry(NOW - DAY), ST, None, POLICY, None),
        (entry(NOW - DAY), ST, SHA, HashPolicy(run_started=NOW, run_id=RUN, full=True), FULL),
        (entry(NOW - DAY, run_id=RUN), ST, SHA, HashPolicy(NOW, run_id=RUN, full=True), None),
        (entry(NOW + 5), ST, SHA, HashPolicy(run_started=NOW, run_id=RUN, full=True), FULL),
        (entry(NOW - 30 * DAY), ST, SHA, POLICY, DUE),
        (entry(NOW - 29 * DAY), ST, SHA, POLICY, None),
        (entry(NOW - 300 * DAY), ST, SHA, HashPolicy(run_started=NOW, scrub_days=0), None),
        (entry(NOW - 300 * DAY, sha1=OTHER), ST, SHA, POLICY, UNVERIFIED),
    ],
    ids=[
        "no-cache",
        "size",
        "mtime",
        "inode",
        "ctime",
        "registry-differs",
        "case-insensitive",
        "no-registered-hash",
        "full",
        "full-resumed-already-read",
        "full-read-later-by-another-run",
        "due",
        "not-yet-due",
        "scrub-off",
        "mismatch-confirmed-by-reading",
    ],
)
def test_hash_reason_table(
    cached: CacheEntry | None,
    stat: FileStat,
    registered: str | None,
    policy: HashPolicy,
    reason: str | None,
) -> None:
    """Each cache/stat/registry combination gives the documented reason to re-hash."""
    assert hash_reason(cached, stat, registered, now=NOW, policy=policy) == reason


@pytest.mark.parametrize(
    ("total", "runs", "size"),
    [(0, 30, 0), (1, 30, 1), (30, 30, 1), (31, 30, 2), (100_000, 30, 3334), (10, 0, 0)],
)
def test_slice_size_table(total: int, runs: int, size: int) -> None:
    """The rolling slice is ceil(total / runs per scrub period); no scrub, no slice."""
    assert slice_size(total, runs) == size


def test_runs_per_scrub_follows_every() -> None:
    """Audits every 6 hours over 30 days make 120 runs per scrub period; at least one."""
    assert HashPolicy(run_started=0, scrub_days=30, every=6 * 3600).runs_per_scrub == 120
    assert HashPolicy(run_started=0, scrub_days=1, every=7 * DAY).runs_per_scrub == 1
    assert HashPolicy(run_started=0, scrub_days=0).runs_per_scrub == 0


def test_plan_takes_the_oldest_for_the_slice_and_skips_unchanged() -> None:
    """With nothing changed, a run reads exactly the slice: the least recently verified."""
    names = [f"r{i}" for i in range(10)]
    stored = {n: ST for n in names}
    expected = dict.fromkeys(names, SHA)
    cache = {n: entry(NOW - DAY - i * 3600, name=n) for i, n in enumerate(names)}
    policy = HashPolicy(run_started=NOW, scrub_days=5, every=DAY)  # 5 runs: 2 each
    assert plan_hashes(stored, expected, cache, now=NOW, policy=policy) == {
        "r9": SLICE,
        "r8": SLICE,
    }


def test_plan_counts_what_this_run_already_read() -> None:
    """A resumed run does not read a second slice: entries this run (by id) read count."""
    names = [f"r{i}" for i in range(10)]
    stored = {n: ST for n in names}
    expected = dict.fromkeys(names, SHA)
    cache = {n: entry(NOW - DAY, name=n) for n in names}
    cache["r0"] = entry(NOW - 7 * DAY, name="r0", run_id=RUN)  # the clock stepped back
    cache["r1"] = entry(NOW + 2, name="r1", run_id=RUN)
    policy = HashPolicy(run_started=NOW, run_id=RUN, scrub_days=5, every=DAY)
    assert plan_hashes(stored, expected, cache, now=NOW + 3, policy=policy) == {}


def test_plan_reads_new_and_changed_but_not_missing_or_unexpected() -> None:
    """New and changed resources are read; one that is not stored, or not expected, is not."""
    stored = {"new": ST, "changed": FileStat(1, 1, 1, 1), "same": ST, "stray": ST}
    expected = {"new": SHA, "changed": SHA, "same": SHA, "gone": SHA}
    cache = {
        "changed": entry(NOW - DAY, name="changed"),
        "same": entry(NOW - DAY, name="same"),
        "gone": entry(NOW - DAY, name="gone"),
    }
    policy = HashPolicy(run_started=NOW, scrub_days=0)
    assert plan_hashes(stored, expected, cache, now=NOW, policy=policy) == {
        "new": NEW,
        "changed": CHANGED,
    }


@given(
    n=st.integers(min_value=1, max_value=60),
    scrub_days=st.integers(min_value=1, max_value=10),
    every_hours=st.sampled_from([1, 6, 12, 24, 48]),
)
@settings(max_examples=60, deadline=None)
def test_rolling_scrub_reads_everything_within_scrub_days(
    n: int, scrub_days: int, every_hours: int
) -> None:
    """Simulated scheduled runs over unchanged resources: each resource is read at least
    once in every scrub period, and no run reads more than the slice plus what fell due."""
    every = every_hours * 3600.0
    names = [f"r{i}" for i in range(n)]
    stored = {x: ST for x in names}
    expected = dict.fromkeys(names, SHA)
    now = 0.0
    cache = {x: entry(now, name=x) for x in names}  # all read at t=0
    last_read = dict.fromkeys(names, now)
    scrub = scrub_days * DAY
    horizon = 3 * scrub
    while now < horizon:
        now += every
        policy = HashPolicy(run_started=now, scrub_days=scrub_days, every=every)
        plan = plan_hashes(stored, expected, cache, now=now, policy=policy)
        assert len(plan) <= max(slice_size(n, policy.runs_per_scrub), 1) + sum(
            1 for r in plan.values() if r == DUE
        )
        for x in plan:
            cache[x] = entry(now, name=x)
            last_read[x] = now
        assert all(now - t <= scrub for t in last_read.values()), (now, last_read)


LIST = {"a": SHA, "b": SHA, "c": None}


@pytest.mark.parametrize(
    ("stored", "before", "after", "in_flight", "missing", "unregistered", "expected"),
    [
        # agreement: nothing to report, everything stored is checked
        (["a", "b", "c"], LIST, LIST, set(), [], [], {"a": SHA, "b": SHA, "c": None}),
        # a file gone from the archive, registered all along
        (["a", "c"], LIST, LIST, set(), ["b"], [], {"a": SHA, "c": None}),
        # a stray file, registered in neither listing
        (["a", "b", "c", "x"], LIST, LIST, set(), [], ["x"], {"a": SHA, "b": SHA, "c": None}),
        # added during the audit: in the after listing only, not yet walked
        (["a", "b", "c"], LIST, {**LIST, "n": SHA}, set(), [], [], {"a": SHA, "b": SHA, "c": None}),
        # added during the audit and walked: registered in the after listing
        (["a", "b", "c", "n"], LIST, {**LIST, "n": SHA}, set(), [], [], {**LIST, "n": SHA}),
        # pruned during the audit, file already gone: in the before listing only
        (["a", "c"], LIST, {"a": SHA, "c": None}, set(), [], [], {"a": SHA, "c": None}),
        # pruned during the audit, file still there when walked
        (["a", "b", "c"], LIST, {"a": SHA, "c": None}, set(), [], [], LIST),
        # in flight: registered, not yet published
        (["a", "c"], LIST, LIST, {"b"}, [], [], {"a": SHA, "c": None}),
        # in flight: published, registry not yet listing it (another order of steps)
        (["a", "b", "c", "y"], LIST, LIST, {"y"}, [], [], LIST),
    ],
    ids=[
        "clean",
        "missing",
        "unregistered",
        "added-not-walked",
        "added-and-walked",
        "pruned-gone",
        "pruned-still-there",
        "in-flight-registered",
        "in-flight-published",
    ],
)
def test_categorise_table(
    stored: list[str],
    before: dict[str, str | None],
    after: dict[str, str | None],
    in_flight: set[str],
    missing: list[str],
    unregistered: list[str],
    expected: dict[str, str | None],
) -> None:
    """The walk against before/after listings: only disagreements that held all along count."""
    cats = categorise(stored, before, after, in_flight)
    assert list(cats.missing) == missing
    assert list(cats.unregistered) == unregistered
    assert cats.expected == expected


def test_categorise_reports_what_it_left_out_for_being_in_flight() -> None:
    """Names in flight that the walk or a listing saw are counted as skipped."""
    cats = categorise(["a", "y"], {"a": SHA, "b": SHA}, {"a": SHA, "b": SHA}, {"b", "y", "zz"})
    assert cats.in_flight == ("b", "y")


@pytest.mark.parametrize(
    ("found", "in_flight", "asked"),
    [
        (["a", "b", "c"], set(), []),  # agreement: the registry is not asked again
        (["a", "c"], set(), ["b"]),  # listed, not found
        (["a", "b", "c", "x"], set(), ["x"]),  # found, not listed
        (["a", "c", "x"], {"b", "x"}, []),  # disagreements in flight are left out
    ],
    ids=["agree", "not-found", "not-listed", "in-flight"],
)
def test_only_disagreements_are_asked_about_after_the_walk(
    found: list[str], in_flight: set[str], asked: list[str]
) -> None:
    """The registry is asked again only about names where the walk and listing differ."""
    assert disagreements(found, LIST, in_flight) == asked


def record(name: str, *locations: str, sha1: str | None = SHA) -> ResourceRecord:
    return ResourceRecord(name=name, dtype="d", sha1=sha1, locations=locations)


@pytest.mark.parametrize(
    ("asked", "answers", "after"),
    [
        ([], {}, LIST),
        # pruned during the walk: no longer located here, or gone from the registry
        (["b"], {"b": record("b", "tape")}, {"a": SHA, "c": None}),
        (["b"], {}, {"a": SHA, "c": None}),
        # registered here during the walk (hash kept lowercase), or still here
        (["x"], {"x": record("x", "arch", sha1=SHA.upper())}, {**LIST, "x": SHA}),
        (["b"], {"b": record("b", "arch")}, LIST),
        # registered elsewhere only: not part of this archive's view
        (["x"], {"x": record("x", "other")}, LIST),
    ],
    ids=["none-asked", "pruned", "deleted", "added", "still-here", "elsewhere"],
)
def test_listing_after_the_walk_applies_the_answers_to_the_listing(
    asked: list[str], answers: dict[str, ResourceRecord], after: dict[str, str | None]
) -> None:
    """Each asked name is placed here or removed according to its record's locations."""
    assert listing_after(LIST, "arch", answers, asked) == after


@pytest.mark.parametrize(
    ("entries", "tokens", "leftovers"),
    [
        ([(".nbankd-t1", 0.0)], {"t1"}, []),
        ([(".nbankd-t1", 0.0)], set(), [".nbankd-t1"]),
        ([(".nbankd-t2", 0.0)], {"t1"}, [".nbankd-t2"]),
        ([("x.zip", 0.0)], {"t1"}, ["x.zip"]),
        ([(".nbankd-t9", 990.0)], set(), []),  # young: another host may be writing it
        ([("t1", 0.0)], {"t1"}, ["t1"]),  # a token without the prefix is not ours
        ([(".nbankd-t1-0a1b2c3d", 0.0)], {"t1"}, []),  # named with the writer's instance
        ([(".nbankd-t1-0a1b2c3d", 0.0)], set(), [".nbankd-t1-0a1b2c3d"]),
    ],
    ids=[
        "in-flight",
        "orphan",
        "other-token",
        "nbank-name",
        "young",
        "no-prefix",
        "in-flight-instance",
        "orphan-instance",
    ],
)
def test_staging_leftovers_table(
    entries: list[tuple[str, float]], tokens: set[str], leftovers: list[str]
) -> None:
    """Staging entries are leftovers unless an in-flight item owns them or they are fresh."""
    assert staging_leftovers(entries, tokens, now=1000.0, grace=60.0) == leftovers
