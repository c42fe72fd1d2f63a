"""The audit's decisions, as pure functions of what was seen (no I/O, no clock).

**Which resources to re-hash.** The cache remembers, per archive and resource,
the stat (size, mtime, inode, ctime) and the SHA-1 read at ``verified_at`` by
run ``run_id``. A resource is re-hashed when:

- ``new``: the cache has no entry for it;
- ``changed``: its size, mtime, inode or ctime differ from the cached ones;
- ``unverified``: the cached SHA-1 differs from the registered one (a mismatch is
  always confirmed by a fresh read before it is reported);
- ``full``: a full audit re-reads everything not yet read during this run;
- ``due``: it was last read ``scrub_days`` ago or more (the hard guarantee), or
  at a time still to come (read while the clock was ahead: how long ago is not
  known, so it is read now rather than never);
- ``slice``: the rolling scrub: each run also reads the least recently verified
  resources, ``ceil(N / runs per scrub period)`` of them, minus those already
  read during this run, so the load is spread evenly instead of everything
  falling due at once.

"During this run" means the entry's ``run_id`` is this run's id (not a time, which
a clock step could confuse): an interrupted run that resumes keeps its id, so what
it already read is not read again.

**What the walk means.** A file in the archive and what the registry says the
archive holds *before* and *after* the walk are compared, leaving out every
resource the deposit journal shows in flight:

- registered but missing: registered before and after, and not found by the walk;
- present but unregistered: found by the walk and registered neither before nor after;
- a resource registered at only one of the two times was added or pruned during
  the audit: no finding.

"Before" is the listing of the archive, taken while the walk runs. "After" is
that listing updated with the registry's answers, asked once the walk is done,
about the names where the walk and the listing disagree
(:func:`disagreements`, :func:`listing_after`). Only those names can turn into a
finding, so asking about them alone gives the same findings as listing the whole
archive again, and costs nothing when the walk and the listing agree.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from nbankd.archive.layout import parse_staged_name
from nbankd.audit.model import CacheEntry, FileStat, young
from nbankd.registry.base import ResourceRecord

DAY = 86400.0

NEW = "new"
CHANGED = "changed"
UNVERIFIED = "unverified"
FULL = "full"
DUE = "due"
SLICE = "slice"
REASONS = (NEW, CHANGED, UNVERIFIED, FULL, DUE, SLICE)


@dataclass(frozen=True)
class HashPolicy:
    """How much an audit reads, beyond what changed."""

    run_started: float  # start of this run (kept when a run resumes)
    full: bool = False
    run_id: str = ""  # this run's id (kept when a run resumes); "" matches no entry
    scrub_days: int = 30  # 0: no scrubbing, only changed resources are read
    every: float = DAY  # seconds between scheduled audits (sizes the rolling slice)

    @property
    def scrub_seconds(self) -> float | None:
        return self.scrub_days * DAY if self.scrub_days > 0 else None

    @property
    def runs_per_scrub(self) -> int:
        """Scheduled audits in one scrub period (at least 1)."""
        if self.scrub_seconds is None:
            return 0
        return max(1, math.floor(self.scrub_seconds / max(self.every, 1.0)))


def slice_size(total: int, runs_per_scrub: int) -> int:
    """Resources each run must read so that ``runs_per_scrub`` runs read all ``total``."""
    if runs_per_scrub <= 0 or total <= 0:
        return 0
    return math.ceil(total / runs_per_scrub)


def hash_reason(
    entry: CacheEntry | None,
    st: FileStat,
    registered_sha1: str | None,
    *,
    now: float,
    policy: HashPolicy,
) -> str | None:
    """Why this resource must be read now, or None (it may still be picked for the slice)."""
    if entry is None:
        return NEW
    if (entry.size, entry.mtime_ns, entry.inode, entry.ctime_ns) != st:
        return CHANGED
    if (
        registered_sha1 is not None
        and entry.sha1 != registered_sha1
        and entry.sha1 != registered_sha1.lower()
    ):
        return UNVERIFIED
    if policy.run_id and entry.run_id == policy.run_id:
        return None  # read earlier in this (resumed) run
    if policy.full:
        return FULL
    if due(entry.verified_at, now=now, scrub=policy.scrub_seconds):
        return DUE
    return None


def due(verified_at: float, *, now: float, scrub: float | None) -> bool:
    """True if a resource last read at ``verified_at`` must be read again by the scrub:
    ``scrub`` seconds ago or more, or after ``now`` (read while the clock was ahead;
    its age is unknown, and left alone it would not come due until the clock caught
    up). False when scrubbing is off (``scrub`` None)."""
    return scrub is not None and (now - verified_at >= scrub or verified_at > now)


def plan_hashes(
    stored: Mapping[str, FileStat],
    expected: Mapping[str, str | None],
    cache: Mapping[str, CacheEntry],
    *,
    now: float,
    policy: HashPolicy,
) -> dict[str, str]:
    """{name: reason} for the resources of ``expected`` (registered, not in flight) to read.

    ``stored`` is what the walk found; a resource in ``expected`` but not stored is
    not read (it is reported missing, or was pruned).
    """
    plan: dict[str, str] = {}
    resting: list[tuple[float, str]] = []
    done_this_run = 0
    run_id, full, scrub = policy.run_id or None, policy.full, policy.scrub_seconds
    for name, want in expected.items():
        st = stored.get(name)
        if st is None:
            continue
        entry = cache.get(name)
        if (  # the common case, checked inline: unchanged, verified, not due
            entry is not None
            and entry[1:5] == st
            and (want is None or entry.sha1 == want)
            and entry.run_id != run_id
            and not full
            and (scrub is None or 0 <= now - entry.verified_at < scrub)
        ):
            resting.append((entry.verified_at, name))
            continue
        reason = hash_reason(entry, st, want, now=now, policy=policy)
        if reason is not None:
            plan[name] = reason
        elif entry is not None and entry.run_id == run_id:
            done_this_run += 1
        elif entry is not None:
            resting.append((entry.verified_at, name))
    want_n = slice_size(len(expected), policy.runs_per_scrub) - done_this_run
    want_n -= sum(1 for r in plan.values() if r in (DUE, FULL))
    if want_n > 0 and resting:
        for _, name in heapq.nsmallest(want_n, resting):
            plan[name] = SLICE
    return plan


@dataclass(frozen=True)
class Categories:
    """The walk compared with the two registry listings."""

    missing: tuple[str, ...]  # registered in both listings, not found (candidates)
    unregistered: tuple[str, ...]  # found, registered in neither listing (candidates)
    expected: dict[str, str | None]  # found and registered: name -> registered sha1
    in_flight: tuple[str, ...]  # left out because the journal shows them in flight


def categorise(
    stored: Iterable[str],
    before: Mapping[str, str | None],
    after: Mapping[str, str | None],
    in_flight: Set[str],
) -> Categories:
    """Compares the walk (``stored`` names) with the listings (name -> sha1) taken
    before and after it, leaving out the names in flight (see the module docstring)."""
    found = set(stored)
    flying = set(in_flight)
    skipped = sorted(n for n in flying if n in found or n in before or n in after)
    missing = sorted((before.keys() & after.keys()) - found - flying)
    unregistered = sorted(found - before.keys() - after.keys() - flying)
    expected: dict[str, str | None] = {n: after[n] for n in (found & after.keys()) - flying}
    for name in (found & before.keys()) - after.keys() - flying:
        expected[name] = before[name]
    return Categories(tuple(missing), tuple(unregistered), expected, tuple(skipped))


def disagreements(
    found: Iterable[str], listed: Mapping[str, str | None], in_flight: Set[str]
) -> list[str]:
    """Names found but not listed, or listed but not found, and not in flight: the
    ones to ask the registry about again after the walk."""
    walked = set(found)
    return sorted((walked ^ listed.keys()) - in_flight)


def listing_after(
    before: Mapping[str, str | None],
    archive: str,
    answers: Mapping[str, ResourceRecord],
    asked: Iterable[str],
) -> dict[str, str | None]:
    """The registry's view of ``archive`` after the walk: ``before``, with each name in
    ``asked`` placed here (with its SHA-1, lowercase) if its record in ``answers`` has a
    location in ``archive``, and removed if not (or if the registry no longer knows it)."""
    after = dict(before)
    for name in asked:
        record = answers.get(name)
        if record is not None and archive in record.locations:
            after[name] = record.sha1.lower() if record.sha1 else None
        else:
            after.pop(name, None)
    return after


def staging_leftovers(
    entries: Iterable[tuple[str, float]],
    in_flight_tokens: Set[str],
    *,
    now: float,
    grace: float,
) -> list[str]:
    """Names in ``staging/`` to report: not a staged copy of an item in flight, and
    not modified within ``grace`` seconds (a copy another host's daemon, or nbank,
    is writing right now). ``entries`` are (name, mtime)."""
    out = []
    for name, mtime in entries:
        # .nbankd-TOKEN (older releases) or .nbankd-TOKEN-INSTANCE
        staged = parse_staged_name(name)
        if staged is not None and staged.token in in_flight_tokens:
            continue
        if young(mtime, now=now, grace=grace):
            continue
        out.append(name)
    return sorted(out)


__all__ = [
    "CHANGED",
    "DUE",
    "FULL",
    "NEW",
    "REASONS",
    "SLICE",
    "UNVERIFIED",
    "Categories",
    "HashPolicy",
    "categorise",
    "disagreements",
    "due",
    "hash_reason",
    "listing_after",
    "plan_hashes",
    "slice_size",
    "staging_leftovers",
    "young",
]
