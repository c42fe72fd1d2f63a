"""Many inputs moving through their steps together: rounds sharing one journal commit.

A *round* runs the next step of every item of a batch, one after another on the
calling thread, then saves all of them in one journal transaction: one commit (and,
when any item reached a state of :data:`~nbankd.deposit.lifecycle.DURABLE`, one
fsync) for the batch instead of one per item, and no hand-over of the interpreter's
lock between worker threads at every system call, which is what a burst of small
files spent most of its time on with one worker per item (``bench/README.md``).

Nothing about an item's order changes: its step runs before its save, and its next
step only in a later round, after that save is committed, exactly as when it is
driven alone (:meth:`~nbankd.deposit.steps.Steps.drive`). A crash in the middle of a
round leaves some items' steps done and not saved: the crash between a step and its
save that recovery already repeats (every step is idempotent).

The fsyncs a step only needs before its save (:func:`nbankd.archive.syncs.fsync_soon`)
are shared too: each folder or file once per round, after the round's steps and before
its commit, and so is what a step does only once they are done
(:func:`~nbankd.archive.syncs.after_syncs`: a published copy's staged name is dropped
once the round's stub folders are fsynced). Should one fail, the steps that asked for
it are not done: they are saved as failed (transient, retried after a backoff) and run
again.

A round's registrations run first, together
(:meth:`~nbankd.deposit.stepbase.StepsBase.registering_together`): the embedded
registry commits them in one transaction (one fsync), and holds its write lock only
while they run. Should that commit fail, every one of them failed (transient) and
registers again later, whatever its step concluded.

Registering with a remote registry waits for the network: the caller runs those steps
on other threads (:func:`remote_step` says which) and hands each finished one to a
later round (:func:`answered`), whose transaction saves it with the round's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from nbankd import errors
from nbankd.archive import syncs
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import DURABLE, Outcome, Step, next_step
from nbankd.deposit.outcomes import outcome_for
from nbankd.deposit.stepbase import StepResult, log
from nbankd.deposit.steps import Steps, keeps_going


@dataclass(frozen=True)
class Moved:
    """One item after its step of a round: saved, or ``error`` (a bug in a step; the
    item is as before the round)."""

    item: Item
    step: Step | None = None
    outcome: Outcome | None = None
    error: Exception | None = None

    @property
    def more(self) -> bool:
        """Its next step may run in the next round."""
        return self.error is None and self.outcome is not None and keeps_going(self.outcome)


def remote_step(steps: Steps, step: Step) -> bool:
    """True for a step that mostly waits for a remote registry's answer."""
    return step is Step.REGISTER and steps.registry.backend == "http"


def answered(item: Item, step: Step, future: Future[StepResult]) -> Moved:
    """A step of ``item`` run elsewhere (a registration on another thread), finished;
    one cancelled before it ran leaves the item as it was."""
    if future.cancelled():
        return Moved(item)
    try:
        after, outcome = future.result()
    except Exception as err:  # a bug outside the step's own error handling
        return Moved(item, step, error=err)
    return Moved(after, step, outcome)


def run_round(
    steps: Steps,
    items: Sequence[Item],
    *,
    now: float,
    answered: Sequence[Moved] = (),
    beat: Callable[[], None] | None = None,
) -> list[Moved]:
    """Runs the next step of every item of ``items`` (each due at ``now``) on this
    thread and saves them, with the steps ``answered`` elsewhere, in one transaction;
    returns them in order (``items``, then ``answered``). ``beat`` is called before
    every step, the fsyncs and the commit (the daemon's liveness). A step not saved
    comes back as an error (:func:`_save`): a row the journal refuses fails only its
    own item; the journal failing fails every item not saved, with an sqlite3.Error."""
    alive = beat or (lambda: None)
    plan = [(item, next_step(item.progress, now)) for item in items]
    results = [Moved(item) for item, _step in plan]  # not due: nothing to do this round
    registering = [i for i, (_item, step) in enumerate(plan) if step is Step.REGISTER]
    others = [i for i, (_item, step) in enumerate(plan) if step not in (None, Step.REGISTER)]
    with syncs.shared() as later, steps.listings_shared():
        if registering:
            try:  # together first: the registry's write lock is held only for them
                with steps.registering_together(plan[i][0] for i in registering):
                    _attempt(steps, plan, registering, results, later, alive)
                    alive()
            except Exception as err:  # not committed: none of them is registered
                _not_registered(steps, plan, registering, results, err)
        _attempt(steps, plan, others, results, later, alive)
        alive()
        failed = later.flush()
    for i, err in failed.items():  # the step is not done until its fsync is: retried
        item, step = plan[i]
        if isinstance(err, errors.NbankdError):  # told as its step asked (an inbox's)
            if step is not None and results[i].outcome is not None:
                outcome = outcome_for(err)
                results[i] = Moved(steps.judged(item, step, outcome), step, outcome)
        elif not isinstance(err, OSError):  # a bug in what the step left for after them
            results[i] = Moved(item, step, error=err)
        elif step is not None and results[i].outcome is not None:
            what = "" if isinstance(err, syncs.AfterSyncsFailed) else "fsync "
            why = OSError(err.errno, f"{what}after the {step} step: {err.strerror}")
            outcome = outcome_for(why)
            results[i] = Moved(steps.judged(item, step, outcome), step, outcome)
    results += answered
    alive()
    _save(steps, results, [item for item, _step in plan] + [m.item for m in answered])
    for m in results:
        if m.outcome is not None and m.step is not None:
            try:
                steps.saved(m.item, m.step, m.outcome)
            except Exception:  # a log line that cannot be written: the item is saved
                log.exception("after a saved step", item=m.item.token, step=str(m.step))
    return results


def _attempt(
    steps: Steps,
    plan: Sequence[tuple[Item, Step | None]],
    indices: Iterable[int],
    results: list[Moved],
    later: syncs.SharedSyncs,
    alive: Callable[[], None],
) -> None:
    """Runs the step of each planned item at ``indices`` into ``results``."""
    for i in indices:
        item, step = plan[i]
        assert step is not None
        alive()
        later.owner = i
        try:
            after, outcome = steps.attempt(item, step)
        except Exception as err:  # a bug outside the step's own error handling
            results[i] = Moved(item, step, error=err)
        else:
            results[i] = Moved(after, step, outcome)


def _not_registered(
    steps: Steps,
    plan: Sequence[tuple[Item, Step | None]],
    indices: Iterable[int],
    results: list[Moved],
    err: Exception,
) -> None:
    """The registrations at ``indices`` were not committed: each failed (transient,
    retried), whatever its step had concluded (a duplicate may have been judged against
    a record of the same batch that is now gone)."""
    why = outcome_for(err)
    outcome = Outcome("transient", why.code, f"registering: {why.message}", why.hint)
    for i in indices:
        item, step = plan[i]
        if results[i].error is None:
            results[i] = Moved(steps.judged(item, Step.REGISTER, outcome), step, outcome)


def _save(steps: Steps, results: list[Moved], before: list[Item]) -> None:
    """Saves every result with an outcome in one transaction. Should the journal refuse
    it, each is saved alone: a refused one becomes an error with its item as before the
    step. When the journal itself fails (sqlite3.OperationalError, or not one row saved
    alone either: a damaged database), every result not saved becomes an error holding
    that journal error. Never raises: each result says whether its item moved."""
    saved = [m.item for m in results if m.outcome is not None]
    if not saved:
        return
    try:
        steps.journal.save_many(saved, durable=any(i.state in DURABLE for i in saved))
        return
    except sqlite3.OperationalError as err:
        _unsaved(results, before, range(len(results)), err)
        return
    except Exception as err:
        first = err
        if len(saved) == 1:
            _unsaved(results, before, range(len(results)), err)
            return
    moved = 0
    for i, m in enumerate(results):
        if m.outcome is None:
            continue
        try:
            steps.journal.save_many([m.item], durable=m.item.state in DURABLE)
            moved += 1
        except sqlite3.OperationalError as err:
            _unsaved(results, before, range(i, len(results)), err)
            return
        except Exception as err:  # this row only: its step runs again later
            results[i] = Moved(before[i], m.step, error=err)
    if moved == 0:  # not one row saved: the journal, not the rows
        _unsaved(results, before, range(len(results)), first)


def _unsaved(
    results: list[Moved], before: list[Item], indices: Iterable[int], err: Exception
) -> None:
    """The results at ``indices`` with an outcome were not saved: errors holding ``err``,
    each item as before its step."""
    for i in indices:
        m = results[i]
        if m.outcome is not None:
            results[i] = Moved(before[i], m.step, error=err)


__all__ = ["Moved", "answered", "remote_step", "run_round"]
