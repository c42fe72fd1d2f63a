"""What to do about the error an input waits after: journaled beside it and shown."""

from __future__ import annotations

import os
from collections.abc import Callable

from fixtures.steps_env import Env
from nbankd.daemon.status import waiting_problems
from nbankd.deposit.item import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.spec import InboxSpec


def _parked(env: Env) -> tuple[Item, Callable[[str], InboxSpec | None]]:
    """A claimed input whose inbox a reload removed, staged once: (its item, the live
    inboxes to restore)."""
    item = env.until(env.drop("rec.dat", os.urandom(500)), State.CLAIMED)
    live = env.steps.inboxes
    env.steps.inboxes = lambda _key: None
    after, outcome = env.steps.attempt(item, Step.STAGE)
    assert outcome.kind == "transient" and outcome.hint
    return env.journal.save(after), live


def test_a_waiting_inputs_hint_is_journaled_with_its_error(env: Env) -> None:
    """A step failing with a hint (here: its inbox no longer configured) saves the hint
    beside the error, read back from the journal."""
    item, _live = _parked(env)
    saved = env.journal.get(item.id)
    assert saved is not None and saved.error_code is not None
    assert saved.error_hint is not None and "restore the inbox" in saved.error_hint


def test_a_step_done_clears_the_hint(env: Env) -> None:
    """Once the step succeeds, no hint is left from the error it waited after."""
    item, live = _parked(env)
    env.steps.inboxes = live
    after, outcome = env.steps.attempt(item, Step.STAGE)
    assert outcome.kind == "ok"
    assert (after.error_code, after.error_hint) == (None, None)


def test_status_says_what_to_do_about_a_waiting_input(env: Env) -> None:
    """The status line of inputs waiting after an error ends with the fix."""
    item, _live = _parked(env)
    [line] = waiting_problems([item])
    assert "(to fix: restore the inbox" in line
