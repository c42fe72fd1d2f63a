"""Rounds: the next step of many items, saved in one journal transaction."""

from __future__ import annotations

import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import cast

import pytest

from fixtures.faults import fsync_fails_for
from fixtures.registry_batches import committed, refused_batches
from fixtures.steps_env import Env
from nbankd.archive import layout
from nbankd.archive.stubnames import StubNames
from nbankd.deposit import stepbase
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.rounds import answered, remote_step, run_round
from nbankd.registry.embedded import EmbeddedRegistry


def _drop(env: Env, n: int) -> list[Item]:
    return [env.drop(f"rec{i}.bin", os.urandom(2000 + i)) for i in range(n)]


def _to_the_end(env: Env, items: list[Item]) -> list[Item]:
    """Rounds until no item has a next step at once; returns every item as last saved."""
    by_id = {item.id: item for item in items}
    active = list(items)
    for _ in range(40):  # a deposit takes about ten steps; more is a loop
        if not active:
            return [by_id[i.id] for i in items]
        moved = run_round(env.steps, active, now=float("inf"))
        for m in moved:
            by_id[m.item.id] = m.item
        active = [m.item for m in moved if m.more]
    raise AssertionError("no end in sight")


def test_a_round_moves_every_item_one_step_in_one_commit(env: Env) -> None:
    """Five claims in one round: five items saved, one journal commit."""
    items = _drop(env, 5)
    before = env.journal.stats()
    moved = run_round(env.steps, items, now=float("inf"))
    after = env.journal.stats()
    assert [m.item.state for m in moved] == [State.CLAIMED] * 5
    assert [m.step for m in moved] == [Step.CLAIM] * 5
    assert (after["saves"] - before["saves"], after["commits"] - before["commits"]) == (5, 1)
    assert all(env.journal.get(m.item.id) == m.item for m in moved)


def test_items_moved_in_rounds_are_deposited_as_when_driven_alone(env: Env) -> None:
    """Rounds take every item to DONE, each stored once with its receipt."""
    items = _to_the_end(env, _drop(env, 4))
    assert [i.state for i in items] == [State.DONE] * 4
    assert len(env.stored()) == 4
    assert sorted(os.listdir(env.inbox / ".nbank")) == []


def test_an_item_not_due_is_left_as_it_is(env: Env) -> None:
    """An item waiting for its backoff gets no step and no save in the round."""
    waiting = replace(_drop(env, 1)[0], not_before=1e12, attempts=1)
    [moved] = run_round(env.steps, [waiting], now=0.0)
    assert moved.item == waiting and moved.step is None and not moved.more


def test_a_bug_in_one_items_step_leaves_the_others_saved(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no step handles comes back for that item; the round's others are saved."""
    items = _drop(env, 3)
    attempt = env.steps.attempt

    def flawed(item: Item, step: Step) -> tuple[Item, object]:
        if item.id == items[1].id:
            raise RuntimeError("a bug")
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", flawed)
    moved = run_round(env.steps, items, now=float("inf"))
    assert isinstance(moved[1].error, RuntimeError) and moved[1].item == items[1]
    assert not moved[1].more
    assert [env.journal.get(i.id).state for i in items] == [  # type: ignore[union-attr]
        State.CLAIMED,
        State.CLAIMING,
        State.CLAIMED,
    ]


def test_a_row_the_journal_refuses_fails_only_its_own_item(env: Env) -> None:
    """One row refused by the journal: that item comes back as an error, unsaved; the
    round's others are saved."""
    items = _drop(env, 3)
    guard = sqlite3.connect(env.journal.path, isolation_level=None)
    guard.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON items WHEN NEW.relpath = CAST('rec1.bin' AS BLOB) "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    guard.close()
    moved = run_round(env.steps, items, now=float("inf"))
    assert isinstance(moved[1].error, sqlite3.IntegrityError) and moved[1].item == items[1]
    assert [env.journal.get(i.id).state for i in items] == [  # type: ignore[union-attr]
        State.CLAIMED,
        State.CLAIMING,
        State.CLAIMED,
    ]


def test_a_journal_that_fails_saves_nothing_of_the_round(env: Env) -> None:
    """The journal itself failing (sqlite3.OperationalError): every item comes back as
    an error holding it, as before its step, and none is saved."""
    items = _drop(env, 3)
    guard = sqlite3.connect(env.journal.path, isolation_level=None)
    guard.execute("CREATE TRIGGER broken BEFORE UPDATE ON items BEGIN SELECT no_such_fn(); END")
    guard.close()
    moved = run_round(env.steps, items, now=float("inf"))
    assert all(isinstance(m.error, sqlite3.OperationalError) for m in moved)
    assert [m.item for m in moved] == items
    assert [env.journal.get(i.id) for i in items] == items


def test_a_step_answered_elsewhere_is_saved_with_the_round(env: Env) -> None:
    """A step run on another thread is saved in the same commit as the round's own."""
    first, second = _drop(env, 2)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(env.steps.attempt, second, Step.CLAIM)
        future.result()
    before = env.journal.stats()
    moved = run_round(
        env.steps, [first], now=float("inf"), answered=[answered(second, Step.CLAIM, future)]
    )
    after = env.journal.stats()
    assert [(m.item.id, m.item.state) for m in moved] == [
        (first.id, State.CLAIMED),
        (second.id, State.CLAIMED),
    ]
    assert (after["saves"] - before["saves"], after["commits"] - before["commits"]) == (2, 1)
    assert env.journal.get(second.id) == moved[1].item


@pytest.mark.parametrize(
    ("backend", "step", "remote"),
    [
        ("http", Step.REGISTER, True),
        ("http", Step.LOOKUP, False),
        ("http", Step.STAGE, False),
        ("embedded", Step.REGISTER, False),
    ],
)
def test_which_steps_wait_for_a_remote_registry(
    env: Env, monkeypatch: pytest.MonkeyPatch, backend: str, step: Step, remote: bool
) -> None:
    """Only registering with an HTTP registry runs on the executor."""
    monkeypatch.setattr(env.registry, "backend", backend)
    assert remote_step(env.steps, step) is remote


def test_a_claim_whose_shared_fsync_fails_waits_and_is_claimed_once_later(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work folder's fsync failing at the round's end: its claims are saved as failed
    (transient, retried); the next round claims each input once."""
    items = _drop(env, 3)
    with monkeypatch.context() as faults:
        fsync_fails_for(faults, env.inbox / ".nbank")
        moved = run_round(env.steps, items, now=float("inf"))
    assert [(m.item.state, m.item.attempts, m.outcome.kind) for m in moved] == [  # type: ignore[union-attr]
        (State.CLAIMING, 1, "transient")
    ] * 3
    assert all(m.item.error_code == "inbox-not-writable" for m in moved)  # the inbox's disk
    assert all("into the inbox's work folder" in (m.item.error_message or "") for m in moved)
    again = run_round(env.steps, [m.item for m in moved], now=float("inf"))
    assert [m.item.state for m in again] == [State.CLAIMED] * 3
    assert len(os.listdir(env.inbox / ".nbank")) == 3


@pytest.mark.parametrize("kept", [True, False], ids=["inotify", "no-inotify"])
def test_a_rounds_lookups_share_one_listing_of_their_stub_folder(
    env: Env, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    """Four inputs filed in one stub folder: their lookups in one round list it once,
    on a filesystem whose folders inotify follows and on one it cannot."""
    if not kept:  # every filesystem counted as one another host changes (NFS, SSHFS)
        monkeypatch.setattr(stepbase, "STUB_NAMES", StubNames(local_fs=frozenset()))
    items = [env.until(i, State.STAGED) for i in _drop(env, 4)]
    stub = env.archive.resources_dir / "re"
    stub.mkdir(exist_ok=True)
    listed: list[int] = []  # the inode listed, by path or by descriptor
    real_listdir = os.listdir

    def listdir(path: object = ".") -> list[str]:
        listed.append(os.stat(path).st_ino)  # type: ignore[arg-type]
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    moved = run_round(env.steps, items, now=float("inf"))
    assert [m.item.state for m in moved] == [State.CHECKED] * 4
    assert listed.count(stub.stat().st_ino) == 1


def test_a_rounds_registrations_run_first_and_commit_together(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three registrations and a claim in one round: the registrations run first, none
    committed before the last of them ran, all committed before the claim."""
    checked = [env.until(i, State.CHECKED) for i in _drop(env, 3)]
    fresh = env.drop("later.bin", os.urandom(3000))
    registry = cast(EmbeddedRegistry, env.registry)
    seen: list[tuple[Step, int]] = []
    attempt = env.steps.attempt

    def watching(item: Item, step: Step) -> tuple[Item, object]:
        seen.append((step, len(committed(registry))))
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", watching)
    moved = run_round(env.steps, [fresh, *checked], now=float("inf"))
    assert [m.item.state for m in moved] == [State.CLAIMED] + [State.REGISTERED] * 3
    assert seen == [(Step.REGISTER, 0)] * 3 + [(Step.CLAIM, 3)]
    assert committed(registry) == {i.name for i in checked}


def test_a_refused_registry_commit_fails_every_registration_of_the_round(env: Env) -> None:
    """The batch's commit refused: each registration of the round is saved as failed
    (transient), a duplicate judged against the lost record included; the next round
    registers one and finds the other a duplicate (by its lookup, after the batch)."""
    data = os.urandom(4000)
    items = [
        env.until(env.drop(name, body), State.CHECKED)
        for name, body in (("dupA.bin", data), ("dupB.bin", data), ("other.bin", os.urandom(10)))
    ]
    registry = cast(EmbeddedRegistry, env.registry)
    with refused_batches(registry) as refused:
        moved = run_round(env.steps, items, now=float("inf"))
    assert refused == [1]
    assert [(m.item.state, m.item.attempts, m.outcome.kind) for m in moved] == [  # type: ignore[union-attr]
        (State.CHECKED, 1, "transient")
    ] * 3
    assert all("registering" in (m.item.error_message or "") for m in moved)
    assert committed(registry) == set()
    again = run_round(env.steps, [m.item for m in moved], now=float("inf"))
    assert [m.item.state for m in again] == [State.REGISTERED, State.STAGED, State.REGISTERED]
    assert again[1].item.error_code == "sha1-held"  # judged by its lookup, outside the lock
    assert committed(registry) == {items[0].name, items[2].name}
    [dup] = run_round(env.steps, [again[1].item], now=float("inf"))
    assert (dup.item.state, dup.item.error_code) == (State.REJECTING, "duplicate")


def test_no_archive_is_read_while_the_registry_is_locked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate registering after a new file (its verdict needs the archive): the
    archive's nbank.json is never read while the round holds the registry's write lock
    (a dead mount would hold every writer of the registry)."""
    data = os.urandom(4000)
    items = [env.until(env.drop(n, data), State.CHECKED) for n in ("newA.bin", "dupB.bin")]
    registry = cast(EmbeddedRegistry, env.registry)
    locked_reads: list[str] = []
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith(layout.CONFIG_NAME):
            probe = sqlite3.connect(registry.db_path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError:
                locked_reads.append(str(path))
            finally:
                probe.close()
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    moved = run_round(env.steps, items, now=float("inf"))
    assert [m.item.state for m in moved] == [State.REGISTERED, State.STAGED]  # sha1-held
    assert locked_reads == []
