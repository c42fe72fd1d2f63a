"""The lane for small files: one thread moving up to :data:`BATCH` items in rounds
(:mod:`nbankd.deposit.rounds`), each round one journal commit for all of them.

Items join between rounds and leave when they are final, must wait (a backoff), or
turn out large: a file past :data:`SMALL` bytes (known once claimed) is handed back
so that a worker of the pool copies it, and a long copy never holds up the small
files queued behind it. What leaves is handed to ``finish``, the daemon's
bookkeeping for an item a worker hands back; its future then holds the item.

Registrations with a remote registry run on :data:`REMOTE_WORKERS` threads of their
own while rounds go on; each answer is saved by the next round's transaction. An
item waits only for its own registration, never for the others'. Up to
:data:`WAITING` registrations under way take no room in a round; beyond them the lane
takes no new item until answers come (:func:`room_for`), and waiting long for them is
a status problem (:meth:`Lane.problem`). A round that would save answers while other
registrations are still under way first waits until :data:`GATHER` seconds have gone
by since the last round, unless half a round's work is ready (:func:`gather_for`):
answers arriving one at a time then share a round's fsyncs and commit. A round with
no answer to save, or none still awaited, never waits.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import structlog

from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import Step, next_step
from nbankd.deposit.rounds import Moved, answered, remote_step, run_round
from nbankd.deposit.stepbase import StepResult
from nbankd.deposit.steps import Steps
from nbankd.service.limits import start_all_threads

log = structlog.get_logger("nbankd.daemon")

BATCH = 64  # items in one round at most (besides registrations waiting for answers)
SMALL = 1 << 20  # bytes: a larger file is copied by a worker of the pool
REMOTE_WORKERS = 4  # registrations with a remote registry at once
#: registrations waiting for their answers that take no room in a round; beyond them
#: each keeps a new item out, so a registry slower than the disk never has the whole
#: burst claimed, staged and gone over at every round
WAITING = 64
LANE_NAME = "deposit-lane"
STALL = 60.0  # seconds without a sign of life inside a round: new small items go to the pool
STOP_GRACE = 4.0  # seconds a stop waits for registrations under way (the daemon's is 5)
#: seconds since the last round a round saving answers waits for more while other
#: registrations are under way, unless half a round's work is ready sooner: answers
#: trickling in one at a time then share a round's fsyncs and commit
GATHER = 0.02


def small(item: Item) -> bool:
    """True for an input the lane takes: a file not known to be larger than SMALL."""
    if item.kind != "file" or item.zipped:
        return False
    if item.size is not None:
        return item.size <= SMALL
    if item.identity:
        return int(json.loads(item.identity).get("size") or 0) <= SMALL
    return True  # not claimed yet: the claim is cheap, and tells


@dataclass
class _Entry:
    item: Item
    future: Future[Item]
    attempts_before: int
    #: the step of the item running on a remote-registry thread, and its future
    remote: tuple[Step, Future[StepResult]] | None = None

    @property
    def waiting(self) -> bool:
        """True while its remote step has not answered."""
        return self.remote is not None and not self.remote[1].done()

    @property
    def answered(self) -> bool:
        """True once its remote step has answered."""
        return self.remote is not None and self.remote[1].done()

    def answer(self) -> Moved:
        """Its remote step's result (it has answered)."""
        assert self.remote is not None
        step, future = self.remote
        return answered(self.item, step, future)


def gather_for(since_round: float, ready: int, answered: int, waiting: int) -> float:
    """Seconds the lane waits before its next round: while the round would save
    ``answered`` registrations (of its ``ready`` items) and ``waiting`` others are still
    under way, and fewer than half a round's items are ready, until :data:`GATHER`
    seconds have gone by since the last round ended (``since_round`` ago); else none.
    A round without an answer to save never waits: an input waits at most once, for
    its own answer's round, and not at all when no other registration is under way."""
    if answered == 0 or waiting == 0 or ready >= BATCH // 2:
        return 0.0
    return max(0.0, GATHER - max(0.0, since_round))


def room_for(local: int, waiting: int) -> int:
    """How many queued items a round may take beside ``local`` items moving and
    ``waiting`` registrations under way: up to :data:`WAITING` registrations take no
    room (the next items are claimed and staged meanwhile), the rest do."""
    return max(0, BATCH - local - max(0, waiting - WAITING))


class Lane:
    """One thread moving small items in rounds (see the module's text)."""

    def __init__(
        self,
        steps: Steps,
        *,
        finish: Callable[[Item, int], Item],
        journal_failed: Callable[[sqlite3.Error], float],
        journal_ok: Callable[[], None],
        bug: Callable[[Item, Exception], float],
        clock: Callable[[], float],
        beat: Callable[[], None] | None = None,
        idle: Callable[[], None] | None = None,
    ) -> None:
        self.steps = steps
        self._finish = finish
        self._journal_failed = journal_failed
        self._journal_ok = journal_ok
        self._bug = bug
        self._clock = clock
        self._beat = beat
        self._idle = idle
        self._cond = threading.Condition()
        self._queued: deque[_Entry] = deque()
        self._stopping = False
        self._busy = False  # a round is under way
        self._beaten = clock()  # the last sign of life inside a round
        self._stall_logged = False
        #: since when the lane has waited for registrations' answers with nothing else
        #: it may do (None: it has not)
        self.waiting_since: float | None = None
        self._round_ended = time.monotonic()  # when the last round ended
        self._remote = ThreadPoolExecutor(REMOTE_WORKERS, thread_name_prefix="deposit-remote")
        start_all_threads(self._remote, REMOTE_WORKERS, "registration workers")
        self._thread = threading.Thread(target=self._run, name=LANE_NAME, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future[Item]:
        """Queues ``item`` for the next round; its future holds the item once it leaves."""
        future: Future[Item] = Future()
        with self._cond:
            if self._stopping:
                future.cancel()
                return future
            self._queued.append(_Entry(item, future, item.attempts))
            self._cond.notify()
        return future

    def stalled(self, now: float) -> bool:
        """True when a round has shown no sign of life for :data:`STALL` seconds (a step
        stuck on a dead mount): new small items then go to the pool instead."""
        return self._busy and now - self._beaten > STALL

    def problem(self, now: float) -> str | None:
        """Status's line while stalled, or while waiting more than :data:`STALL`
        seconds for the registry's answers with nothing else it may do (a degraded
        daemon); else None."""
        if self.stalled(now):
            return (
                f"the lane of small files has shown no progress for {now - self._beaten:.0f}s "
                "(a step stuck on an unresponsive filesystem or registry?); new small files "
                "go to the worker pool meanwhile"
            )
        since = self.waiting_since
        if since is not None and now - since > STALL:
            return (
                f"the lane of small files has waited {now - since:.0f}s for the registry "
                "to answer its registrations; the small files behind them wait too (is "
                "the registry slow or hung?)"
            )
        return None

    def release_if_stalled(self, now: float) -> int:
        """When stalled, hands the items queued behind the stuck round back to the
        daemon (which gives them to the pool); returns how many. Logs a stall once."""
        if not self.stalled(now):
            self._stall_logged = False
            return 0
        with self._cond:
            queued, self._queued = list(self._queued), deque()
        if not self._stall_logged:
            self._stall_logged = True
            log.warning(
                "the lane of small files shows no progress; new small files go to the "
                "worker pool until it does",
                seconds=round(now - self._beaten),
                handed_to_pool=len(queued),
            )
        for entry in queued:
            self._leave(entry, entry.item)
        return len(queued)

    def stop(self) -> None:
        """Takes no more items: queued ones are cancelled (the journal holds them), the
        round under way ends, registrations under way are waited for (up to
        :data:`STOP_GRACE` seconds) and saved, and every future is resolved."""
        with self._cond:
            self._stopping = True
            queued, self._queued = list(self._queued), deque()
            self._cond.notify()
        for entry in queued:
            entry.future.cancel()
        self._remote.shutdown(wait=False, cancel_futures=True)

    def _alive(self) -> None:
        """A sign of life: before every step, fsync and commit of a round."""
        self._beaten = self._clock()
        if self._beat is not None:
            self._beat()

    def _take(self, active: list[_Entry]) -> bool:
        """Moves queued items into ``active`` (as many as :func:`room_for` allows),
        waiting while there is nothing to do: no item (``idle`` is called then), or only
        registrations waiting for their answers and no room for another item
        (:attr:`waiting_since` says since when; the lane is not idle then: the
        watchdog keeps expecting its beats), then for as long as :func:`gather_for`
        says. False once stopping."""
        with self._cond:
            while not self._stopping and all(e.waiting for e in active):
                if self._queued and self._room(active) > 0:
                    break
                if not active and self._idle is not None:
                    self._idle()
                if active and self.waiting_since is None:
                    self.waiting_since = self._clock()
                self._cond.wait()
            self.waiting_since = None
            while not self._stopping:  # answers and new items gather for a shared round
                delay = gather_for(
                    time.monotonic() - self._round_ended,
                    sum(1 for e in active if not e.waiting)
                    + min(len(self._queued), self._room(active)),
                    sum(1 for e in active if e.answered),
                    sum(1 for e in active if e.waiting),
                )
                if delay <= 0:
                    break
                self._cond.wait(delay)
            if self._stopping:
                return False
            room = self._room(active)
            while self._queued and room > 0:
                active.append(self._queued.popleft())
                room -= 1
            return True

    @staticmethod
    def _room(active: list[_Entry]) -> int:
        waiting = sum(1 for e in active if e.remote is not None)
        return room_for(len(active) - waiting, waiting)

    def _poke(self, _done: object = None) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        active: list[_Entry] = []
        self.steps.set_beat(self._alive)
        while self._take(active):
            self._alive()
            self._busy = True
            try:
                active = self._round(active)
            except Exception as err:  # a bug outside the steps: never the lane's end
                log.exception("unexpected error in the lane; its items are tried again")
                idle = [e for e in active if not e.waiting]  # not a registration under way
                active = self._drop(idle, active, functools.partial(self._retry, err))
            finally:
                self._busy = False
                self._round_ended = time.monotonic()
        self._stopped(active)

    def _stopped(self, active: list[_Entry]) -> None:
        """Saves the registrations that answer within STOP_GRACE, then resolves every
        future (the journal holds each item as last saved)."""
        wait([e.remote[1] for e in active if e.remote is not None], timeout=STOP_GRACE)
        back = [e for e in active if e.answered]
        answers = [e.answer() for e in back]
        try:
            for entry, m in zip(
                back, run_round(self.steps, [], now=self._clock(), answered=answers), strict=True
            ):
                if m.outcome is not None:
                    entry.item = m.item
        except Exception:  # the journal is gone too: recovery asks the registry again
            log.exception("registrations answered at the stop could not be saved")
        for entry in active:
            entry.future.set_result(entry.item)

    def _send_remote(self, active: list[_Entry], now: float) -> None:
        """Starts the remote steps (registrations) due: they run while rounds go on."""
        for entry in active:
            if entry.remote is not None:
                continue
            step = next_step(entry.item.progress, now)
            if step is not None and remote_step(self.steps, step):
                try:
                    future = self._remote.submit(self.steps.attempt, entry.item, step)
                except RuntimeError:  # stopping: the executor takes no more
                    return
                entry.remote = (step, future)
                future.add_done_callback(self._poke)

    def _round(self, active: list[_Entry]) -> list[_Entry]:
        """One round; returns the entries that stay for the next."""
        now = self._clock()
        self._send_remote(active, now)
        local = [e for e in active if e.remote is None]
        back = [e for e in active if e.answered]
        answers = [e.answer() for e in back]
        moved = run_round(
            self.steps, [e.item for e in local], now=now, answered=answers, beat=self._alive
        )
        done = local + back
        for entry, m in zip(done, moved, strict=True):  # first: whatever fails below,
            entry.remote = None  # each entry holds its item as saved
            if m.error is None:
                entry.item = m.item
        if any(m.outcome is not None and m.error is None for m in moved):
            self._journal_ok()
        ran = {id(e) for e in done}
        stay = [e for e in active if id(e) not in ran]  # registrations still waiting
        for entry, m in zip(done, moved, strict=True):
            if m.error is not None:
                self._leave(entry, replace(entry.item, not_before=self._retry(m.error, entry)))
            elif m.more and small(m.item):
                stay.append(entry)
            else:
                self._leave(entry, m.item)
        return stay

    def _retry(self, err: Exception, entry: _Entry) -> float:
        """When an item whose step was not saved is tried again: the journal failing
        is the journal's problem (status says so), anything else a bug."""
        if isinstance(err, sqlite3.Error) and not isinstance(err, sqlite3.IntegrityError):
            return self._journal_failed(err)
        return self._bug(entry.item, err)

    def _drop(
        self, done: list[_Entry], active: list[_Entry], retry: Callable[[_Entry], float]
    ) -> list[_Entry]:
        """The round's entries leave unsaved, each to be tried again at ``retry``; the
        registrations still waiting stay."""
        ran = {id(e) for e in done}
        for entry in done:
            self._leave(entry, replace(entry.item, not_before=retry(entry)))
        return [e for e in active if id(e) not in ran]

    def _leave(self, entry: _Entry, item: Item) -> None:
        """Hands ``item`` back to the daemon; a failure of its bookkeeping is logged,
        never the lane's end, and the future is resolved whatever happens."""
        if entry.future.done():  # handed back already, before a failure in its round
            return
        try:
            item = self._finish(item, entry.attempts_before)
        except Exception:
            log.exception("handing an item back from the lane failed", item=item.token)
        finally:
            entry.future.set_result(item)


__all__ = ["BATCH", "LANE_NAME", "SMALL", "WAITING", "Lane", "room_for", "small"]
