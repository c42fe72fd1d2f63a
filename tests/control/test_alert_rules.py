"""What is told and when (nbankd.control.alert_rules): pure rules over status documents."""

from __future__ import annotations

from typing import Any

from nbankd.control.alert_rules import Condition, State, conditions, step, unsent

INBOX = "/srv/inbox/rig3"


def _status(**inbox: Any) -> dict[str, Any]:
    return {"registry": {"problem": None}, "inboxes": [{"path": INBOX, **inbox}]}


def _keys(found: list[Condition]) -> list[str]:
    return [c.key for c in found]


def test_a_healthy_daemon_has_nothing_to_tell() -> None:
    """No problem in the status, no condition."""
    assert conditions(_status(), {}, {}, now=100, started=0, unavailable_after=600) == []


def test_each_kind_of_problem_becomes_a_condition() -> None:
    """Registry, archive, rejected folder, stalled files, a failed audit: one each."""
    status = _status(archive_problem="not mounted", in_rejected_folder=500, stalled=["slow.wav"])
    status["registry"]["problem"] = "connection refused"
    status["last_audit"] = {"ok": False, "problems": ["1 hash mismatch"], "report": "/r.json"}
    found = conditions(status, {}, {}, now=100, started=0, unavailable_after=600)
    assert _keys(found) == ["registry", f"archive:{INBOX}", f"rejected:{INBOX}",
                            f"stalled:{INBOX}", "audit"]  # fmt: skip
    assert "500 rejected input(s)" in found[2].summary  # a burst is one problem
    assert found[0].delay == found[1].delay == 600 and found[2].delay == 0
    assert "nbankctl explain" in found[2].command


def test_a_silent_inbox_is_told_after_expect_every() -> None:
    """An inbox with expect_every and no deposit for longer is a condition; not before."""
    expect = {INBOX: 3600.0}
    late = conditions(_status(), {INBOX: 1000.0}, expect, now=5000, started=0, unavailable_after=1)
    soon = conditions(_status(), {INBOX: 2000.0}, expect, now=5000, started=0, unavailable_after=1)
    assert _keys(late) == [f"silent:{INBOX}"] and soon == []


def test_an_outage_is_told_only_once_it_lasts() -> None:
    """A registry outage shorter than unavailable_after is never told."""
    outage = [Condition("registry", "down", "nbankctl status", delay=600)]
    state, first = step(State(), outage, now=0, repeat_every=3600)
    state, early = step(state, outage, now=599, repeat_every=3600)
    state, due = step(state, outage, now=600, repeat_every=3600)
    assert first is None and early is None
    assert due is not None and [p.summary for p in due.problems] == ["down"]


def test_a_lasting_problem_is_repeated_at_most_every_repeat_every() -> None:
    """Told at once, not again within repeat_every, again after it."""
    problem = [Condition("rejected:x", "3 rejected", "nbankctl explain")]
    state, first = step(State(), problem, now=0, repeat_every=100)
    state, quiet = step(state, problem, now=50, repeat_every=100)
    state, again = step(state, problem, now=100, repeat_every=100)
    assert first is not None and quiet is None and again is not None


def test_problems_due_together_are_one_message() -> None:
    """Several problems found at one check go into a single message."""
    present = [Condition("a", "first", "c"), Condition("b", "second", "c")]
    _state, message = step(State(), present, now=0, repeat_every=100)
    assert message is not None and [p.summary for p in message.problems] == ["first", "second"]


def test_a_told_problem_that_goes_is_resolved_once() -> None:
    """A problem told and then gone is followed by one resolved line, then silence."""
    state, _ = step(State(), [Condition("a", "archive down", "c")], now=0, repeat_every=100)
    state, message = step(state, [], now=10, repeat_every=100)
    state, after = step(state, [], now=20, repeat_every=100)
    assert message is not None and [r.summary for r in message.resolved] == ["archive down"]
    assert not message.problems and after is None


def test_a_problem_gone_before_it_was_told_is_never_resolved() -> None:
    """An outage that ends before its delay sends nothing at all."""
    state, _ = step(State(), [Condition("r", "down", "c", delay=600)], now=0, repeat_every=100)
    _state, message = step(state, [], now=10, repeat_every=100)
    assert message is None


def test_an_unsent_message_is_tried_again() -> None:
    """A message that failed to send leaves its problems untold and its resolutions
    pending, so the next check sends them again."""
    old, _ = step(State(), [Condition("a", "gone soon", "c")], now=0, repeat_every=1000)
    new, message = step(old, [Condition("b", "new one", "c")], now=10, repeat_every=1000)
    assert message is not None
    kept = unsent(new, old, message)
    _state, retry = step(kept, [Condition("b", "new one", "c")], now=20, repeat_every=1000)
    assert retry is not None
    assert [p.summary for p in retry.problems] == ["new one"]
    assert [r.summary for r in retry.resolved] == ["gone soon"]


def test_problems_of_one_moment_wait_for_each_other() -> None:
    """With group_wait, a second problem appearing soon after the first joins it in one
    message, sent once the first has waited group_wait."""
    first = [Condition("a", "first", "c")]
    both = [*first, Condition("b", "second", "c")]
    state, m0 = step(State(), first, now=0, repeat_every=1000, group_wait=60)
    state, m1 = step(state, both, now=30, repeat_every=1000, group_wait=60)
    state, m2 = step(state, both, now=60, repeat_every=1000, group_wait=60)
    state, m3 = step(state, both, now=90, repeat_every=1000, group_wait=60)
    assert m0 is None and m1 is None
    assert m2 is not None and [p.summary for p in m2.problems] == ["first"]
    assert m3 is not None and [p.summary for p in m3.problems] == ["second"]
