"""An archive the registry does not place where it is configured (no record of its
name, or that name at another root): the deposit steps leave its inputs waiting,
untouched, and register nothing. Real parts: the steps, an archive, the embedded
registry and a journal (``env``); the daemon's answer is stood in for by a function."""

from __future__ import annotations

import os

import pytest

from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step, next_step

NOW = 1_000_000.0
S = State


def _in_state(env: Env, item: Item, state: State) -> Item:
    item = env.until(item, state)
    assert item.state is state, (item.error_code, item.error_message)
    return item


def test_an_input_waits_untouched_while_the_registry_misplaces_its_archive(env: Env) -> None:
    """The registry has no record of the archive's name at its path: the claim leaves
    the input in its inbox (transient archive-unregistered); put right, it goes on."""
    problem: dict[str, str | None] = {"why": "archive 'arch' is at X; the registry has Y"}
    env.steps.registration = lambda name, path: problem["why"]
    item = env.drop("waits.dat", b"waits in its inbox")
    before = os.lstat(env.inbox / "waits.dat")
    item = env.step(item, Step.CLAIM)
    assert item.state is S.CLAIMING and item.error_code == "archive-unregistered"
    assert "the registry has Y" in (item.error_message or "")
    after = os.lstat(env.inbox / "waits.dat")
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    problem["why"] = None
    assert env.until(item, S.DONE).state is S.DONE


@pytest.mark.parametrize("state", [S.STAGED, S.CHECKED])
def test_nothing_is_registered_while_the_registry_misplaces_the_archive(
    env: Env, state: State
) -> None:
    """Claimed before the registry's record changed: the lookup and the registration
    refuse too; nothing is registered."""
    item = _in_state(env, env.drop("late.dat", b"claimed before"), state)
    env.steps.registration = lambda name, path: "the registry has it elsewhere"
    step = next_step(item.progress, NOW)
    assert step is not None
    item = env.step(item, step)
    assert item.state is state and item.error_code == "archive-unregistered"
    assert env.registry.get_resource("late") is None


def test_a_manual_deposit_is_not_asked(env: Env) -> None:
    """A manual deposit's archive is the one its command names: never asked."""
    env.steps.registration = lambda name, path: "never asked"
    item = env.drop("manual.dat", b"x")
    env.steps._check_registration(item.changed(inbox="manual:" + item.inbox))  # no error
