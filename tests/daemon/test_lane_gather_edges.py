"""The lane's rounds gathering answers (GATHER): a lone file behind an unrelated hung
registration never waits, and a stop during a wait is honoured at once."""

from __future__ import annotations

import threading
import time

import pytest

from fixtures.daemon import wait_for
from fixtures.lane_env import Handed, lane_for
from fixtures.steps_env import Env, env
from nbankd.daemon import lane as lane_module
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step

__all__ = ["env"]


def _one_registration_hangs(
    env: Env, monkeypatch: pytest.MonkeyPatch, name: str, release: threading.Event
) -> tuple[threading.Event, threading.Event]:
    """An HTTP registry (as the lane sees it) where ``name``'s registration hangs until
    ``release``; returns the events set once it hangs and once it has ended (the
    registry must not be closed under it). Every other step runs as is."""
    monkeypatch.setattr(env.registry, "backend", "http")
    hanging, ended = threading.Event(), threading.Event()
    attempt = env.steps.attempt

    def gated(item: Item, step: Step) -> tuple[Item, object]:
        if step is not Step.REGISTER or item.relpath_str != name:
            return attempt(item, step)
        hanging.set()
        try:
            assert release.wait(60)
            return attempt(item, step)
        finally:
            ended.set()

    monkeypatch.setattr(env.steps, "attempt", gated)
    return hanging, ended


def _noting_gathers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, float]]:
    """Every wait gather_for asks for, as (ready, answered, waiting, delay)."""
    waits: list[tuple[int, int, int, float]] = []
    gather_for = lane_module.gather_for

    def noting(since_round: float, ready: int, answered: int, waiting: int) -> float:
        delay = gather_for(since_round, ready, answered, waiting)
        if delay > 0:
            waits.append((ready, answered, waiting, delay))
        return delay

    monkeypatch.setattr(lane_module, "gather_for", noting)
    return waits


def test_a_lone_file_behind_a_hung_registration_waits_only_for_its_answer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file arriving alone while another file's registration hangs at the registry
    waits once at most, for its own answer's round: its other steps never wait."""
    release = threading.Event()
    hanging, ended = _one_registration_hangs(env, monkeypatch, "hung.bin", release)
    waits = _noting_gathers(monkeypatch)
    running = lane_for(env, Handed())
    try:
        running.submit(env.drop("hung.bin", b"its registry never answers"))
        assert hanging.wait(60)
        alone = running.submit(env.drop("alone.bin", b"one file, arriving alone"))
        started = time.monotonic()
        assert alone.result(timeout=60).state is State.DONE
        took = time.monotonic() - started
    finally:
        release.set()
        running.stop()
        assert ended.wait(60)
    without_answer = [w for w in waits if w[1] == 0]
    assert without_answer == [], (
        f"gather waits (ready, answered, waiting, delay) without an answer to save, "
        f"in the lone file's {took:.3f}s: {without_answer}"
    )


def test_a_stop_during_a_gather_wait_is_honoured_at_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while it waits (GATHER set to ten minutes) for more answers beside a
    registration that never answers, the lane ends after its STOP_GRACE for that
    registration, not after GATHER, and every future is resolved."""
    monkeypatch.setattr(lane_module, "GATHER", 600.0)
    release = threading.Event()
    hanging, ended = _one_registration_hangs(env, monkeypatch, "hung.bin", release)
    waits = _noting_gathers(monkeypatch)
    running = lane_for(env, Handed())
    try:
        hung = running.submit(env.drop("hung.bin", b"its registry never answers"))
        assert hanging.wait(60)
        other = running.submit(env.drop("other.bin", b"waits to gather"))
        wait_for(lambda: waits, 60, "the lane waiting to gather")
        running.stop()
        running._thread.join(lane_module.STOP_GRACE + 10)
        assert not running._thread.is_alive(), "the stop was not honoured"
    finally:
        release.set()
        running.stop()
        assert ended.wait(60)
    assert hung.result(timeout=0).state is State.CHECKED  # not answered within the grace
    assert other.done()  # cancelled while queued, or handed back as last saved
