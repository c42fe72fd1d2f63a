"""An item whose archive leaves the configuration: the life cycle's REDECIDE, and the
steps that follow an archive by its path, send an undecided input back to its inbox
and park the others. Real parts: the steps, an archive, the embedded registry and a
journal (``env``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fixtures.daemon import work_entries
from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import (
    UNDECIDED,
    Outcome,
    Progress,
    State,
    Step,
    advance,
    next_step,
)

NOW = 1_000_000.0
S = State
REDECIDE = Outcome("redecide", "archive-changed", "its archive left the configuration")


# -- the life cycle ----------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(UNDECIDED))
def test_an_undecided_item_is_sent_back_to_its_inbox(state: State) -> None:
    step = next_step(Progress(state), NOW)
    assert step is not None
    p = advance(Progress(state), step, REDECIDE, NOW)
    assert p == Progress(S.RETURNING, error_code="archive-changed", error_message=REDECIDE.message)


@pytest.mark.parametrize(
    "state", [S.CHECKED, S.REGISTERED, S.PUBLISHED, S.VERIFIED, S.RECORDED, S.REJECTING]
)
def test_an_item_that_may_be_registered_only_waits(state: State) -> None:
    """CHECKED may have sent its registration (the answer lost): never sent back."""
    step = next_step(Progress(state), NOW)
    assert step is not None
    p = advance(Progress(state), step, REDECIDE, NOW)
    assert p.state is state and p.attempts == 1 and p.not_before > NOW


def test_an_item_restaged_after_registering_is_never_sent_back() -> None:
    p = advance(Progress(S.CLAIMED, registered=True), Step.STAGE, REDECIDE, NOW)
    assert p.state is S.CLAIMED and p.registered and p.attempts == 1


KINDS = st.sampled_from(["ok"] * 4 + ["transient", "changed", "restage", "redecide"])


@given(st.lists(KINDS, max_size=60))
@example(["ok", "ok", "redecide", "ok"])
@example(["ok"] * 4 + ["restage", "redecide"])
def test_property_only_what_nothing_registered_is_decided_again(kinds: list[str]) -> None:
    """Whatever happens, a REDECIDE puts an item back only from CLAIMING, CLAIMED or
    STAGED, and never once it has reached CHECKED (its registration may be sent)."""
    p = Progress(S.CLAIMING)
    checked = False
    for kind in kinds:
        now = max(NOW, p.not_before)
        step = next_step(p, now)
        if step is None:
            break
        before, p = p, advance(p, step, Outcome(kind, "code"), now)
        checked = checked or before.state not in UNDECIDED
        if kind == "redecide" and p.state is S.RETURNING and before.state is not S.RETURNING:
            assert before.state in UNDECIDED and not checked, (before, p)


# -- the steps ---------------------------------------------------------------------------


def _configured(env: Env, archives: dict[str, Path]) -> None:
    """The daemon's configuration as the steps see it: these archives (name: path)."""
    env.steps.archives = archives.get
    env.steps.archive_at = lambda path: next((n for n, p in archives.items() if p == path), None)


def _in_state(env: Env, item: Item, state: State) -> Item:
    item = env.until(item, state)
    assert item.state is state, (item.error_code, item.error_message)
    return item


@pytest.mark.parametrize("state", [S.CLAIMING, S.STAGED, S.CHECKED])
def test_an_item_follows_its_archive_renamed_at_the_same_path(env: Env, state: State) -> None:
    """Journaled for "typo" at the archive's path; the configuration now names that path
    "arch": the item follows it, and is registered and stored there once."""
    item = _in_state(env, env.drop("renamed.dat", b"follows the path"), state)
    item = env.journal.save(item.changed(archive="typo"))
    _configured(env, {"arch": env.archive.path})
    item = env.until(item, S.DONE)
    assert item.state is S.DONE and item.archive == "arch"
    record = env.registry.get_resource("renamed")
    assert record is not None and record.locations == ("arch",)
    assert env.stored() == ["re/renamed.dat"]


@pytest.mark.parametrize("state", [S.CLAIMING, S.CLAIMED, S.STAGED])
def test_an_undecided_item_goes_back_to_its_inbox_untouched(env: Env, state: State) -> None:
    """Its archive removed from the configuration (no archive at its path): the input
    goes back to its inbox, with its bytes, and nothing is registered or stored."""
    item = env.drop("back.dat", b"decided again")
    item = _in_state(env, item, state)
    _configured(env, {"other": env.root / "elsewhere"})
    step = next_step(item.progress, NOW)
    assert step is not None
    item = env.step(item, step)
    assert item.state is S.RETURNING and item.error_code == "archive-changed"
    item = env.until(item, S.RETURNED)
    assert item.state is S.RETURNED
    assert (env.inbox / "back.dat").read_bytes() == b"decided again"
    assert work_entries(env.spec.work_dir) == []
    assert env.registry.get_resource("back") is None and env.stored() == []


def test_an_item_never_taken_is_left_where_it_is(env: Env) -> None:
    item = env.drop("never.dat", b"not taken")
    before = os.lstat(env.inbox / "never.dat")
    _configured(env, {})
    item = env.until(item, S.RETURNED)
    assert item.state is S.RETURNED
    after = os.lstat(env.inbox / "never.dat")
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)


@pytest.mark.parametrize("state", [S.CHECKED, S.REGISTERED, S.PUBLISHED])
def test_an_item_that_may_be_registered_is_parked_for_its_archive(env: Env, state: State) -> None:
    item = env.drop("parked.dat", b"finishes where it was registered")
    item = _in_state(env, item, state)
    _configured(env, {"other": env.root / "elsewhere"})
    step = next_step(item.progress, NOW)
    assert step is not None
    after, outcome = env.steps.run(item, step)
    assert outcome.kind == "transient" and outcome.code == "parked", outcome
    assert f"configure archive arch at {env.archive.path} again" in outcome.hint
    assert after.archive == "arch"
    _configured(env, {"arch": env.archive.path})  # restored: it finishes there
    assert env.until(item, S.DONE).state is S.DONE
    assert env.stored() == ["pa/parked.dat"]


def test_a_rejection_finishes_without_its_archive(env: Env) -> None:
    """Rejecting writes only into the inbox: it needs no archive configured."""
    (env.inbox / "empty.dat").write_bytes(b"")
    item = env.journal_existing("empty.dat")
    item = _in_state(env, item, S.REJECTING)
    _configured(env, {})
    assert env.until(item, S.REJECTED).state is S.REJECTED
    assert (env.spec.rejected_dir / "empty.dat").exists()


def test_steps_of_a_manual_deposit_ignore_the_configured_archives(env: Env) -> None:
    """What the configured archives say never applies to a manual deposit's items."""
    _configured(env, {})
    item = env.drop("manual.dat", b"x")
    item = item.changed(inbox="manual:" + item.inbox)
    assert env.steps.follow_archive(item, Step.CLAIM) is item
