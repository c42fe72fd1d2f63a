"""A journal a few steps behind the archive: what a power loss may leave when the
transitions between the input-moving steps are committed without an fsync
(lifecycle.DURABLE). Recovery repeats the steps from the older state and the input
ends deposited exactly once."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest

from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import DURABLE, FINAL, State, next_step
from nbankd.deposit.receipts import read_receipts

#: (how far the archive and registry got, the states the journal may be left at): the
#: lazily saved states after the last durable one before that point
BEHIND = [
    (State.REGISTERED, State.CLAIMING),
    (State.REGISTERED, State.CLAIMED),
    (State.REGISTERED, State.STAGED),
    (State.REGISTERED, State.CHECKED),
    (State.RECORDED, State.REGISTERED),
    (State.RECORDED, State.PUBLISHED),
    (State.RECORDED, State.VERIFIED),
]


def _drive(env: Env, item: Item, until: State) -> list[Item]:
    """Runs steps to ``until``, returning the item as saved after each state."""
    seen = [item]
    while item.state is not until:
        step = next_step(item.progress, float("inf"))
        assert step is not None and item.state not in FINAL, item
        item = env.step(item, step)
        seen.append(item)
    return seen


def test_only_input_moving_and_registered_states_wait_for_the_disk() -> None:
    """The states saved durably are those before claim, publish (which moves the input
    with placement: rename), release, reject and put back; REGISTERED is one of them."""
    assert {
        State.CLAIMING, State.REGISTERED, State.RECORDED, State.REJECTING, State.RETURNING
    } == DURABLE  # fmt: skip


@pytest.mark.parametrize("placement", ["copy", "rename"])
@pytest.mark.parametrize(("ahead", "behind"), BEHIND, ids=lambda s: str(s))
def test_journal_behind_the_archive_finishes_once(
    env: Env, placement: str, ahead: State, behind: State
) -> None:
    """The steps ran up to ``ahead`` but the journal says ``behind``, as a power loss
    may leave it: recovery ends with one file, one record, one receipt, the input gone."""
    data = os.urandom(64 << 10)
    seen = _drive(env, replace(env.drop("take.dat", data), placement=placement), ahead)
    old = next(i for i in seen if i.state is behind)
    env.journal.save(old)  # what the disk held: the later lazy commits were lost
    item = env.until(old, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data
    [record] = list(env.registry.search(sha1=hashlib.sha1(data).hexdigest()))
    assert record.name == item.name
    tokens = [r["token"] for r in read_receipts(env.root / "receipts")]
    assert tokens == [item.token]
    assert not (env.inbox / "take.dat").exists()
    assert os.listdir(env.spec.work_dir) == []
