"""The daemon's running totals (nbankd.daemon.tally): one item folded in at a time."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fixtures.items import ITEM as BASE
from nbankd.daemon.tally import LATENCY_BUCKETS, Tally
from nbankd.deposit.lifecycle import State


def test_a_deposit_counts_its_bytes_latency_and_time() -> None:
    """A deposited item adds one deposit, its bytes, its latency and the inbox's time."""
    tally = Tally()
    tally.record(replace(BASE, state=State.DONE, size=4096, finished=103.0), attempts_before=0)
    assert tally.deposits == {("/srv/inbox/rig3", "birdsong", "deposited"): 1}
    assert tally.deposited_bytes == {("/srv/inbox/rig3", "birdsong"): 4096}
    assert tally.last_deposit == {"/srv/inbox/rig3": 103.0}
    hist = tally.latency["/srv/inbox/rig3"]
    assert (hist.count, hist.total) == (1, 3.0)
    assert hist.buckets[LATENCY_BUCKETS.index(5.0)] == 1


def test_an_already_deposited_input_counts_under_its_outcome() -> None:
    """A re-dropped input found stored already counts as already-deposited."""
    tally = Tally()
    done = replace(BASE, state=State.DONE, already=True, size=1, finished=101.0)
    tally.record(done, attempts_before=0)
    assert tally.deposits == {("/srv/inbox/rig3", "birdsong", "already-deposited"): 1}


@pytest.mark.parametrize(
    ("reason", "code"),
    [({"code": "duplicate", "message": "m"}, "duplicate"), (None, "rejected")],
)
def test_a_rejection_counts_under_its_code(reason: dict[str, str] | None, code: str) -> None:
    """A rejected item counts under the code of its reason (or 'rejected' without one)."""
    tally = Tally()
    reason_json = json.dumps(reason) if reason is not None else None
    tally.record(replace(BASE, state=State.REJECTED, reason_json=reason_json), attempts_before=0)
    assert tally.rejections == {("/srv/inbox/rig3", code): 1}


def test_a_failed_step_counts_once_per_new_attempt() -> None:
    """A failure is counted once per new failed attempt, not again when handed back unchanged."""
    tally = Tally()
    waiting = replace(BASE, state=State.CHECKED, attempts=2, error_code="registry-unavailable")
    tally.record(waiting, attempts_before=1)
    tally.record(waiting, attempts_before=2)
    assert tally.failures == {"registry-unavailable": 1}


def test_a_copy_is_independent() -> None:
    """A snapshot's copy does not change when the daemon counts on."""
    tally = Tally()
    copy = tally.copy()
    tally.record(replace(BASE, state=State.DONE, size=1, finished=101.0), attempts_before=0)
    assert copy.deposits == {} and copy.latency == {}


def test_registry_and_archive_errors_are_counted_apart() -> None:
    """A failed step counts as a registry error or as an error of its item's archive."""
    tally = Tally()
    tally.record(replace(BASE, attempts=1, error_code="registry-unavailable"), attempts_before=0)
    tally.record(replace(BASE, attempts=1, error_code="archive-unavailable"), attempts_before=0)
    tally.record(replace(BASE, attempts=2, error_code="os-error"), attempts_before=1)
    tally.record(replace(BASE, attempts=1, error_code="internal"), attempts_before=0)
    assert tally.registry_errors == 1
    assert tally.archive_errors == {"birdsong": 2}
    copy = tally.copy()
    tally.record(replace(BASE, attempts=3, error_code="os-error"), attempts_before=2)
    assert copy.archive_errors == {"birdsong": 2} and copy.registry_errors == 1
