"""Settle, marker and stall rules: pure functions, time passed in, no waiting."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbankd.watch.identity import Identity
from nbankd.watch.scan import Entry, EntryKind
from nbankd.watch.settle import (
    HOLD,
    ReadyMode,
    SettlePolicy,
    State,
    TrackerState,
    Watch,
    forget,
    hold_open,
    next_deadline,
    observe,
    sidecar_for,
    step,
)

SETTLE = 10.0


def ident(version: int = 0, size: int = 100) -> Identity:
    """A file identity; a different ``version`` means the file changed."""
    return Identity(
        dev=1,
        ino=42,
        size=size,
        mtime_ns=version,
        ctime_ns=version,
        nlink=1,
        mode=0o100644,
        uid=0,
    )


def run(
    observations: list[tuple[float, int]],
    *,
    mode: ReadyMode = ReadyMode.SETTLE,
    marker: bool = False,
    stall_after: float | None = 3600.0,
    settle: float = SETTLE,
) -> Watch:
    """Feeds (time, version) observations through observe() and returns the last watch."""
    w: Watch | None = None
    for now, version in observations:
        w = observe(
            w,
            ident(version),
            now,
            settle_seconds=settle,
            stall_after=stall_after,
            ready_mode=mode,
            marker_present=marker,
        )
    assert w is not None
    return w


# --- observe: one entry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("observations", "kw", "state", "reason"),
    [
        ([(0, 0)], {}, State.SETTLING, "settling: unchanged for 0 s of 10 s"),
        ([(0, 0), (3.2, 0)], {}, State.SETTLING, "settling: unchanged for 3.2 s of 10 s"),
        ([(0, 0), (10, 0)], {}, State.READY, "ready: unchanged for 10 s (settle 10 s)"),
        ([(0, 0), (9, 1), (15, 1)], {}, State.SETTLING, "unchanged for 6 s of 10 s"),
        ([(0, 0), (9, 1), (19, 1)], {}, State.READY, "ready"),
        ([(0, 0)], {"settle": 0}, State.READY, "ready: unchanged for 0 s (settle 0 s)"),
        (
            [(0, 0), (20, 0)],
            {"mode": ReadyMode.MARKER},
            State.WAITING_FOR_MARKER,
            "waiting for its .done marker: settled, unchanged for 20 s",
        ),
        (
            [(0, 0), (5, 0)],
            {"mode": ReadyMode.MARKER},
            State.SETTLING,
            "of 10 s; its .done marker not present yet",
        ),
        ([(0, 0), (5, 0)], {"mode": ReadyMode.MARKER, "marker": True}, State.SETTLING, "5 s"),
        (
            [(0, 0), (20, 0)],
            {"mode": ReadyMode.MARKER, "marker": True},
            State.READY,
            "ready: unchanged for 20 s (settle 10 s) and marker present",
        ),
        (
            [(0, 0), (1800, 1), (3600, 2)],
            {},
            State.STALLED,
            "stalled: still changing after 1 h (stall_after 1 h); last change 0 s ago",
        ),
        ([(0, 0), (1800, 1), (3600, 2)], {"stall_after": None}, State.SETTLING, "settling"),
        ([(0, 0), (3600, 0)], {"stall_after": 60}, State.READY, "ready"),
        ([(0, 0), (1, 1), (3600, 1)], {"stall_after": 60}, State.READY, "ready"),
        ([(0, 0), (5, 0), (3, 1)], {}, State.SETTLING, "unchanged for 0 s of 10 s"),
    ],
    ids=[
        "first-sight",
        "partway",
        "settled",
        "change-restarts-clock",
        "settles-after-change",
        "zero-settle",
        "settled-no-marker",
        "settling-no-marker",
        "settling-with-marker",
        "marker-and-settled",
        "still-changing-stalls",
        "stall-disabled",
        "unchanged-never-stalls",
        "stalled-then-settled",
        "clock-going-back",
    ],
)
def test_observe_table(
    observations: list[tuple[float, int]], kw: dict, state: State, reason: str
) -> None:
    """Each observation sequence ends in the expected state with the expected reason."""
    verdict = run(observations, **kw).verdict
    assert verdict.state is state
    assert reason in verdict.reason


def test_seconds_left_counts_down() -> None:
    """A settling verdict says how long the file must stay unchanged."""
    assert run([(0, 0), (3.5, 0)]).verdict.seconds_left == pytest.approx(6.5)


def test_zero_byte_file_settles_like_any_other() -> None:
    """An empty file is not ready on sight; it is READY once settled (pipeline rejects it)."""
    empty = ident(size=0)
    w = observe(None, empty, 0, settle_seconds=SETTLE, stall_after=None)
    assert w.verdict.state is State.SETTLING
    w = observe(w, empty, SETTLE, settle_seconds=SETTLE, stall_after=None)
    assert w.verdict.state is State.READY


def test_change_after_settling_starts_a_new_stall_period() -> None:
    """A file that settled and then changes again is not instantly stalled."""
    w = run([(0, 0), (100, 0), (5000, 1)], mode=ReadyMode.MARKER, stall_after=60)
    assert w.verdict.state is State.SETTLING
    assert (w.changing_since, w.stall_at) == (5000, 5060)


def test_policy_rejects_bad_values() -> None:
    """Negative settle times and non-positive stall times are refused."""
    with pytest.raises(ValueError, match="settle_seconds"):
        SettlePolicy(settle_seconds=-1)
    with pytest.raises(ValueError, match="stall_after"):
        SettlePolicy(stall_after=0)


# --- properties ------------------------------------------------------------------------

gaps = st.lists(st.floats(min_value=0.0, max_value=1e5, allow_nan=False), min_size=1, max_size=30)
settles = st.floats(min_value=0.001, max_value=1e4, allow_nan=False)


@given(gaps=gaps, settle=settles, marker=st.booleans(), mode=st.sampled_from(ReadyMode))
def test_changing_every_time_is_never_ready(
    gaps: list[float], settle: float, marker: bool, mode: ReadyMode
) -> None:
    """An entry whose identity differs at every observation is never READY."""
    w: Watch | None = None
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        w = observe(
            w,
            ident(i),
            now,
            settle_seconds=settle,
            stall_after=None,
            ready_mode=mode,
            marker_present=marker,
        )
        assert w.verdict.state is not State.READY


@given(
    gaps=gaps,
    settle=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    extra=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    stall=st.none() | st.floats(min_value=0.001, max_value=1e5, allow_nan=False),
)
def test_unchanged_long_enough_is_ready(
    gaps: list[float], settle: float, extra: float, stall: float | None
) -> None:
    """Unchanged for at least settle_seconds since its last change means READY (settle mode)."""
    w: Watch | None = None
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        w = observe(w, ident(i), now, settle_seconds=settle, stall_after=stall)
    assert w is not None
    w = observe(
        w, ident(len(gaps) - 1), now + settle + extra, settle_seconds=settle, stall_after=stall
    )
    assert w.verdict.state is State.READY


@given(gaps=gaps, settle=settles)
def test_marker_mode_without_marker_is_never_ready(gaps: list[float], settle: float) -> None:
    """Without its marker an entry is never READY in marker mode, however long it waits."""
    w: Watch | None = None
    now = 0.0
    for gap in gaps:
        now += gap
        w = observe(
            w, ident(), now, settle_seconds=settle, stall_after=None, ready_mode=ReadyMode.MARKER
        )
        assert w.verdict.state is not State.READY


@given(gaps=gaps, settle=settles)
def test_deadline_is_exactly_when_it_settles(gaps: list[float], settle: float) -> None:
    """Observing an unchanged entry at next_deadline makes it READY, and not a moment before."""
    entry = Entry("f", EntryKind.FILE, ident())
    state = TrackerState()
    now = 0.0
    for gap in gaps:
        now += gap
        state = step(state, [entry], now, SettlePolicy(settle, None)).state
    deadline = next_deadline(state)
    if deadline is None:
        assert step(state, [entry], now, SettlePolicy(settle, None)).ready == (entry,)
        return
    just_before = math.nextafter(deadline, -math.inf)
    if just_before >= now:
        assert step(state, [entry], just_before, SettlePolicy(settle, None)).ready == ()
    assert step(state, [entry], deadline, SettlePolicy(settle, None)).ready == (entry,)


# --- step: a whole scan -----------------------------------------------------------------


def file(relpath: str, version: int = 0, kind: EntryKind = EntryKind.FILE) -> Entry:
    owner = None
    if kind is EntryKind.SIDECAR:
        owner = relpath.removesuffix(".nbank.yaml")
    elif kind is EntryKind.MARKER:
        owner = relpath.removesuffix(".done")
    return Entry(relpath, kind, replace(ident(version), ino=hash(relpath) & 0xFFFF), owner=owner)


POLICY = SettlePolicy(settle_seconds=SETTLE, stall_after=60.0)


def test_step_reports_settled_inputs_ready() -> None:
    """Inputs unchanged for settle_seconds are listed ready; newer ones are not."""
    old, new = file("old.wav"), file("new.wav")
    s = step(TrackerState(), [old], 0, POLICY)
    s = step(s.state, [old, new], SETTLE, POLICY)
    assert s.ready == (old,)
    assert s.verdicts["new.wav"].state is State.SETTLING


def test_step_ready_is_level_triggered() -> None:
    """A ready entry is reported again on every step while it is still there."""
    f = file("a.wav")
    s = step(TrackerState(), [f], 0, POLICY)
    s = step(s.state, [f], SETTLE, POLICY)
    assert step(s.state, [f], SETTLE + 1, POLICY).ready == (f,)


def test_step_forgets_vanished_paths() -> None:
    """Paths missing from the scan are dropped and listed as vanished."""
    a, b = file("a"), file("b")
    s = step(TrackerState(), [a, b], 0, POLICY)
    s = step(s.state, [b], 1, POLICY)
    assert s.vanished == ("a",)
    assert set(s.state.watches) == {"b"}


def test_reappearing_path_starts_over() -> None:
    """A file that vanished and came back must settle again from scratch."""
    f = file("a")
    s = step(TrackerState(), [f], 0, POLICY)
    s = step(s.state, [], 5, POLICY)
    s = step(s.state, [f], 12, POLICY)
    assert s.ready == ()
    assert s.state.watches["a"].first_seen == 12


def test_changing_sidecar_holds_its_input() -> None:
    """A settled input waits while its sidecar is still changing."""
    data, car = file("a.wav"), file("a.wav.nbank.yaml", 0, EntryKind.SIDECAR)
    s = step(TrackerState(), [data, car], 0, POLICY)
    car = file("a.wav.nbank.yaml", 1, EntryKind.SIDECAR)
    s = step(s.state, [data, car], SETTLE, POLICY)
    assert s.ready == ()
    assert s.verdicts["a.wav"].state is State.SETTLING
    assert "sidecar a.wav.nbank.yaml changed 0 s ago" in s.verdicts["a.wav"].reason
    assert step(s.state, [data, car], 2 * SETTLE, POLICY).ready == (data,)


def test_an_input_with_two_sidecars_is_stalled_naming_both() -> None:
    """A settled input with both a .nbank.yaml and a .nbank.json sidecar is never ready:
    stalled, naming both, until one of them goes."""
    data = file("a.wav")
    yaml_car = file("a.wav.nbank.yaml", 0, EntryKind.SIDECAR)
    json_car = replace(file("a.wav.nbank.json", 0, EntryKind.SIDECAR), owner="a.wav")
    s = step(TrackerState(), [data, yaml_car, json_car], 0, POLICY)
    s = step(s.state, [data, yaml_car, json_car], 2 * SETTLE, POLICY)
    assert s.ready == () and s.stalled == (data,)
    assert "two sidecars, a.wav.nbank.json and a.wav.nbank.yaml" in s.verdicts["a.wav"].reason
    assert step(s.state, [data, yaml_car], 3 * SETTLE, POLICY).ready == (data,)


def test_marker_mode_needs_the_marker() -> None:
    """In marker mode a settled input is ready only once NAME.done exists."""
    policy = replace(POLICY, ready_mode=ReadyMode.MARKER)
    data = file("sub/a.wav")
    s = step(TrackerState(), [data], 0, policy)
    s = step(s.state, [data], SETTLE, policy)
    assert s.ready == ()
    assert s.verdicts["sub/a.wav"].reason.startswith("waiting for a.wav.done")
    marker = file("sub/a.wav.done", 0, EntryKind.MARKER)
    assert step(s.state, [data, marker], SETTLE + 1, policy).ready == (data,)


def test_unsafe_entries_settle_before_being_reported() -> None:
    """A hard link is reported unsafe only once settled (link-then-unlink is transient)."""
    link = file("a.wav", 0, EntryKind.HARDLINK)
    s = step(TrackerState(), [link], 0, POLICY)
    assert s.unsafe == ()
    s = step(s.state, [link], SETTLE, POLICY)
    assert (s.unsafe, s.ready) == ((link,), ())


def test_stalled_inputs_are_listed() -> None:
    """An input still changing after stall_after is listed stalled, not ready."""
    s = step(TrackerState(), [file("a", 0)], 0, POLICY)
    s = step(s.state, [file("a", 1)], 30, POLICY)
    s = step(s.state, [file("a", 2)], 60, POLICY)
    assert [e.relpath for e in s.stalled] == ["a"]
    assert s.ready == ()


def test_orphans_and_problems_are_listed() -> None:
    """Sidecars and markers without their input, and unreadable folders, are reported."""
    car = file("gone.wav.nbank.yaml", 0, EntryKind.SIDECAR)
    bad = Entry("locked", EntryKind.UNREADABLE, None, problem="Permission denied (errno 13)")
    s = step(TrackerState(), [car, bad], 0, POLICY)
    assert (s.orphans, s.problems) == ((car,), (bad,))


def test_next_deadline_is_the_earliest_settle_or_stall() -> None:
    """next_deadline is the soonest time something may become ready or stalled."""
    s = step(TrackerState(), [file("a", 0)], 0, POLICY)
    s = step(s.state, [file("a", 0), file("b", 0)], 4, POLICY)
    assert next_deadline(s.state) == SETTLE  # a settles at 10, b at 14
    s = step(s.state, [file("a", 1), file("b", 0)], 5, POLICY)
    assert next_deadline(s.state) == 14  # b at 14, a at 15, a stalls at 60


def test_next_deadline_none_when_nothing_waits_on_time() -> None:
    """With everything ready or waiting for a marker there is no deadline."""
    policy = replace(POLICY, ready_mode=ReadyMode.MARKER)
    s = step(TrackerState(), [file("a")], 0, policy)
    s = step(s.state, [file("a")], SETTLE, policy)
    assert next_deadline(s.state) is None
    assert next_deadline(TrackerState()) is None


@given(
    scans=st.lists(
        st.sets(st.sampled_from(["a", "b", "c/d", "e.wav"]), max_size=4), min_size=1, max_size=8
    )
)
def test_vanished_is_exactly_what_left(scans: list[set[str]]) -> None:
    """After each step the state holds exactly the scanned paths; the rest vanished."""
    state = TrackerState()
    for now, paths in enumerate(scans):
        before = set(state.watches)
        result = step(state, [file(p) for p in paths], float(now), POLICY)
        assert set(result.state.watches) == paths
        assert set(result.vanished) == before - paths
        state = result.state


def test_forget_drops_claimed_paths() -> None:
    """forget() removes watches, e.g. after the daemon claims the files."""
    s = step(TrackerState(), [file("a"), file("b")], 0, POLICY)
    assert set(forget(s.state, ["a"]).watches) == {"b"}


def test_a_file_held_open_settles_again_from_the_hold() -> None:
    """A ready file held back (still open for writing) is not ready again until it has
    stayed unchanged settle_seconds after the hold, and says why it waits."""
    f = file("rec.wav")
    s = step(TrackerState(), [f], 0, POLICY)
    s = step(s.state, [f], SETTLE, POLICY)
    assert s.ready == (f,)
    held = hold_open(s.state, ["rec.wav"], SETTLE, SETTLE)
    assert "open for writing" in held.watches["rec.wav"].verdict.reason
    assert next_deadline(held) == 2 * SETTLE
    assert step(held, [f], 2 * SETTLE - 0.001, POLICY).ready == ()
    assert step(held, [f], 2 * SETTLE, POLICY).ready == (f,)


def test_a_file_held_open_for_long_never_stalls() -> None:
    """Being held open again and again is not changing: the file is never reported
    stalled, however long it waits."""
    f = file("quiet.wav")
    s = step(TrackerState(), [f], 0, POLICY)
    now = SETTLE
    for _ in range(20):  # 20 settle periods, past stall_after (60 s)
        s = step(s.state, [f], now, POLICY)
        assert s.stalled == ()
        assert s.ready == (f,)
        state = hold_open(s.state, ["quiet.wav"], now, SETTLE)
        s = replace(s, state=state)
        now += SETTLE


# --- sidecar_for: which sidecar an intent is journaled with -----------------------------

_SETTLED = run([(0, 0), (10, 0)])
_SETTLING = run([(0, 0), (3, 0)])


@pytest.mark.parametrize(
    ("found", "watches", "chosen"),
    [
        ({"a.nbank.yaml": None, "a.nbank.json": None}, {}, None),
        (
            {"a.nbank.yaml": ident(0), "a.nbank.json": None},
            {"a.nbank.yaml": _SETTLED},
            "a.nbank.yaml",
        ),
        ({"a.nbank.yaml": ident(0), "a.nbank.json": None}, {}, HOLD),
        ({"a.nbank.yaml": ident(0), "a.nbank.json": None}, {"a.nbank.yaml": _SETTLING}, HOLD),
        ({"a.nbank.yaml": ident(1), "a.nbank.json": None}, {"a.nbank.yaml": _SETTLED}, HOLD),
        (
            {"a.nbank.yaml": ident(0), "a.nbank.json": ident(0)},
            {"a.nbank.yaml": _SETTLED, "a.nbank.json": _SETTLED},
            HOLD,
        ),
        (
            {"a.nbank.yaml": None, "a.nbank.json": ident(0)},
            {"a.nbank.json": _SETTLED},
            "a.nbank.json",
        ),
    ],
    ids=["none", "settled", "unseen", "settling", "changed", "two", "json"],
)
def test_sidecar_for(
    found: dict[str, Identity | None], watches: dict[str, Watch], chosen: str | None
) -> None:
    """Only a sidecar the scan saw settle, unchanged since, goes with its input; one that
    appeared, changes or has a twin holds the input until the next scan."""
    assert sidecar_for(found.items(), watches) == chosen
