"""The deposit life cycle as a pure state machine.

An *item* is one input (a file, or a folder resource) on its way from an inbox
to the archive or the rejected folder. Its state is persisted in the journal
after every step; a step is only started once the state it relies on is
durable, and every step is idempotent, so after a crash the daemon simply asks
:func:`next_step` again.

::

    CLAIMING --claim--> CLAIMED --stage--> STAGED --lookup--> CHECKED --register-->
    REGISTERED --publish--> PUBLISHED --verify--> VERIFIED --record--> RECORDED
    --release--> DONE

    any step --permanent failure--> REJECTING --reject--> REJECTED
    stage/release --input changed--> RETURNING --put_back--> RETURNED
    publish (placed by rename) --input changed after registering (withdrawn)--> RETURNING
    publish/verify --staged copy lost or bad--> CLAIMED (stage again)
    lookup/register --automatic identifier taken--> STAGED (new identifier, look up again)
    lookup/register --another input's record for these bytes--> STAGED after a backoff
    lookup/publish --same bytes stored under another name--> REJECTING (even if registered)
    CLAIMING --claim finds the source gone--> CANCELLED
    CLAIMING/CLAIMED/STAGED, nothing registered --archive no longer configured--> RETURNING
        (decided again: the input goes back to its inbox, or stays there if never taken)

Nothing here does I/O or reads the clock: time is an argument, outcomes are
values. The thin shell that executes steps is :mod:`nbankd.deposit.steps`.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace

from tenacity import RetryCallState, wait_exponential_jitter


class State(enum.StrEnum):
    CLAIMING = "claiming"  # intent journaled; the rename into .nbank/ may or may not have run
    CLAIMED = "claimed"  # the input is in <inbox>/.nbank/<token>; identity recorded
    STAGED = "staged"  # bytes durable in staging/ (or hashed in place); sha1 known
    CHECKED = "checked"  # no other resource has this sha1; target name free
    REGISTERED = "registered"  # the registry has the record
    PUBLISHED = "published"  # linked into resources/, folder fsynced
    VERIFIED = "verified"  # re-read from storage and matched sha1 (or verify: false)
    RECORDED = "recorded"  # receipt durable
    DONE = "done"  # source, sidecar and marker removed
    REJECTING = "rejecting"  # decided to reject; moving to rejected_dir
    REJECTED = "rejected"  # in rejected_dir next to NAME.reason
    RETURNING = "returning"  # changed while claimed; putting it back in the inbox
    RETURNED = "returned"  # back in the inbox (or never taken from it), will be seen again
    CANCELLED = "cancelled"  # the claim found nothing to take (another daemon won)


FINAL = frozenset({State.DONE, State.REJECTED, State.RETURNED, State.CANCELLED})

#: States whose next step moves or removes the input (claim; publish, which moves it
#: with ``placement: rename``; release; reject; put back), and REGISTERED, after which
#: a record may point at the input (so it is never rejected): the journal holds them
#: on disk before the next step runs. Every other transition is committed without
#: waiting for the disk (it is on disk with the next durable commit): after a power
#: loss the journal may be a few steps behind the archive, and recovery repeats those
#: idempotent steps from where the input still is, as after a crash between a step
#: and its save.
DURABLE = frozenset(
    {State.CLAIMING, State.REGISTERED, State.RECORDED, State.REJECTING, State.RETURNING}
)
IN_FLIGHT = frozenset(State) - FINAL

#: States in which nothing of the input is registered or published, and nothing is
#: under way that could be (CHECKED is not one: its registration may have been sent,
#: the answer lost): the input is in its inbox or its work folder, a copy of it at most
#: in the archive's staging/ (safe to delete). An item here whose archive leaves the
#: configuration is decided again (:func:`undecided`); an item past it finishes in the
#: archive journaled for it, or waits for it.
UNDECIDED = frozenset({State.CLAIMING, State.CLAIMED, State.STAGED})


class Step(enum.StrEnum):
    CLAIM = "claim"
    STAGE = "stage"
    LOOKUP = "lookup"
    REGISTER = "register"
    PUBLISH = "publish"
    VERIFY = "verify"
    RECORD = "record"
    RELEASE = "release"
    REJECT = "reject"
    PUT_BACK = "put_back"


_NEXT_STEP: dict[State, Step] = {
    State.CLAIMING: Step.CLAIM,
    State.CLAIMED: Step.STAGE,
    State.STAGED: Step.LOOKUP,
    State.CHECKED: Step.REGISTER,
    State.REGISTERED: Step.PUBLISH,
    State.PUBLISHED: Step.VERIFY,
    State.VERIFIED: Step.RECORD,
    State.RECORDED: Step.RELEASE,
    State.REJECTING: Step.REJECT,
    State.RETURNING: Step.PUT_BACK,
}

_AFTER: dict[Step, State] = {
    Step.CLAIM: State.CLAIMED,
    Step.STAGE: State.STAGED,
    Step.LOOKUP: State.CHECKED,
    Step.REGISTER: State.REGISTERED,
    Step.PUBLISH: State.PUBLISHED,
    Step.VERIFY: State.VERIFIED,
    Step.RECORD: State.RECORDED,
    Step.RELEASE: State.DONE,
    Step.REJECT: State.REJECTED,
    Step.PUT_BACK: State.RETURNED,
}

# Steps after which the registry may hold our record: a permanent failure from
# here on must not move the input to rejected/ while a record points at it.
_REGISTERED_OR_LATER = frozenset(
    {State.REGISTERED, State.PUBLISHED, State.VERIFIED, State.RECORDED}
)

#: the error code of a copy read back from storage that did not match its SHA-1
READ_BACK_FAILED = "verify-failed"
#: restages that may repeat without end (a failing disk; another writer of the
#: group-writable staging/ replacing each staged copy): each waits, longer in a row
REPEATING_RESTAGES = frozenset({READ_BACK_FAILED, "staged-changed"})

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 300.0


@dataclass(frozen=True)
class Progress:
    """The scheduling part of an item: where it is and when to try next."""

    state: State
    attempts: int = 0  # consecutive failures of the current step
    not_before: float = 0.0  # monotonic-free wall time; 0 = now
    error_code: str | None = None
    error_message: str | None = None
    registered: bool = False  # the registry may hold our record (sticky across restage)
    #: copies read back wrong (or staged copies replaced) in a row, counted until a copy
    #: is verified: the wait before the next copy grows with it, whatever other errors
    #: (a registry outage, say) came in between
    restages: int = 0


class Kind(enum.StrEnum):
    """What a step's outcome means for the item (see :func:`advance`)."""

    OK = "ok"  # the step is done: on to the next state
    TRANSIENT = "transient"  # an outage or a problem an administrator fixes: retry later
    PERMANENT = "permanent"  # the input is wrong: rejected (unless registered)
    CHANGED = "changed"  # the input changed while claimed: put back
    GONE = "gone"  # nothing to claim (taken by another process, removed, replaced)
    RESTAGE = "restage"  # the staged copy is lost or bad: copy again
    RENAMED = "renamed"  # a taken automatic identifier was replaced: look up again
    RECHECK = "recheck"  # another input holds these bytes' record: look up again later
    SUPERSEDED = "superseded"  # a stored copy of the same bytes serves the record: reject
    #: placed by rename, the input changed after registering: the bytes registered are
    #: gone, the deposit is withdrawn and the input put back (the record left as it is)
    WITHDRAWN = "withdrawn"
    #: the archive journaled for an undecided input is no longer configured: the input
    #: goes back to its inbox to be decided again under the configuration in use
    REDECIDE = "redecide"


@dataclass(frozen=True)
class Outcome:
    """The result of running a step, as a value. ``kind`` is a :class:`Kind` (a
    string naming one is converted; any other string raises ValueError)."""

    kind: Kind
    code: str = ""
    message: str = ""
    hint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))

    @classmethod
    def ok(cls) -> Outcome:
        return cls(Kind.OK)


def undecided(p: Progress) -> bool:
    """True when nothing of the item is registered, published or on its way to the
    registry (:data:`UNDECIDED`, and never registered before a restage): sending its
    input back to be decided again can never make a second record or copy."""
    return p.state in UNDECIDED and not p.registered


def next_step(p: Progress, now: float) -> Step | None:
    """The step to run now, or None if the item is final or backing off."""
    if p.state in FINAL or p.not_before > now:
        return None
    return _NEXT_STEP[p.state]


def backoff_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter for the ``attempts``-th consecutive failure."""
    wait = wait_exponential_jitter(initial=BACKOFF_INITIAL, max=BACKOFF_MAX, jitter=1.0)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempts)
    if rng is not None:  # deterministic jitter for tests
        return min(
            BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** min(state.attempt_number - 1, 30) + rng.random()
        )
    return wait(state)


def advance(
    p: Progress, step: Step, outcome: Outcome, now: float, rng: random.Random | None = None
) -> Progress:
    """The item's progress after ``step`` ended with ``outcome`` at time ``now``;
    ``rng`` draws the backoff's jitter (None: the process's own randomness)."""
    registered = p.registered or p.state in _REGISTERED_OR_LATER
    if outcome.kind == "ok":
        after = _AFTER[step]
        registered = registered or after in _REGISTERED_OR_LATER
        if p.error_code in REPEATING_RESTAGES and step is not Step.VERIFY:
            # copying again after a bad read-back (or a replaced staged copy): the
            # failures stay counted (and shown) until the copy is verified or published,
            # so that the next one waits longer
            return replace(p, state=after, not_before=0.0, registered=registered)
        restages = 0 if step is Step.VERIFY else p.restages
        return Progress(state=after, registered=registered, restages=restages)
    if outcome.kind == "restage" and step not in (Step.PUBLISH, Step.VERIFY):
        # only publishing and verifying look at a staged or stored copy: a restage from
        # any other step is no transition (after a withdrawal, say, it would send an
        # input being put back to be deposited again); it waits like a failure
        return _retry(p, outcome, now, rng)
    if outcome.kind == "restage" and outcome.code in REPEATING_RESTAGES:
        # a copy read back from storage did not match (or the staged copy was replaced):
        # copy again from the claimed input, after a backoff that grows with each one
        # in a row (a failing disk, or another writer of staging/, never makes a worker
        # copy hot, unseen, for ever), counted apart from the other errors in between
        again = Progress(
            State.CLAIMED, attempts=p.restages, registered=registered, restages=p.restages + 1
        )
        return _retry(again, outcome, now, rng)
    if outcome.kind == "restage":
        # the staged copy vanished before it was published (staging/ is safe to
        # clean): copy again from the claimed input, which is still in the inbox
        return Progress(
            State.CLAIMED,
            error_code="restage",
            error_message=outcome.message,
            registered=registered,
            restages=p.restages,
        )
    if outcome.kind == "renamed":
        # an automatic identifier found taken before registering: the step journals a
        # new one and the lookup runs again for it
        if registered or step not in (Step.LOOKUP, Step.REGISTER):
            return _retry(p, outcome, now, rng)
        return Progress(State.STAGED, error_code=outcome.code, error_message=outcome.message)
    if outcome.kind == "recheck":
        # another input is depositing these bytes under this identifier: look up again
        # after a backoff, when it is stored
        if registered or step not in (Step.LOOKUP, Step.REGISTER):
            return _retry(p, outcome, now, rng)
        return _retry(replace(p, state=State.STAGED), outcome, now, rng)
    if outcome.kind == "superseded":
        # the identifier's record is served by a stored copy of the same bytes under
        # another name (read back and compared): this input is a duplicate even if the
        # registry answered that the record was ours
        return Progress(
            State.REJECTING, error_code=outcome.code or "duplicate", error_message=outcome.message
        )
    if outcome.kind == "gone":
        # only claiming may find its input gone: someone else took or removed it
        if step is Step.CLAIM:
            # its code says why (gone, unsupported, reconfigured: decided again)
            return Progress(
                State.CANCELLED, error_code=outcome.code or "gone", error_message=outcome.message
            )
        return _retry(p, outcome, now, rng)
    if outcome.kind == "changed":
        # once recorded, the archive's copy is independent of the input: a release that
        # finds it changed puts it back rather than removing it
        if not registered or step is Step.RELEASE:
            return Progress(
                State.RETURNING,
                error_code=outcome.code or "changed",
                error_message=outcome.message,
                registered=registered,  # recorded: its stored copy is registered
            )
        return _retry(p, outcome, now, rng)
    if outcome.kind == "withdrawn":
        # only publishing in place withdraws: the bytes registered are gone with the
        # change, and the input, never copied, is the only version left
        if step is Step.PUBLISH:
            # no longer counted registered: this input is nowhere deposited (the record,
            # left as it is, names bytes it no longer holds)
            return Progress(
                State.RETURNING, error_code=outcome.code or "changed", error_message=outcome.message
            )
        return _retry(p, outcome, now, rng)
    if outcome.kind == "redecide":
        # its archive left the configuration before anything was registered: the input
        # goes back where it was (the put-back moves nothing if the claim never took it)
        # and the next scan decides it again; from any other state it only waits
        if not undecided(p):
            return _retry(p, outcome, now, rng)
        return Progress(
            State.RETURNING,
            error_code=outcome.code or "archive-changed",
            error_message=outcome.message,
        )
    if outcome.kind == "permanent":
        if step in (Step.REJECT, Step.PUT_BACK, Step.RELEASE, Step.RECORD):
            # these only move bytes we already own; keep retrying and report it
            return _retry(p, outcome, now, rng)
        if registered:
            return _retry(p, outcome, now, rng)
        return Progress(
            State.REJECTING, error_code=outcome.code or "rejected", error_message=outcome.message
        )
    return _retry(p, outcome, now, rng)


def _retry(p: Progress, outcome: Outcome, now: float, rng: random.Random | None) -> Progress:
    attempts = p.attempts + 1
    return replace(
        p,
        attempts=attempts,
        not_before=now + backoff_delay(attempts, rng),
        error_code=outcome.code or outcome.kind,
        error_message=outcome.message,
    )


def is_waiting(p: Progress, now: float) -> bool:
    return p.state not in FINAL and p.not_before > now
