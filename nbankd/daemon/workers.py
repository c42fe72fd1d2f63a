"""The daemon's working half: the pool of workers that drives items through their
steps, what each finished run tells the daemon (the last deposit, the last error, the
registry's and the journal's health, the tally), and the items waiting for their
backoff. A mixin of :class:`~nbankd.daemon.service.Daemon`, whose state it uses: the
configuration, the journal and steps, the notifier, the wake-up events and the lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import structlog

from nbankd.config import Config
from nbankd.daemon.lane import LANE_NAME, Lane, small
from nbankd.daemon.tally import Tally
from nbankd.daemon.wakeup import Wakeup
from nbankd.deposit import manual
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import FINAL, State
from nbankd.deposit.steps import Steps

log = structlog.get_logger("nbankd.daemon")

JOURNAL_RETRY = 5.0  # seconds between attempts while the journal cannot be written
BUG_RETRY_MAX = 300.0  # seconds: the longest wait of an item a bug keeps failing


def bug_retry_delay(in_a_row: int) -> float:
    """Seconds until an item that an unexpected error (a bug) failed ``in_a_row`` times
    in one state is tried again: JOURNAL_RETRY, doubled each time, at most BUG_RETRY_MAX."""
    return min(BUG_RETRY_MAX, JOURNAL_RETRY * 2.0 ** min(max(in_a_row, 1) - 1, 16))


class DepositWorkers:
    """Driving items on the worker pool (see the module's text)."""

    # the daemon's state this half uses (set by Daemon.__init__ and start)
    config: Config
    clock: Callable[[], float]
    notifier: Any
    journal: Journal
    steps: Steps
    pool: ThreadPoolExecutor
    lane: Lane | None
    tally: Tally
    heartbeat: float
    registry_problem: str | None
    state_problem: str | None
    journal_problem: str | None
    last_error: dict[str, Any] | None
    last_deposit: dict[str, Any] | None
    _lock: threading.Lock
    _wake: Wakeup
    _running: dict[int, Future[Item]]
    _waiting: dict[int, Item]
    _bugs: dict[int, tuple[str, int, str, str]]
    _working: dict[str, str]  # a pool worker's thread name -> the input it moves
    request_rescan: Callable[..., None]  # the daemon's scanning half

    def submit_manual(
        self,
        inbox: manual.ManualInbox,
        names: list[str],
        checked: Mapping[str, tuple[int, int]] | None = None,
    ) -> tuple[list[int], list[tuple[str, str]]]:
        """Journals and starts a manual deposit of ``names`` (in ``inbox.folder``) handed
        over by ``nbankctl deposit``; returns the items' ids and the names refused with
        why. ``checked``: the (device, inode) a name's entry had when the peer's rights
        were checked (another entry under that name is refused). Raises ConfigError when
        the folder cannot serve as an inbox (this daemon's user cannot write it)."""
        # its work and rejected folders, checked; and whether its filesystem answers
        spec = inbox.spec(prepare=True)
        manual.calibrate(spec)
        dirs = [n for n in names if os.path.isdir(inbox.folder / n)]
        items: list[Item] = []
        refused: list[tuple[str, str]] = []
        for kind, group in (("file", [n for n in names if n not in dirs]), ("dir", dirs)):
            if group:
                new, no = manual.journal_files(
                    self.journal, inbox, group, kind=kind, now=self.clock(), checked=checked
                )
                items += new
                refused += no
        for item in items:
            self._submit(item)
        return [item.id for item in items], refused

    def _submit(self, item: Item) -> None:
        with self._lock:
            if item.id in self._running or self.state_problem is not None:
                return
            self._waiting.pop(item.id, None)
            if self.lane is not None and small(item) and not self.lane.stalled(self.clock()):
                future = self.lane.submit(item)
            else:
                future = self.pool.submit(self._work, item)
            self._running[item.id] = future

    def _work(self, item: Item) -> Item:
        attempts_before = item.attempts
        heartbeat = getattr(self.notifier, "heartbeat", None)
        worker = threading.current_thread().name
        beat = (lambda: heartbeat.beat(worker)) if heartbeat is not None else None
        with self._lock:
            self._working[worker] = os.path.join(item.inbox, item.relpath_str)
        try:
            item = self.steps.drive(item, on_step=beat)
            self._journal_ok()
        except sqlite3.Error as err:  # the journal cannot be written (state_dir full?)
            item = replace(item, not_before=self._journal_failed(err))
        except Exception as err:  # a bug: keep the item, report it, retry later
            item = replace(item, not_before=self._step_bug(item, err))
        finally:
            self.heartbeat = self.clock()
            if heartbeat is not None:
                heartbeat.forget(worker)
            with self._lock:
                self._working.pop(worker, None)
        return self._finished(item, attempts_before)

    def _start_lane(self) -> None:
        """Starts the lane that moves small files in rounds (see :mod:`.lane`)."""
        heartbeat = getattr(self.notifier, "heartbeat", None)

        def beat() -> None:
            self.heartbeat = self.clock()
            if heartbeat is not None:
                heartbeat.beat(LANE_NAME)

        self.lane = Lane(
            self.steps,
            finish=self._finished,
            journal_failed=self._journal_failed,
            journal_ok=self._journal_ok,
            bug=self._step_bug,
            clock=self.clock,
            beat=beat,
            idle=(lambda: heartbeat.forget(LANE_NAME)) if heartbeat is not None else None,
        )

    def _step_bug(self, item: Item, err: Exception) -> float:
        """A step failed in a way no step expects (a bug): logged (with its traceback the
        first time in a row) and shown in status; returns when the item is tried again,
        later each time the same state fails again (:func:`bug_retry_delay`)."""
        with self._lock:
            state, before, _where, _err = self._bugs.get(item.id, (item.state.value, 0, "", ""))
            in_a_row = before + 1 if state == item.state.value else 1
            where = os.path.join(item.inbox, item.relpath_str)
            self._bugs[item.id] = (item.state.value, in_a_row, where, repr(err))
        delay = bug_retry_delay(in_a_row)
        trace: dict[str, Any] = {"exc_info": err} if in_a_row == 1 else {}
        log.error(
            "unexpected error in a deposit step",
            item=item.token,
            error=repr(err),
            in_a_row=in_a_row,
            retry_in=delay,
            **trace,
        )
        self.last_error = {"time": self.clock(), "item": item.token, "error": repr(err)}
        return self.clock() + delay

    def _finished(self, item: Item, attempts_before: int) -> Item:
        """The bookkeeping for an item a worker or the lane hands back: waiting or
        done, the tally, the last deposit and error, the registry's health."""
        with self._lock:
            self._running.pop(item.id, None)
            if item.state not in FINAL:
                self._waiting[item.id] = item
            bug = self._bugs.get(item.id)
            if bug is not None and (item.state in FINAL or bug[0] != item.state.value):
                del self._bugs[item.id]  # it moved on: a later bug starts the count again
            self.tally.record(item, attempts_before=attempts_before)
        if item.state is State.DONE:
            self.last_deposit = {
                "time": item.finished,
                "id": item.name,
                "source": item.relpath_str,
                "inbox": item.inbox,
                "url": item.url,
            }
        elif item.error_code and item.state not in FINAL:
            self.last_error = {
                "time": self.clock(),
                "item": item.token,
                "inbox": item.inbox,
                "code": item.error_code,
                "error": item.error_message,
            }
            if item.error_code in ("registry-unavailable", "auth"):
                self.registry_problem = item.error_message
        if (
            item.state in (State.DONE, State.REGISTERED, State.PUBLISHED)
            and self.registry_problem
            and item.error_code is None
        ):
            self.registry_problem = None
        if item.state in (State.RETURNED, State.CANCELLED):
            # back in the inbox, or left there (changed since it settled): seen anew
            self.request_rescan(item.inbox)
        if item.state is State.REJECTED and manual.ManualInbox.from_key(item.inbox):
            manual.return_rejected(item)  # as nbank, a refused file stays where it was
        if item.state not in FINAL:
            self._wake.set()  # a new backoff for the main loop to wait for
        return item

    def _retry_waiting(self, codes: frozenset[str]) -> None:
        """Makes the waiting items whose last failure has one of ``codes`` (waits a
        reload may end: an archive or inbox no longer configured, an archive the
        registry placed elsewhere) due now, whatever their backoff: the main loop, the
        only one resubmitting waiting items, starts them."""
        with self._lock:
            for key, item in list(self._waiting.items()):
                if item.error_code in codes and item.not_before:
                    self._waiting[key] = item.changed(not_before=0.0)
        self._wake.set()

    def _resubmit_due(self, now: float) -> float | None:
        """Resubmits waiting items whose backoff has passed; returns the next due time."""
        if self.lane is not None:
            self.lane.release_if_stalled(now)  # queued behind a stuck round: to the pool
        with self._lock:
            waiting = list(self._waiting.values())
        next_due: float | None = None
        for item in waiting:
            if item.not_before <= now:
                self._submit(item)
            else:
                next_due = item.not_before if next_due is None else min(next_due, item.not_before)
        return next_due

    # -- the journal's health -------------------------------------------------------

    def _journal_failed(self, err: sqlite3.Error) -> float:
        """A journal write failed: deposits wait (retried every JOURNAL_RETRY seconds),
        status says why, logged once; returns when the item is tried again."""
        name = getattr(err, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):  # not the disk: a lock
            why = (
                "another process holds the journal's lock (an sqlite3 shell or a backup "
                "left open on it?): close it;"
            )
        else:
            why = "is its filesystem full?"
        problem = (
            f"the journal in {self.config.state_dir} cannot be written ({err}): {why} "
            f"deposits wait and are retried every {JOURNAL_RETRY:g}s"
        )
        if problem != self.journal_problem:
            log.error("journal not writable; deposits wait", error=str(err))
        self.journal_problem = problem
        return self.clock() + JOURNAL_RETRY

    def _journal_ok(self) -> None:
        if self.journal_problem is not None:
            log.info("journal writable again; deposits resume")
            self.journal_problem = None


__all__ = ["JOURNAL_RETRY", "DepositWorkers"]
