"""Exactly once, as a property of the pure life cycle under crashes and arbitrary outcomes.

``tests/deposit/test_lifecycle.py`` checks the state machine's own rules. This file
adds a small model of the *world* each step changes (where the input is, staged
copy, registry records, archive copies, receipts) and lets Hypothesis drive one item
through :func:`~nbankd.deposit.lifecycle.advance` with any sequence of step results,
including crashes just before or just after a step's effect (the journal then still
holds the previous state and the step is replayed, as after ``kill -9``), answers
lost after the effect happened, and another daemon taking the input first.

Properties: at every moment the input exists (inbox, work folder, rejected folder,
or archived with its record); there is never more than one record, archive copy or
receipt; and once the item is final it is in exactly one of: archived and registered
(source removed), rejected (no record, no copy), returned to the inbox (no copy; a
record only when its publish withdrew the deposit), or never taken (another daemon
has it).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from nbankd.deposit.lifecycle import FINAL, Outcome, Progress, State, Step, advance, next_step

# what happens when a step runs; "effect" events change the world before answering
EVENTS = (
    ["ok"] * 6
    + ["transient", "transient-after-effect", "permanent", "changed", "restage"]
    + ["crash-before", "crash-after", "stolen", "withdrawn"]
)
APPLIES_EFFECT = {"ok", "transient-after-effect", "crash-after"}


@dataclass
class World:
    where: str = "inbox"  # inbox | work | rejected | consumed (released) | elsewhere (stolen)
    staged: bool = False
    records: int = 0
    copies: int = 0
    receipts: int = 0
    withdrawn: bool = False  # a publish withdrew the deposit: the record stays, no copy

    def effect(self, step: Step) -> None:
        """The idempotent effect of ``step``, as nbankd.deposit.steps performs it."""
        if step is Step.CLAIM and self.where == "inbox":
            self.where = "work"
        elif step is Step.STAGE and self.where == "work":
            self.staged = True
        elif step is Step.REGISTER:
            self.records = max(self.records, 1)  # name taken by our own record: fine
        elif step is Step.PUBLISH:
            self.copies = max(self.copies, 1)  # link() never replaces
            self.staged = False
        elif step is Step.RECORD:
            self.receipts = max(self.receipts, 1)  # appended once per token
        elif step is Step.RELEASE and self.where == "work":
            self.where = "consumed"
        elif step is Step.REJECT and self.where == "work":
            self.where = "rejected"
        elif step is Step.PUT_BACK and self.where == "work":
            self.where = "inbox"

    def outcome(self, step: Step, event: str) -> str:
        """The answer a step gives for ``event``, corrected to what the step can say."""
        if step is Step.CLAIM and self.where == "elsewhere":
            return "gone"  # another daemon renamed it first
        if step is Step.PUBLISH and not self.staged and not self.copies:
            return "restage"  # the staged copy is gone: stage again
        if step is Step.REGISTER and self.records and event == "permanent":
            # a replay after a crash: "name taken" by our own record (same sha1) is success;
            # the crash-point suite checks the real step does exactly this
            return "ok"
        if event == "changed" and step is not Step.STAGE:
            return "transient"
        if event == "restage" and step not in (Step.PUBLISH, Step.VERIFY):
            return "transient"
        if event == "transient-after-effect":
            return "transient"
        if event == "withdrawn":
            # only a publish in place finding its input changed withdraws, and not once
            # its input is stored (the real step then answers a transient "changed")
            if step is not Step.PUBLISH or self.copies:
                return "transient"
            self.withdrawn = True
        return event

    def input_exists(self) -> bool:
        return self.where in ("inbox", "work", "rejected", "elsewhere") or (
            self.where == "consumed" and self.records == 1 and self.copies == 1
        )


def drive(events: list[str]) -> tuple[Progress, World]:
    """Runs one item through ``events``, then through plain successes until it is final."""
    p, world, now = Progress(State.CLAIMING), World(), 0.0
    script = iter(events)
    for _ in range(len(events) + 100):
        now = max(now + 1.0, p.not_before)
        step = next_step(p, now)
        if step is None:
            break
        event = next(script, "ok")
        if event == "stolen":
            if world.where == "inbox":
                world.where = "elsewhere"
            event = "ok"
        # a claim renames first and then decides (an invalid name is permanent after it)
        claimed_then_refused = step is Step.CLAIM and event == "permanent"
        if event in APPLIES_EFFECT or claimed_then_refused:
            world.effect(step)
        if event == "restage" and step is Step.VERIFY:
            world.copies = 0  # a copy that failed verification is removed, then re-staged
        if event.startswith("crash"):
            continue  # killed: the journal still holds p, the step runs again
        p = advance(p, step, Outcome(world.outcome(step, event), "code"), now)
        assert world.input_exists(), (p, world)
        assert world.records <= 1 and world.copies <= 1 and world.receipts <= 1, world
        assert not (world.where == "rejected" and world.records), "rejected, yet registered"
    return p, world


@given(st.lists(st.sampled_from(EVENTS), max_size=80))
def test_every_input_ends_exactly_once(events: list[str]) -> None:
    """Whatever the steps answer and wherever the daemon crashes, the input ends exactly once."""
    p, world = drive(events)
    assert p.state in FINAL, p
    if p.state is State.DONE:
        assert (world.where, world.records, world.copies, world.receipts) == ("consumed", 1, 1, 1)
    elif p.state is State.REJECTED:
        assert (world.where, world.records, world.copies) == ("rejected", 0, 0)
    elif p.state is State.RETURNED:  # back in the inbox (where another daemon may take it)
        assert world.where in ("inbox", "elsewhere") and world.copies == 0
        assert world.records == 0 or world.withdrawn  # a withdrawn deposit's record stays
    else:  # CANCELLED: another daemon took it before our claim
        assert (world.where, world.records, world.copies) == ("elsewhere", 0, 0)
