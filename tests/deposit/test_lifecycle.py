"""The deposit life cycle: a pure state machine over (state, step, outcome)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nbankd.deposit.lifecycle import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    FINAL,
    IN_FLIGHT,
    Outcome,
    Progress,
    State,
    Step,
    advance,
    backoff_delay,
    is_waiting,
    next_step,
)

NOW = 1_000_000.0
S = State

# The step each in-flight state runs next.
STEP_OF = {
    S.CLAIMING: Step.CLAIM,
    S.CLAIMED: Step.STAGE,
    S.STAGED: Step.LOOKUP,
    S.CHECKED: Step.REGISTER,
    S.REGISTERED: Step.PUBLISH,
    S.PUBLISHED: Step.VERIFY,
    S.VERIFIED: Step.RECORD,
    S.RECORDED: Step.RELEASE,
    S.REJECTING: Step.REJECT,
    S.RETURNING: Step.PUT_BACK,
}
# States in which the registry may hold this item's record (DONE: it does).
REGISTERED_OR_LATER = {S.REGISTERED, S.PUBLISHED, S.VERIFIED, S.RECORDED, S.DONE}

TRANSITIONS = [
    # (state, outcome kind, expected state); the step is the one the state runs next
    # happy path
    (S.CLAIMING, "ok", S.CLAIMED),
    (S.CLAIMED, "ok", S.STAGED),
    (S.STAGED, "ok", S.CHECKED),
    (S.CHECKED, "ok", S.REGISTERED),
    (S.REGISTERED, "ok", S.PUBLISHED),
    (S.PUBLISHED, "ok", S.VERIFIED),
    (S.VERIFIED, "ok", S.RECORDED),
    (S.RECORDED, "ok", S.DONE),
    (S.REJECTING, "ok", S.REJECTED),
    (S.RETURNING, "ok", S.RETURNED),
    # permanent before registration: reject
    (S.CLAIMING, "permanent", S.REJECTING),
    (S.CLAIMED, "permanent", S.REJECTING),
    (S.STAGED, "permanent", S.REJECTING),
    (S.CHECKED, "permanent", S.REJECTING),
    # permanent once registered, or while moving bytes we own: stay and back off
    (S.REGISTERED, "permanent", S.REGISTERED),
    (S.PUBLISHED, "permanent", S.PUBLISHED),
    (S.VERIFIED, "permanent", S.VERIFIED),
    (S.RECORDED, "permanent", S.RECORDED),
    (S.REJECTING, "permanent", S.REJECTING),
    (S.RETURNING, "permanent", S.RETURNING),
    # transient: stay and back off
    (S.CLAIMING, "transient", S.CLAIMING),
    (S.CLAIMED, "transient", S.CLAIMED),
    (S.STAGED, "transient", S.STAGED),
    (S.CHECKED, "transient", S.CHECKED),
    (S.REGISTERED, "transient", S.REGISTERED),
    (S.PUBLISHED, "transient", S.PUBLISHED),
    (S.VERIFIED, "transient", S.VERIFIED),
    (S.RECORDED, "transient", S.RECORDED),
    (S.REJECTING, "transient", S.REJECTING),
    (S.RETURNING, "transient", S.RETURNING),
    # the input changed: put it back, unless the registry already has it
    (S.CLAIMING, "changed", S.RETURNING),
    (S.CLAIMED, "changed", S.RETURNING),
    (S.STAGED, "changed", S.RETURNING),
    (S.CHECKED, "changed", S.RETURNING),
    (S.REGISTERED, "changed", S.REGISTERED),
    (S.PUBLISHED, "changed", S.PUBLISHED),
    (S.VERIFIED, "changed", S.VERIFIED),
    # recorded: the archive's copy no longer needs the input, which goes back whole
    (S.RECORDED, "changed", S.RETURNING),
    # placed by rename, changed after registering, its record's location withdrawn by
    # publish: the input goes back; no other step withdraws, so elsewhere it is retried
    (S.REGISTERED, "withdrawn", S.RETURNING),
    (S.CHECKED, "withdrawn", S.CHECKED),
    (S.PUBLISHED, "withdrawn", S.PUBLISHED),
    (S.RECORDED, "withdrawn", S.RECORDED),
    # the source is gone: only a claim is cancelled, elsewhere it is retried
    (S.CLAIMING, "gone", S.CANCELLED),
    (S.CLAIMED, "gone", S.CLAIMED),
    (S.REGISTERED, "gone", S.REGISTERED),
    # the staged copy is lost or bad: stage again from the claimed input
    (S.REGISTERED, "restage", S.CLAIMED),
    (S.PUBLISHED, "restage", S.CLAIMED),
]


@pytest.mark.parametrize(("state", "kind", "expected"), TRANSITIONS)
def test_transition(state: State, kind: str, expected: State) -> None:
    """Each (state, outcome) pair leads to exactly one documented next state."""
    p = Progress(state)
    assert advance(p, STEP_OF[state], Outcome(kind, "some-code", "msg"), NOW).state is expected


def test_every_in_flight_state_has_a_step() -> None:
    """Every non-final state has a next step, so nothing can get stuck without one."""
    assert {s for s in State if next_step(Progress(s), NOW) is not None} == set(IN_FLIGHT)
    assert {next_step(Progress(s), NOW) for s in IN_FLIGHT} == set(Step)


def test_happy_path_reaches_done() -> None:
    """Running every step with success takes a new item from CLAIMING to DONE in 8 steps."""
    p, steps = Progress(S.CLAIMING), []
    while (step := next_step(p, NOW)) is not None:
        steps.append(step)
        p = advance(p, step, Outcome.ok(), NOW)
    assert p.state is S.DONE
    assert len(steps) == 8


def test_ok_clears_attempts_and_errors() -> None:
    """A success after failures starts the next step fresh: no attempts, no error, no wait."""
    p = Progress(S.CHECKED, attempts=4, not_before=NOW - 1, error_code="x", error_message="y")
    p2 = advance(p, Step.REGISTER, Outcome.ok(), NOW)
    assert (p2.state, p2.attempts, p2.not_before, p2.error_code, p2.error_message) == (
        S.REGISTERED,
        0,
        0.0,
        None,
        None,
    )


def test_permanent_before_registration_carries_the_code() -> None:
    """A rejection keeps the outcome's code and message for NAME.reason."""
    out = Outcome("permanent", "invalid-name", "'my rec' is not valid")
    p = advance(Progress(S.CLAIMING), Step.CLAIM, out, NOW)
    assert (p.state, p.error_code, p.error_message) == (
        S.REJECTING,
        "invalid-name",
        "'my rec' is not valid",
    )


def test_permanent_without_code_is_rejected_with_a_generic_code() -> None:
    """A permanent failure that names no code is still rejected with a non-empty code."""
    p = advance(Progress(S.STAGED), Step.LOOKUP, Outcome("permanent"), NOW)
    assert p.state is S.REJECTING
    assert p.error_code


@pytest.mark.parametrize("state", sorted(REGISTERED_OR_LATER - {S.DONE}))
def test_permanent_after_registration_backs_off(state: State) -> None:
    """Once registered, a permanent failure is retried with backoff, never rejected."""
    p = advance(Progress(state), STEP_OF[state], Outcome("permanent", "boom"), NOW)
    assert (p.state, p.attempts, p.error_code) == (state, 1, "boom")
    assert p.not_before > NOW
    assert next_step(p, NOW) is None


def test_transient_counts_attempts_and_waits() -> None:
    """A transient failure keeps the state, adds one attempt and sets a future not_before."""
    out = Outcome("transient", "registry-unavailable", "503")
    p1 = advance(Progress(S.CHECKED), Step.REGISTER, out, NOW)
    p2 = advance(p1, Step.REGISTER, out, p1.not_before)
    assert (p1.state, p1.attempts, p2.attempts) == (S.CHECKED, 1, 2)
    assert NOW < p1.not_before < p2.not_before
    assert (p2.error_code, p2.error_message) == ("registry-unavailable", "503")


def test_transient_backoff_starts_near_the_initial_delay() -> None:
    """The first retry waits between BACKOFF_INITIAL and BACKOFF_INITIAL + 1 s of jitter."""
    p = advance(Progress(S.CLAIMED), Step.STAGE, Outcome("transient"), NOW)
    assert NOW + BACKOFF_INITIAL <= p.not_before <= NOW + BACKOFF_INITIAL + 1


def test_transient_without_code_records_the_kind() -> None:
    """A failure with no code is reported under its kind."""
    p = advance(Progress(S.CLAIMED), Step.STAGE, Outcome("transient"), NOW)
    assert p.error_code == "transient"


def test_a_withdrawn_publish_goes_back_with_its_reason_no_longer_registered() -> None:
    """A publish that withdrew the record's location puts the input back with code
    'changed' and the message, no longer counted registered (nowhere deposited)."""
    p = Progress(S.REGISTERED, registered=True)
    p = advance(p, Step.PUBLISH, Outcome("withdrawn", "changed", "rewritten"), NOW)
    assert (p.state, p.error_code, p.error_message, p.registered) == (
        S.RETURNING, "changed", "rewritten", False,
    )  # fmt: skip


def test_changed_records_the_reason() -> None:
    """An input that changed goes back with error code 'changed' and the message."""
    p = advance(Progress(S.CLAIMED), Step.STAGE, Outcome("changed", "changed", "grew"), NOW)
    assert (p.state, p.error_code, p.error_message) == (S.RETURNING, "changed", "grew")


def test_gone_at_claim_is_cancelled_not_rejected() -> None:
    """A claim that finds its input gone (another daemon took it) ends CANCELLED."""
    p = advance(Progress(S.CLAIMING), Step.CLAIM, Outcome("gone", "gone"), NOW)
    assert p.state is S.CANCELLED
    assert p.state in FINAL


@pytest.mark.parametrize("code", ["gone", "unsupported", "reconfigured"])
def test_a_cancelled_claim_keeps_the_code_saying_why(code: str) -> None:
    """A claim cancelled because its input was taken, is no longer a plain input, or is
    to be decided again under a new configuration keeps that code (status, explain)."""
    p = advance(Progress(S.CLAIMING), Step.CLAIM, Outcome("gone", code, "why"), NOW)
    assert (p.state, p.error_code) == (S.CANCELLED, code)


def test_restage_returns_to_claimed_with_fresh_attempts() -> None:
    """A lost staged copy sends the item back to CLAIMED, ready to stage at once."""
    p = Progress(S.STAGED, attempts=3, not_before=NOW - 5)
    p2 = advance(p, Step.PUBLISH, Outcome("restage", "restage", "the staged copy is gone"), NOW)
    assert (p2.state, p2.attempts, p2.error_code) == (S.CLAIMED, 0, "restage")
    assert next_step(p2, NOW) is Step.STAGE


@pytest.mark.parametrize("state", [S.CLAIMED, S.STAGED, S.CHECKED, S.RETURNING, S.RECORDED])
def test_a_restage_from_a_step_without_a_copy_only_waits(state: State) -> None:
    """A restage outcome of a step that handles no staged or stored copy is no
    transition: the item keeps its state and waits (never sent to be copied again)."""
    p = advance(Progress(state), STEP_OF[state], Outcome("restage", "restage"), NOW)
    assert (p.state, p.attempts) == (state, 1) and p.not_before > NOW


@pytest.mark.parametrize("code", ["verify-failed", "staged-changed"])
def test_a_bad_read_back_copies_again_after_a_backoff(code: str) -> None:
    """A copy read back bad (or replaced in staging/) sends the item back to CLAIMED to
    wait, counted and shown."""
    p = Progress(S.PUBLISHED)
    p2 = advance(p, Step.VERIFY, Outcome("restage", code, "mismatch"), NOW)
    assert (p2.state, p2.attempts, p2.error_code) == (S.CLAIMED, 1, code)
    assert p2.not_before > NOW and next_step(p2, NOW) is None


def _copied_again(p: Progress) -> Progress:
    """``p`` (CLAIMED after a bad read-back) staged, checked, registered and published."""
    for step in (Step.STAGE, Step.LOOKUP, Step.REGISTER, Step.PUBLISH):
        p = advance(p, step, Outcome.ok(), NOW)
    return p


def test_bad_read_backs_in_a_row_wait_longer_each_time() -> None:
    """The count of bad read-backs survives the new copy's steps: the next one waits longer."""
    first = advance(Progress(S.PUBLISHED), Step.VERIFY, Outcome("restage", "verify-failed"), NOW)
    again = _copied_again(first)
    assert (again.state, again.attempts, again.error_code) == (S.PUBLISHED, 1, "verify-failed")
    second = advance(again, Step.VERIFY, Outcome("restage", "verify-failed"), NOW, random.Random(0))
    assert second.attempts == 2 and second.not_before - NOW >= 2 * BACKOFF_INITIAL


def test_a_matching_read_back_clears_the_count() -> None:
    """A read-back that matches at last ends the wait count and the error."""
    first = advance(Progress(S.PUBLISHED), Step.VERIFY, Outcome("restage", "verify-failed"), NOW)
    done = advance(_copied_again(first), Step.VERIFY, Outcome.ok(), NOW)
    assert (done.state, done.attempts, done.error_code) == (S.VERIFIED, 0, None)
    assert done.restages == 0


def test_the_count_of_bad_read_backs_outlives_another_error_in_between() -> None:
    """A failure of another kind between two bad read-backs (a registry outage) keeps
    their count: the second one waits as the second in a row."""
    first = advance(Progress(S.PUBLISHED), Step.VERIFY, Outcome("restage", "verify-failed"), NOW)
    p = advance(first, Step.STAGE, Outcome.ok(), NOW)
    p = advance(p, Step.LOOKUP, Outcome("transient", "registry-unavailable"), NOW)
    for step in (Step.LOOKUP, Step.REGISTER, Step.PUBLISH):
        p = advance(p, step, Outcome.ok(), NOW)
    assert (p.state, p.restages) == (S.PUBLISHED, 1)
    second = advance(p, Step.VERIFY, Outcome("restage", "verify-failed"), NOW, random.Random(0))
    assert (second.restages, second.attempts) == (2, 2)
    assert second.not_before - NOW >= 2 * BACKOFF_INITIAL


# -- registration must stick across a restage -------------------------------------------


def _registered_then_restaged() -> Progress:
    p = advance(Progress(S.CHECKED), Step.REGISTER, Outcome.ok(), NOW)
    p = advance(p, Step.PUBLISH, Outcome.ok(), NOW)
    return advance(p, Step.VERIFY, Outcome("restage", "verify-failed"), NOW)


def test_registered_item_is_not_rejected_after_a_restage() -> None:
    """A permanent failure while restaging a registered item backs off instead of rejecting."""
    p = _registered_then_restaged()
    p = advance(p, next_step(p, NOW) or Step.STAGE, Outcome("permanent", "x"), NOW)
    assert p.state not in (S.REJECTING, S.REJECTED)


def test_registered_item_is_not_returned_after_a_restage() -> None:
    """A registered item whose input changes while restaging is not put back in the inbox."""
    p = _registered_then_restaged()
    p = advance(p, next_step(p, NOW) or Step.STAGE, Outcome("changed", "changed"), NOW)
    assert p.state not in (S.RETURNING, S.RETURNED)


# -- next_step -----------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(FINAL))
def test_next_step_is_none_for_final_states(state: State) -> None:
    """Final states have no next step, at any time."""
    assert next_step(Progress(state), NOW) is None
    assert next_step(Progress(state), math.inf) is None


@pytest.mark.parametrize(
    ("not_before", "now", "expected"),
    [
        (NOW + 10, NOW, None),
        (NOW + 10, NOW + 9.999, None),
        (NOW + 10, NOW + 10, Step.REGISTER),
        (NOW + 10, NOW + 11, Step.REGISTER),
        (0.0, NOW, Step.REGISTER),
    ],
)
def test_next_step_waits_for_not_before(not_before: float, now: float, expected: object) -> None:
    """While backing off there is no step; from not_before on the state's step is due."""
    assert next_step(Progress(S.CHECKED, attempts=1, not_before=not_before), now) == expected


@pytest.mark.parametrize(
    ("state", "not_before", "expected"),
    [
        (S.CHECKED, NOW + 1, True),
        (S.CHECKED, NOW, False),
        (S.DONE, NOW + 1, False),
    ],
)
def test_is_waiting(state: State, not_before: float, expected: bool) -> None:
    """An in-flight item with a future not_before is waiting; a final one never is."""
    assert is_waiting(Progress(state, not_before=not_before), NOW) is expected


# -- backoff -------------------------------------------------------------------------


def test_backoff_delay_grows_with_attempts() -> None:
    """Each further consecutive failure waits longer, until the cap."""
    delays = [backoff_delay(n, random.Random(7)) for n in range(1, 12)]
    uncapped = [d for d in delays if d < BACKOFF_MAX]
    assert len(uncapped) >= 5
    assert uncapped == sorted(uncapped)
    assert len(set(uncapped)) == len(uncapped)


@pytest.mark.parametrize("attempts", [1, 2, 5, 8, 9, 10, 20, 100, 1075, 10_000])
def test_backoff_delay_is_capped(attempts: int) -> None:
    """No delay exceeds BACKOFF_MAX, however many attempts (with or without seeded jitter)."""
    assert 0 < backoff_delay(attempts) <= BACKOFF_MAX
    assert 0 < backoff_delay(attempts, random.Random(attempts)) <= BACKOFF_MAX


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 6])
def test_backoff_delay_is_exponential_with_bounded_jitter(attempts: int) -> None:
    """Attempt n waits 2**(n-1) * BACKOFF_INITIAL plus at most one second of jitter."""
    base = BACKOFF_INITIAL * 2 ** (attempts - 1)
    for _ in range(20):
        assert base <= backoff_delay(attempts) <= base + 1.0


def test_backoff_delay_reaches_the_cap() -> None:
    """After enough failures the delay is exactly BACKOFF_MAX."""
    assert backoff_delay(50) == BACKOFF_MAX
    assert backoff_delay(50, random.Random(1)) == BACKOFF_MAX


def test_backoff_delay_with_seeded_rng_is_deterministic() -> None:
    """The same seed gives the same delay (for reproducible tests)."""
    assert backoff_delay(3, random.Random(42)) == backoff_delay(3, random.Random(42))


@pytest.mark.parametrize("attempts", [0, -3])
def test_backoff_delay_treats_non_positive_attempts_as_the_first(attempts: int) -> None:
    """Zero or negative attempt counts wait like the first failure."""
    assert BACKOFF_INITIAL <= backoff_delay(attempts) <= BACKOFF_INITIAL + 1


# -- properties ----------------------------------------------------------------------

# "ok" weighted up so that runs get past registration often
KINDS = st.sampled_from(["ok"] * 4 + ["transient", "permanent", "changed", "gone", "restage"])


def _run(kinds: list[str]) -> list[Progress]:
    """Drives an item from CLAIMING with these outcomes; returns every progress seen."""
    p = Progress(S.CLAIMING)
    seen = [p]
    for kind in kinds:
        now = max(NOW, p.not_before)
        step = next_step(p, now)
        if step is None:
            break
        p = advance(p, step, Outcome(kind, "code"), now)
        seen.append(p)
    return seen


@given(st.lists(KINDS, max_size=60))
def test_property_final_states_are_final(kinds: list[str]) -> None:
    """Whatever happens, an item that reaches a final state has no further step, ever."""
    seen = _run(kinds)
    for i, p in enumerate(seen):
        if p.state in FINAL:
            assert i == len(seen) - 1
            assert next_step(p, math.inf) is None


@given(st.lists(KINDS, max_size=60))
@example(["ok"] * 4 + ["restage", "permanent"])
def test_property_registered_items_are_never_rejected(kinds: list[str]) -> None:
    """Once an item has been REGISTERED, no outcome sequence moves it to REJECTING/REJECTED."""
    registered = False
    for p in _run(kinds):
        assert not (registered and p.state in (S.REJECTING, S.REJECTED)), p
        registered = registered or p.state in REGISTERED_OR_LATER


@given(st.lists(st.one_of(KINDS, st.just("withdrawn")), max_size=60))
@example(["ok"] * 7 + ["changed", "ok"])
@example(["ok"] * 4 + ["withdrawn", "ok"])
def test_property_registered_items_go_back_only_once_recorded(kinds: list[str]) -> None:
    """A registered item is put back (RETURNING) only from RECORDED (its copy stored),
    or from REGISTERED when its publish withdrew it (placed by rename, the bytes
    registered are gone): before that a record may point at its input, or its copy is
    not stored yet, and nothing else puts it back."""
    seen = _run(kinds)
    registered = False
    for kind, (before, p) in zip(kinds, itertools.pairwise(seen), strict=False):
        registered = registered or before.state in REGISTERED_OR_LATER
        if registered and p.state is S.RETURNING and before.state is not S.RETURNING:
            withdrawn = kind == "withdrawn" and before.state is S.REGISTERED
            assert before.state is S.RECORDED or withdrawn, (before, kind, p)


@given(st.lists(KINDS, max_size=60))
def test_property_attempts_count_consecutive_failures(kinds: list[str]) -> None:
    """attempts never goes negative and a backing-off item always has a recorded error."""
    for p in _run(kinds):
        assert p.attempts >= 0
        if p.attempts:
            assert p.error_code and p.not_before > 0
