"""Random ``kill -9`` soak: the real daemon is killed again and again while files arrive.

Each cycle drops a few inputs (random sizes, some empty, some repeating earlier
content, now and then a folder resource), lets the daemon run for a random time,
kills it with SIGKILL and starts it again, sometimes killing it again while it is
still recovering. At the end every invariant of :mod:`reliability.invariants`
must hold. The default run does a short version; the soak proper (hundreds of
kills over a thousand deposits) is ``pytest -m slow tests/reliability/test_kill9_soak.py``.
Figures go to ``tests/reliability/results/kill9-soak.json``; the seed is printed
and recorded, and ``NBANKD_SOAK_SEED`` replays a run.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for
from nbankd.archive.opening import create_archive
from reliability import figures
from reliability.invariants import (
    Input,
    check,
    journal_in_flight,
    read_reasons,
    read_receipts,
)

DUP_CODES = ("duplicate",)


def _payload(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        size = rng.randint(1 << 20, 3 << 20)  # long enough to be killed mid-copy
    elif roll < 0.4:
        size = rng.randint(20_000, 200_000)
    else:
        size = rng.randint(1, 20_000)
    return rng.randbytes(size)


def make_inputs(
    rng: random.Random, inbox: Path, start: int, n: int, earlier: list[Input]
) -> list[Input]:
    """``n`` new inputs numbered from ``start``: files, some empty, some repeats, a folder."""
    out: list[Input] = []
    for i in range(start, start + n):
        roll = rng.random()
        name = f"f{i:05d}.bin"
        repeatable = [e for e in earlier + out if e.data]
        if roll < 0.04:
            out.append(Input(inbox, name, data=b"", expect="rejected", codes=("empty",)))
        elif roll < 0.08 and repeatable:
            out.append(Input(inbox, name, data=rng.choice(repeatable).data, codes=DUP_CODES))
        elif roll < 0.12:
            tree = {"a.dat": _payload(rng), "sub/b.dat": rng.randbytes(rng.randint(1, 5000))}
            out.append(Input(inbox, f"d{i:05d}", tree=tree, expect="deposited"))
        else:
            out.append(Input(inbox, name, data=_payload(rng)))
    return out


def _mark_duplicates(inputs: list[Input]) -> list[Input]:
    """Inputs sharing content accept a duplicate rejection; lone ones must be deposited."""
    groups: dict[str, int] = {}
    for inp in inputs:
        if inp.data:
            groups[inp.sha1] = groups.get(inp.sha1, 0) + 1
    out = []
    for inp in inputs:
        if inp.data:
            shared = groups[inp.sha1] > 1
            inp = Input(
                inp.inbox,
                inp.relpath,
                data=inp.data,
                expect=None if shared else "deposited",
                codes=DUP_CODES if shared else (),
            )
        out.append(inp)
    return out


def _finished(h: DaemonHarness, n: int) -> bool:
    try:
        done = len(read_receipts(h.state_dir)) + len(read_reasons(h.rejected))
    except (AssertionError, ValueError):
        return False  # a line or reason being written right now
    return done >= n and not journal_in_flight(h.state_dir)


def soak(h: DaemonHarness, *, files: int, kills: int, max_delay: float) -> dict[str, Any]:
    """Drops ``files`` inputs over ``kills`` kill -9 cycles; returns the figures."""
    seed = int(os.environ.get("NBANKD_SOAK_SEED", time.time_ns() % 2**32))
    print(f"kill -9 soak seed {seed} (replay with NBANKD_SOAK_SEED={seed})")
    rng = random.Random(seed)
    h.inbox_options = {"directories": "resources"}
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.write_config()
    h.start()
    t0 = time.monotonic()
    inputs: list[Input] = []
    per_cycle = max(1, files // kills)
    in_flight_at_kill = 0
    recovering_kills = 0
    for cycle in range(kills):
        n = per_cycle if cycle < kills - 1 else files - len(inputs)
        batch = make_inputs(rng, h.inbox, len(inputs), n, inputs)
        inputs += batch
        half = len(batch) // 2
        for inp in batch[half:]:  # arrives while the daemon runs
            inp.write(h.root)
        # a random moment: right after start-up (recovery), mid-copy, mid-registration...
        time.sleep(rng.uniform(0.0, max_delay))
        assert h.proc is not None and h.proc.poll() is None, "nbankd died on its own"
        h.kill9()
        if journal_in_flight(h.state_dir):
            in_flight_at_kill += 1
        for inp in batch[:half]:  # arrives while the daemon is dead
            inp.write(h.root)
        h.start()
        if rng.random() < 0.15:  # kill it again while it resumes what was in flight
            h.kill9()
            recovering_kills += 1
            h.start()
    try:
        wait_for(lambda: _finished(h, len(inputs)), 120 + files / 5, "every input to finish")
    except AssertionError:
        h.dump_log()
        raise
    h.stop()
    total_kills = kills + recovering_kills
    result: dict[str, Any] = {
        "seed": seed,
        "inputs": len(inputs),
        "kills": total_kills,
        "kills_during_recovery": recovering_kills,
        "kills_with_work_in_flight": in_flight_at_kill,
        "seconds": round(time.monotonic() - t0, 1),
    }
    try:
        counts = check(h, _mark_duplicates(inputs))
    except AssertionError as err:
        result |= {"losses_or_violations": str(err)[:2000], "passed": False}
        figures.record("kill9-soak", f"{files}-files", result)
        raise
    result |= {**counts.to_json(), "losses": 0, "duplicates": 0, "passed": True}
    figures.record("kill9-soak", f"{files}-files", result)
    print(f"kill -9 soak figures: {result}")
    return result


def test_kill9_soak_short(daemon_factory: Callable[..., DaemonHarness]) -> None:
    """Ten kill -9 cycles over a hundred inputs lose and duplicate nothing."""
    result = soak(daemon_factory(), files=100, kills=10, max_delay=0.8)
    assert result["kills"] >= 10


@pytest.mark.slow
def test_kill9_soak_long(daemon_factory: Callable[..., DaemonHarness]) -> None:
    """Three hundred kill -9 cycles over a thousand inputs lose and duplicate nothing."""
    result = soak(daemon_factory(), files=1000, kills=300, max_delay=0.8)
    assert result["kills"] >= 300
