"""An error outside every step (a bug in the daemon's own driving code) is retried
later each time it repeats, and its traceback is logged once, not at every retry."""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from fixtures.steps_env import Env, env
from nbankd.daemon.tally import Tally
from nbankd.daemon.wakeup import Wakeup
from nbankd.daemon.workers import BUG_RETRY_MAX, JOURNAL_RETRY, DepositWorkers, bug_retry_delay
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Progress, State

__all__ = ["env"]

NOW = 1000.0


class Bookkeeping(DepositWorkers):
    """The daemon's working half with only the state its bookkeeping reads."""

    def __init__(self) -> None:
        self.clock = lambda: NOW
        self._lock = threading.Lock()
        self._bugs = {}
        self._running = {}
        self._waiting = {}
        self._wake = Wakeup()
        self.tally = Tally()
        self.last_error = None
        self.last_deposit = None
        self.registry_problem = None
        self.request_rescan = lambda *a: None


@pytest.mark.parametrize(
    ("in_a_row", "delay"),
    [
        (1, JOURNAL_RETRY),
        (2, 2 * JOURNAL_RETRY),
        (3, 4 * JOURNAL_RETRY),
        (7, BUG_RETRY_MAX),
        (1000, BUG_RETRY_MAX),
        (0, JOURNAL_RETRY),
    ],
)
def test_bug_retry_delay(in_a_row: int, delay: float) -> None:
    """The wait doubles with each failure in a row, from JOURNAL_RETRY to BUG_RETRY_MAX."""
    assert bug_retry_delay(in_a_row) == delay


def _item(env: Env) -> Item:
    return env.drop("bug.dat", b"precious")


def test_a_repeating_bug_waits_longer_and_logs_its_traceback_once(env: Env) -> None:
    """The same item failing again in the same state waits twice as long each time;
    only the first failure in a row carries the traceback."""
    daemon, item = Bookkeeping(), _item(env)
    with capture_logs() as logs:
        waits = [daemon._step_bug(item, RuntimeError("bug")) - NOW for _ in range(4)]
    assert waits == [5.0, 10.0, 20.0, 40.0]
    assert [("exc_info" in e, e["in_a_row"]) for e in logs] == [
        (True, 1),
        (False, 2),
        (False, 3),
        (False, 4),
    ]


def test_an_item_that_moves_on_starts_the_count_again(env: Env) -> None:
    """Once the item reaches another state, a later bug waits the first wait again and
    logs its traceback again."""
    daemon, item = Bookkeeping(), _item(env)
    for _ in range(3):
        daemon._step_bug(item, RuntimeError("bug"))
    moved = item.with_progress(Progress(State.CLAIMED))
    daemon._finished(moved, 0)
    with capture_logs() as logs:
        assert daemon._step_bug(moved, RuntimeError("bug")) - NOW == JOURNAL_RETRY
    assert "exc_info" in logs[0]


def test_a_finished_item_is_forgotten(env: Env) -> None:
    """An item that reaches a final state leaves nothing behind (bounded memory)."""
    daemon, item = Bookkeeping(), _item(env)
    daemon._step_bug(item, RuntimeError("bug"))
    daemon._finished(item.with_progress(Progress(State.CANCELLED)), 0)
    assert daemon._bugs == {}
