"""Hostile review of the group-commit path: many inputs moving through their steps
together in one round (nbankd.deposit.rounds, nbankd.archive.syncs, the lane, the
embedded registry's batch transaction).

Each test names one behaviour a user relies on; those not labelled as guards fail on
the code they were written against.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from fixtures.daemon import DaemonHarness, wait_for
from fixtures.faults import fsync_fails_for
from fixtures.steps_env import Env
from nbankd import seams
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State
from nbankd.deposit.rounds import run_round
from nbankd.registry.embedded import EmbeddedRegistry

SIDECAR = ".nbank.yaml"


def _journal_gone(*_args: object, **_kw: object) -> None:
    """The journal's commit failing as a full or failing state_dir makes it fail."""
    raise sqlite3.OperationalError("disk I/O error")


def _with_sidecar(env: Env, name: str, data: bytes, sidecar: bytes) -> Item:
    """``name`` and its sidecar written into the inbox and journaled, as a scan would."""
    (env.inbox / (name + SIDECAR)).write_bytes(sidecar)
    (env.inbox / name).write_bytes(data)
    return env.journal_existing(name, sidecar=os.fsencode(name + SIDECAR))


def _rounds(env: Env, item: Item, n: int) -> list[Item]:
    """``n`` rounds of ``item`` alone (every backoff ignored); the item after each."""
    seen = []
    for _ in range(n):
        [moved] = run_round(env.steps, [item], now=float("inf"))
        assert moved.error is None, moved.error
        item = moved.item
        seen.append(item)
        if not moved.more and item.state in (State.DONE, State.REJECTED):
            break
    return seen


def _registry_locked(registry: EmbeddedRegistry) -> bool:
    """True while some connection holds the registry's write lock."""
    probe = sqlite3.connect(registry.db_path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


# -- 1. a registration committed with the round's batch, its journal save lost ----------


@pytest.mark.parametrize(
    "metadata",
    [b"animal: 417", b"experimenter: ''"],
    ids=["numeric-animal", "blank-experimenter"],
)
def test_a_registration_whose_round_was_not_saved_is_found_ours_on_the_next_round(
    env: Env, monkeypatch: pytest.MonkeyPatch, metadata: bytes
) -> None:
    """The registry committed a round's registration but the journal's commit failed:
    the next round finds the record its own (same bytes, same sidecar) and the input
    is deposited, whatever the registry made of its experimenter or animal field."""
    item = _with_sidecar(env, "rec.bin", os.urandom(3000), b"metadata: {" + metadata + b"}\n")
    item = env.until(item, State.CHECKED)
    with monkeypatch.context() as faults:
        faults.setattr(env.journal, "save_many", _journal_gone)
        [lost] = run_round(env.steps, [item], now=float("inf"))
    assert isinstance(lost.error, sqlite3.OperationalError)
    assert env.registry.get_resource(item.name or "") is not None  # committed
    again = env.journal.get(item.id)
    assert again is not None and again.state is State.CHECKED
    states = [(i.state, i.error_code) for i in _rounds(env, again, 12)]
    assert states[-1] == (State.DONE, None), states
    assert env.stored() == ["re/rec.bin"]


def _small_batch() -> list[tuple[str, bytes, bytes | None]]:
    """Inputs small enough for the lane, each sidecar giving a numeric animal (whichever
    of them the first committed batch holds, its answer is lost with the kill)."""
    return [
        (f"rec{i}.bin", os.urandom(2500 + i), f"metadata: {{animal: {417 + i}}}\n".encode())
        for i in range(3)
    ]


def _drop_all(h: DaemonHarness, inputs: list[tuple[str, bytes, bytes | None]]) -> None:
    for name, data, sidecar in inputs:
        if sidecar is not None:
            tmp = h.root / f".side-{name}"
            tmp.write_bytes(sidecar)
            os.rename(tmp, h.inbox / (name + SIDECAR))
        h.drop(name, data)


def _in_flight_after(h: DaemonHarness, inputs: int, timeout: float) -> list[tuple[str, str]]:
    """Waits (up to ``timeout``) for ``inputs`` receipts or reasons; returns the
    (state, error code) of each journal row still in flight then (the daemon runs)."""
    path = h.state_dir / "journal.sqlite3"

    def in_flight() -> list[tuple[str, str]]:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(
                "SELECT state, coalesce(error_code, '') FROM items WHERE state NOT IN "
                "('done', 'rejected', 'returned', 'cancelled')"
            ).fetchall()
        finally:
            db.close()

    def finished() -> bool:
        return len(h.receipts()) + len(h.reasons()) >= inputs and not in_flight()

    with contextlib.suppress(AssertionError):  # timed out: the rows left say why
        wait_for(finished, timeout, f"{inputs} inputs to finish")
    return in_flight()


def test_a_kill_after_the_rounds_registry_commit_recovers_every_input(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """nbankd killed (-9) once a round's registrations are committed and before the
    round's journal commit: restarted, it deposits every input of the batch, the one
    whose sidecars give a numeric animal, each once."""
    h = daemon_factory()
    h.inbox.mkdir(parents=True)
    h.write_config()
    inputs = _small_batch()
    h.start(env={"NBANKD_CRASH_AT": "after-register"})
    _drop_all(h, inputs)
    assert h.wait_exit(timeout=60) == -signal.SIGKILL
    h.start()
    try:
        left = _in_flight_after(h, len(inputs), timeout=25)
    finally:
        h.stop()
    assert left == []
    assert sorted(r["source"].rsplit("/", 1)[1] for r in h.receipts()) == [
        n for n, _d, _s in inputs
    ]


def test_a_registration_whose_answer_the_network_lost_is_found_ours_by_the_lane(
    daemon_factory: Callable[..., DaemonHarness], django_registry: Any, fault_proxy: Any
) -> None:
    """django-neurobank commits a registration sent from the lane's remote threads and
    its answer is lost on the way back (once): the retry finds the record its own and
    the input is deposited, though its sidecar leaves the experimenter blank."""
    h = daemon_factory(registry=fault_proxy.url, auth=django_registry.auth)
    h.dtype = django_registry.add_datatype(content_type="application/octet-stream")
    h.inbox.mkdir(parents=True)
    h.write_config()
    h.start()
    stem = f"blank-{h.archive_name}"
    inputs = [(f"{stem}.bin", os.urandom(3100), b"metadata: {experimenter: '', rig: r2}\n")]
    fault_proxy.inject("drop_after_commit", methods={"POST"}, path_contains="resources", limit=1)
    _drop_all(h, inputs)
    try:
        wait_for(lambda: fault_proxy.committed_dropped >= 1, 30, "the answer to be dropped")
        left = _in_flight_after(h, len(inputs), timeout=25)
    finally:
        h.stop()
    assert left == []
    assert [r["outcome"] for r in h.receipts()] == ["deposited"]


# -- 2. nothing of an archive is touched while the registry's write lock is held --------


def test_a_duplicate_judged_in_a_batch_touches_no_archive_while_the_registry_is_locked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate registering after a new file in one round (the registry refuses its
    SHA-1): judging it never stats or lists a folder of the archive while the round
    holds the registry's write lock (a hung archive mount would hold every writer of
    the registry, in every process, until its busy timeout)."""
    data = os.urandom(4000)
    items = [env.until(env.drop(n, data), State.CHECKED) for n in ("newA.bin", "dupB.bin")]
    registry = cast(EmbeddedRegistry, env.registry)
    archive = str(env.archive.path)
    touched: list[tuple[str, str]] = []

    def spying(name: str) -> None:
        real = getattr(os, name)

        def spy(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            ours = isinstance(path, str | os.PathLike) and str(path).startswith(archive)
            if ours and _registry_locked(registry):
                touched.append((name, str(path)))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)

    for name in ("lstat", "stat", "listdir", "scandir", "open"):
        spying(name)
    moved = run_round(env.steps, items, now=float("inf"))
    assert [(m.item.state, m.item.error_code) for m in moved] == [
        (State.REGISTERED, None),
        (State.STAGED, "sha1-held"),  # judged by its lookup, outside the lock
    ]
    assert touched == []
    monkeypatch.undo()
    later = run_round(env.steps, [m.item for m in moved], now=float("inf"))
    assert [(m.item.state, m.item.error_code) for m in later] == [
        (State.PUBLISHED, None),
        (State.REJECTING, "duplicate"),
    ]
    assert "registered as newA" in (later[1].item.error_message or "")


# -- 3. a registry locked by another process holds a round up once, not per item --------


def test_a_registry_locked_elsewhere_holds_a_round_up_once_not_once_per_registration(
    env: Env,
) -> None:
    """Another process holds the embedded registry's write lock: a round of six
    registrations (and a claim) waits for it about one busy timeout, then saves every
    registration as failed (retried), instead of waiting a whole busy timeout for each
    (64 of them: half an hour with the daemon's 30 s) while every other input of the
    round, and every small file queued behind it, waits too."""
    registry = cast(EmbeddedRegistry, env.registry)
    checked = [
        env.until(env.drop(f"r{i}.bin", os.urandom(900 + i)), State.CHECKED) for i in range(6)
    ]
    fresh = env.drop("fresh.bin", os.urandom(1000))
    registry.busy_timeout = 1.0
    registry.release_thread()  # this thread's next connection waits that long
    holder = sqlite3.connect(registry.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        moved = run_round(env.steps, [fresh, *checked], now=float("inf"))
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [m.item.state for m in moved] == [State.CLAIMED] + [State.CHECKED] * 6
    assert all(m.outcome is not None and m.outcome.kind == "transient" for m in moved[1:])
    assert took < 3 * registry.busy_timeout, f"the round waited {took:.1f}s for the lock"


# -- guards (pass today): what held up -----------------------------------------------


def test_guard_one_stub_folder_failing_its_fsync_keeps_only_its_own_staged_name(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: two publishes of one round into two stub folders, one folder's fsync
    failing: that input keeps its staged name and stays REGISTERED (published again
    next round); the other is PUBLISHED with its staged name dropped; one file each."""
    items = [
        env.until(env.drop(n, os.urandom(3000 + i)), State.REGISTERED)
        for i, n in enumerate(("aa1.bin", "bb1.bin"))
    ]
    staged = [env.archive.staging_dir / env.steps.staged_name(i) for i in items]
    failing = env.archive.resources_dir / "aa"
    failing.mkdir(exist_ok=True)
    with monkeypatch.context() as faults:
        fsync_fails_for(faults, failing)
        moved = run_round(env.steps, items, now=float("inf"))
    assert [m.item.state for m in moved] == [State.REGISTERED, State.PUBLISHED]
    assert [p.exists() for p in staged] == [True, False]
    assert [env.journal.get(i.id).state for i in items] == [  # type: ignore[union-attr]
        State.REGISTERED,
        State.PUBLISHED,
    ]
    [again] = run_round(env.steps, [moved[0].item], now=float("inf"))
    assert again.item.state is State.PUBLISHED and not staged[0].exists()
    assert env.stored() == ["aa/aa1.bin", "bb/bb1.bin"]


def test_guard_a_registration_committed_by_a_step_that_then_failed_is_found_ours(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: in one batch a registration is written and its step then fails (an
    unexpected error): the batch still commits it, the same bytes under another name
    in the batch are judged a duplicate of it (kept in rejected/), and the next round
    finds the record its own: one record, one stored copy, nothing lost."""
    data = os.urandom(4000)
    items = [env.until(env.drop(n, data), State.CHECKED) for n in ("firstA.bin", "copyB.bin")]
    with monkeypatch.context() as faults:
        faults.setattr(seams, "_raise", "after-register-request")
        moved = run_round(env.steps, items, now=float("inf"))
    assert [(m.item.state, m.item.error_code) for m in moved] == [
        (State.CHECKED, "internal"),
        (State.STAGED, "sha1-held"),  # judged a duplicate by its lookup, next
    ]
    registry = cast(EmbeddedRegistry, env.registry)
    assert {r.name for r in registry.search(sha1=moved[0].item.sha1 or "")} == {"firstA"}
    first = _rounds(env, moved[0].item, 12)[-1]
    second = _rounds(env, moved[1].item, 4)[-1]
    assert (first.state, second.state) == (State.DONE, State.REJECTED)
    assert env.stored() == ["fi/firstA.bin"]
    assert (env.inbox / "rejected" / "copyB.bin").read_bytes() == data
