"""The lane: one thread moving small files in rounds, handing large ones to the pool."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import replace
from typing import Any

import pytest

from fixtures.daemon import wait_for
from fixtures.lane_env import Handed, lane_for
from fixtures.steps_env import Env, env
from nbankd.daemon import lane as lane_module
from nbankd.daemon.lane import LANE_NAME, SMALL, STALL, Lane, room_for, small
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step

__all__ = ["env"]


@pytest.fixture
def handed() -> Handed:
    return Handed()


@pytest.fixture
def lane(env: Env, handed: Handed) -> Iterator[Lane]:
    running = lane_for(env, handed)
    yield running
    running.stop()


def _results(futures: list[Future[Item]]) -> list[Item]:
    return [f.result(timeout=60) for f in futures]


def test_small_files_are_deposited_and_handed_back_once(
    env: Env, lane: Lane, handed: Handed
) -> None:
    """Ten small files submitted together end DONE, each handed back exactly once."""
    items = [env.drop(f"rec{i}.bin", os.urandom(3000 + i)) for i in range(10)]
    done = _results([lane.submit(item) for item in items])
    assert [i.state for i in done] == [State.DONE] * 10
    assert sorted(i.id for i, _ in handed.items) == sorted(i.id for i in items)
    assert len(env.stored()) == 10


def test_a_file_found_large_at_its_claim_is_handed_to_the_pool(
    env: Env, lane: Lane, handed: Handed
) -> None:
    """A file past SMALL leaves the lane right after its claim, claimed and not final."""
    big = env.drop("big.bin", b"\0" * (SMALL + 1))
    [item] = _results([lane.submit(big)])
    assert item.state is State.CLAIMED
    assert json.loads(item.identity or "{}")["size"] == SMALL + 1
    assert not small(item)


@pytest.mark.parametrize(
    ("changes", "taken"),
    [
        ({}, True),  # not claimed yet: the claim tells
        ({"size": SMALL}, True),
        ({"size": SMALL + 1}, False),
        ({"identity": json.dumps({"size": SMALL + 1})}, False),
        ({"kind": "dir"}, False),
        ({"zipped": True}, False),
    ],
)
def test_which_inputs_the_lane_takes(env: Env, changes: dict[str, object], taken: bool) -> None:
    """Files not known to be larger than SMALL; never folders or zipped folders."""
    item = replace(env.drop("x.bin", b"x"), **changes)  # type: ignore[arg-type]
    assert small(item) is taken


def test_an_item_waiting_for_its_backoff_is_handed_back_untouched(env: Env, lane: Lane) -> None:
    """An item not due yet leaves at once, as it came."""
    waiting = replace(env.drop("w.bin", b"w"), attempts=2, not_before=time.time() + 3600)
    [item] = _results([lane.submit(waiting)])
    assert item == waiting


def test_a_journal_that_cannot_be_written_hands_every_item_back_to_wait(
    env: Env, lane: Lane, handed: Handed
) -> None:
    """A refused commit: the items leave unsaved, with a retry time, and it is reported."""
    item = env.drop("j.bin", b"journal")
    guard = sqlite3.connect(env.journal.path, isolation_level=None)
    guard.execute("CREATE TRIGGER broken BEFORE UPDATE ON items BEGIN SELECT no_such_fn(); END")
    guard.close()
    [back] = _results([lane.submit(item)])
    assert back.state is State.CLAIMING and back.not_before > time.time()
    assert len(handed.journal_errors) == 1
    assert env.journal.get(item.id) == item


def test_after_stop_nothing_new_is_taken(env: Env, lane: Lane) -> None:
    """A stopped lane cancels what it is given: the journal keeps the item for the next start."""
    lane.stop()
    future = lane.submit(env.drop("late.bin", b"late"))
    with pytest.raises(CancelledError):
        future.result(timeout=10)


def test_registrations_with_a_remote_registry_run_beside_the_rounds(
    env: Env, lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an HTTP registry, registering runs on the remote threads, every other step on
    the lane's own, and every input is deposited."""
    monkeypatch.setattr(env.registry, "backend", "http")
    seen: dict[Step, set[str]] = {}
    attempt = env.steps.attempt

    def noting(item: Item, step: Step) -> tuple[Item, object]:
        seen.setdefault(step, set()).add(threading.current_thread().name)
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", noting)
    items = [env.drop(f"r{i}.bin", os.urandom(1000 + i)) for i in range(6)]
    done = _results([lane.submit(item) for item in items])
    assert [i.state for i in done] == [State.DONE] * 6
    assert all(name.startswith("deposit-remote") for name in seen[Step.REGISTER])
    others = set().union(*(names for step, names in seen.items() if step is not Step.REGISTER))
    assert others == {LANE_NAME}


def test_a_failing_hand_back_never_ends_the_lane(env: Env, handed: Handed) -> None:
    """The daemon's bookkeeping raising for one item: its future still resolves, and the
    lane goes on depositing the next."""
    calls: list[int] = []

    def finish(item: Item, attempts_before: int) -> Item:
        calls.append(item.id)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping bug")
        return item

    running = lane_for(env, handed, finish=finish)
    try:
        [first] = _results([running.submit(env.drop("one.bin", b"one"))])
        [second] = _results([running.submit(env.drop("two.bin", b"two"))])
    finally:
        running.stop()
    assert (first.state, second.state) == (State.DONE, State.DONE)
    assert calls == [first.id, second.id]


def test_a_round_stuck_past_the_stall_limit_is_reported_stalled(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that shows no sign of life for STALL seconds makes the lane stalled, named
    in status: the items queued behind it are handed back (for the pool); not stalled
    once it ends."""
    now = [1000.0]
    stuck, entered = threading.Event(), threading.Event()
    attempt = env.steps.attempt

    def blocking(item: Item, step: Step) -> tuple[Item, object]:
        entered.set()
        assert stuck.wait(60)
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", blocking)
    running = lane_for(env, handed, clock=lambda: now[0])
    try:
        future = running.submit(env.drop("s.bin", b"s"))
        assert entered.wait(60)
        behind = env.drop("behind.bin", b"queued behind the stuck round")
        queued = running.submit(behind)
        assert not running.stalled(now[0] + STALL - 1)
        assert running.release_if_stalled(now[0] + STALL - 1) == 0
        assert running.stalled(now[0] + STALL + 1)
        assert running.problem(now[0] + STALL - 1) is None
        assert "no progress for 61s" in (running.problem(now[0] + STALL + 1) or "")
        assert running.release_if_stalled(now[0] + STALL + 1) == 1  # to the pool
        assert queued.result(timeout=60) == behind and handed.items[-1] == (behind, 0)
        monkeypatch.setattr(env.steps, "attempt", attempt)
        stuck.set()
        future.result(timeout=60)
        assert not running.stalled(now[0] + STALL + 1)
    finally:
        stuck.set()
        running.stop()


def test_a_registration_answered_during_the_stop_is_saved(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while a registration is under way: the lane waits for its answer and saves
    it, so the journal says REGISTERED, as the registry does."""
    monkeypatch.setattr(env.registry, "backend", "http")
    release, registering = threading.Event(), threading.Event()
    attempt = env.steps.attempt

    def slow_register(item: Item, step: Step) -> tuple[Item, object]:
        if step is Step.REGISTER:
            registering.set()
            assert release.wait(60)
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", slow_register)
    running = lane_for(env, handed)
    item = env.drop("reg.bin", b"registered at the stop")
    future = running.submit(item)
    assert registering.wait(60)
    running.stop()
    release.set()
    assert future.result(timeout=60).state is State.REGISTERED
    assert env.journal.get(item.id).state is State.REGISTERED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("local", "waiting", "room"),
    [
        (0, 0, 64),
        (10, 0, 54),
        (64, 0, 0),
        (0, 64, 64),  # registrations under way take no room, up to WAITING of them
        (10, 64, 54),
        (0, 65, 63),  # beyond WAITING each keeps an item out
        (0, 200, 0),
        (64, 100, 0),
    ],
)
def test_room_for_the_next_items(local: int, waiting: int, room: int) -> None:
    """Room left in a round beside items moving and registrations under way."""
    assert room_for(local, waiting) == room


def _hanging_registry(
    env: Env, monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> tuple[threading.Event, list[str], Callable[[], None]]:
    """An HTTP registry (as the lane sees it) whose registrations hang until ``release``;
    claims wait for the returned event (set it once every item is queued) and are listed.
    The returned function waits until no registration is running any more: the lane's
    stop leaves them to finish on their threads, and the registry (SQLite here) must
    not be closed under them."""
    monkeypatch.setattr(env.registry, "backend", "http")
    submitted = threading.Event()
    claims: list[str] = []
    attempt = env.steps.attempt
    running: list[str] = []
    finished = threading.Condition()

    def hanging(item: Item, step: Step) -> tuple[Item, object]:
        if step is Step.CLAIM:  # on the lane's thread, once every item is queued
            assert submitted.wait(60)
            claims.append(item.token)
        if step is not Step.REGISTER:
            return attempt(item, step)
        with finished:
            running.append(item.token)
        try:
            assert release.wait(60)
            return attempt(item, step)
        finally:
            with finished:
                running.remove(item.token)
                finished.notify_all()

    def drained() -> None:
        with finished:
            assert finished.wait_for(lambda: not running, 60), running

    monkeypatch.setattr(env.steps, "attempt", hanging)
    return submitted, claims, drained


def test_a_registry_that_does_not_answer_keeps_the_rest_queued(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registrations hanging: the lane takes no more items than a round's room and the
    registrations that take none (2 + 2 here), then waits; the rest stay queued,
    untouched, and the registrations answered later are saved."""
    monkeypatch.setattr(lane_module, "BATCH", 2)
    monkeypatch.setattr(lane_module, "WAITING", 2)
    release = threading.Event()
    submitted, claims, drained = _hanging_registry(env, monkeypatch, release)
    items = [env.drop(f"h{i}.bin", os.urandom(500 + i)) for i in range(10)]
    running = lane_for(env, handed)
    futures = [running.submit(item) for item in items]
    submitted.set()
    wait_for(lambda: running.waiting_since is not None, 60, "the lane waiting for answers")
    assert len(claims) == 4
    running.stop()
    release.set()
    taken = [f for f in futures if not f.cancelled()]
    assert [f.result(timeout=60).state for f in taken] == [State.REGISTERED] * 4
    left = [item for f, item in zip(futures, items, strict=True) if f.cancelled()]
    assert [env.journal.get(item.id) for item in left] == items[4:]
    drained()


def test_waiting_long_for_the_registry_is_a_problem(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for answers past STALL puts a line in status (degraded); not before."""
    release = threading.Event()
    submitted, _claims, drained = _hanging_registry(env, monkeypatch, release)
    running = lane_for(env, handed)
    try:
        running.submit(env.drop("w.bin", b"waits for its registration"))
        submitted.set()
        wait_for(lambda: running.waiting_since is not None, 60, "the lane waiting for answers")
        since = running.waiting_since
        assert since is not None and running.problem(since + STALL) is None
        problem = running.problem(since + STALL + 5)
        assert problem is not None and "waited" in problem and "registry" in problem
    finally:
        release.set()
        running.stop()
        drained()


@pytest.mark.parametrize(
    ("since_round", "ready", "answered", "waiting", "delay"),
    [
        (0.0, 1, 1, 0, 0.0),  # no other registration under way: nothing to gather for
        (0.0, 1, 0, 3, 0.0),  # no answer to save: a file's own next step never waits
        (0.0, 1, 1, 3, lane_module.GATHER),
        (lane_module.GATHER / 2, 2, 1, 3, lane_module.GATHER / 2),
        (lane_module.GATHER, 1, 1, 3, 0.0),
        (10.0, 1, 1, 3, 0.0),
        (-5.0, 1, 1, 3, lane_module.GATHER),  # never longer than GATHER
        (0.0, lane_module.BATCH // 2, 1, 3, 0.0),  # half a round ready: no wait
    ],
)
def test_how_long_a_round_waits_for_more_answers(
    since_round: float, ready: int, answered: int, waiting: int, delay: float
) -> None:
    """A round waits for more answers only when it would save one while others are
    under way and less than half a round is ready, and never past GATHER since the
    last round."""
    assert lane_module.gather_for(since_round, ready, answered, waiting) == pytest.approx(delay)


def test_answers_arriving_one_by_one_share_a_round(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registrations answered one after the other while others are under way are saved
    by one round together, not by one round each."""
    monkeypatch.setattr(lane_module, "BATCH", 4)
    monkeypatch.setattr(lane_module, "GATHER", 600.0)
    monkeypatch.setattr(env.registry, "backend", "http")
    gates = {name: threading.Event() for name in ("a.bin", "b.bin")}
    claiming, queued = threading.Event(), threading.Event()
    attempt = env.steps.attempt

    def gated(item: Item, step: Step) -> tuple[Item, object]:
        if step is Step.CLAIM and item.relpath_str == "first.bin":
            claiming.set()  # the lane is busy: a and b queue up for its next round
            assert queued.wait(60)
        if step is Step.REGISTER:
            assert gates[item.relpath_str].wait(60)
        return attempt(item, step)

    monkeypatch.setattr(env.steps, "attempt", gated)
    saved_together: list[int] = []
    run_round = lane_module.run_round

    def counting(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("answered"):
            saved_together.append(len(kwargs["answered"]))
        return run_round(*args, **kwargs)

    monkeypatch.setattr(lane_module, "run_round", counting)
    gathering = threading.Event()
    gather_for = lane_module.gather_for

    def noting(since_round: float, ready: int, answered: int, waiting: int) -> float:
        delay = gather_for(since_round, ready, answered, waiting)
        if answered == 1 and waiting == 1 and delay > 0:
            gathering.set()
        return delay

    monkeypatch.setattr(lane_module, "gather_for", noting)
    running = lane_for(env, handed)
    try:
        first = env.drop("first.bin", b"gone before its claim")
        running.submit(first)
        assert claiming.wait(60)
        futures = [running.submit(env.drop(name, os.urandom(700))) for name in gates]
        (env.inbox / "first.bin").unlink()
        queued.set()
        wait_for(lambda: running.waiting_since is not None, 60, "both registrations sent")
        gates["a.bin"].set()
        assert gathering.wait(60), "the lane ran a round for the first answer alone"
        gates["b.bin"].set()
        assert [i.state for i in _results(futures)] == [State.DONE] * 2
    finally:
        running.stop()
    assert saved_together == [2]


def test_a_lone_answer_is_saved_without_waiting_to_gather(
    env: Env, handed: Handed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other registration under way, an answer's round runs at once (GATHER is
    ten minutes here)."""
    monkeypatch.setattr(lane_module, "GATHER", 600.0)
    monkeypatch.setattr(env.registry, "backend", "http")
    running = lane_for(env, handed)
    try:
        future = running.submit(env.drop("alone.bin", b"one file, nothing else"))
        assert future.result(timeout=30).state is State.DONE
    finally:
        running.stop()
