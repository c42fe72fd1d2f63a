"""What is told and when (nbankd.control.alert_rules): pure rules over status documents."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nbankd.audit.model import ArchiveResult, AuditReport, Finding
from nbankd.control.alert_rules import (
    ALERTS_LISTED,
    LISTED,
    Condition,
    State,
    audit_held,
    conditions,
    rejected_held,
    step,
    unsent,
)
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State as ItemState

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
                            f"stalled:{INBOX}/slow.wav", "audit"]  # fmt: skip
    assert "500 rejected input(s)" in found[2].summary  # without the list: one for the count
    assert found[0].delay == found[1].delay == 600 and found[2].delay == 0
    assert "nbankctl explain" in found[2].command
    assert found[3].path == f"{INBOX}/slow.wav"


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
    """A message that failed to send is sent again, problems and resolutions, at the next check."""
    old, _ = step(State(), [Condition("a", "gone soon", "c")], now=0, repeat_every=1000)
    new, message = step(old, [Condition("b", "new one", "c")], now=10, repeat_every=1000)
    assert message is not None
    kept = unsent(new, old, message)
    _state, retry = step(kept, [Condition("b", "new one", "c")], now=20, repeat_every=1000)
    assert retry is not None
    assert [p.summary for p in retry.problems] == ["new one"]
    assert [r.summary for r in retry.resolved] == ["gone soon"]


def test_problems_of_one_moment_wait_for_each_other() -> None:
    """A problem appearing within group_wait of the first joins it in one message."""
    first = [Condition("a", "first", "c")]
    both = [*first, Condition("b", "second", "c")]
    state, m0 = step(State(), first, now=0, repeat_every=1000, group_wait=60)
    state, m1 = step(state, both, now=30, repeat_every=1000, group_wait=60)
    state, m2 = step(state, both, now=60, repeat_every=1000, group_wait=60)
    state, m3 = step(state, both, now=90, repeat_every=1000, group_wait=60)
    assert m0 is None and m1 is None
    assert m2 is not None and [p.summary for p in m2.problems] == ["first", "second"]
    assert m3 is None


def _rejections(inbox: str, n: int) -> list[Condition]:
    return [
        Condition(f"rejected:{inbox}/rejected/{i}.wav", f"{inbox} {i}", "c", kind="rejected",
                  inbox=inbox, path=f"{inbox}/rejected/{i}.wav")
        for i in range(n)
    ]  # fmt: skip


def test_a_burst_across_inboxes_is_one_message() -> None:
    """500 rejections over several checks in two inboxes within group_wait: one message."""
    burst = _rejections("/srv/a", 300) + _rejections("/srv/b", 200)
    state, sent = State(), []
    for now, upto in ((0, 1), (20, 150), (40, 420), (59, 500), (60, 500), (90, 500)):
        state, message = step(state, burst[:upto], now=now, repeat_every=1e6, group_wait=60)
        sent += [(now, message)] if message is not None else []
    [(when, message)] = sent
    assert when == 60 and len(message.problems) == 500
    assert message.headline() == "300 rejected input(s) in /srv/a; 200 rejected input(s) in /srv/b"
    text = message.text()
    assert text.count("\n- /srv/a ") == LISTED and "... and 280 more" in text
    body = message.to_json("rig3", 60.0)
    assert body["kind"] == "rejected" and body["inbox"] is None and body["path"] is None
    assert body["firing"] == 500 and len(body["alerts"]) == ALERTS_LISTED
    assert body["not_listed"] == 400


def test_a_problem_after_the_window_waits_its_own() -> None:
    """A problem after the first message waits its own group_wait, not repeat_every."""
    a, b = Condition("a", "first", "c"), Condition("b", "later", "c")
    state, _ = step(State(), [a], now=0, repeat_every=1e6, group_wait=60)
    state, first = step(state, [a], now=60, repeat_every=1e6, group_wait=60)
    state, early = step(state, [a, b], now=70, repeat_every=1e6, group_wait=60)
    state, late = step(state, [a, b], now=130, repeat_every=1e6, group_wait=60)
    assert first is not None and [p.summary for p in first.problems] == ["first"]
    assert early is None
    assert late is not None and [p.summary for p in late.problems] == ["later"]


def test_resolutions_are_grouped_too() -> None:
    """Problems going over several checks within group_wait are resolved in one message."""
    three = _rejections(INBOX, 3)
    state, _ = step(State(), three, now=0, repeat_every=1e6)
    state, m1 = step(state, three[1:], now=10, repeat_every=1e6, group_wait=60)
    state, m2 = step(state, three[2:], now=40, repeat_every=1e6, group_wait=60)
    state, m3 = step(state, [], now=70, repeat_every=1e6, group_wait=60)
    assert m1 is None and m2 is None
    assert m3 is not None and not m3.problems and len(m3.resolved) == 3
    assert m3.headline() == f"resolved: 3 rejected input(s) in {INBOX}"


def test_a_flapping_problem_is_neither_resolved_nor_told_again() -> None:
    """A told problem gone and back before its resolution was sent sends nothing."""
    mount = [Condition("archive:x", "not mounted", "c")]
    state, _ = step(State(), mount, now=0, repeat_every=1e6, group_wait=60)
    state, told = step(state, mount, now=60, repeat_every=1e6, group_wait=60)
    state, gone = step(state, [], now=70, repeat_every=1e6, group_wait=60)
    state, back = step(state, mount, now=80, repeat_every=1e6, group_wait=60)
    state, later = step(state, mount, now=200, repeat_every=1e6, group_wait=60)
    assert told is not None and gone is None and back is None and later is None


def test_a_retry_survives_a_changed_summary() -> None:
    """A failed send is retried even when the problem's summary changed meanwhile."""
    old, _ = step(State(), [], now=0, repeat_every=1000)
    new, message = step(old, [Condition("k", "3 waiting", "c")], now=10, repeat_every=1000)
    assert message is not None
    kept = unsent(new, old, message)
    _state, retry = step(kept, [Condition("k", "4 waiting", "c")], now=20, repeat_every=1000)
    assert retry is not None and [p.summary for p in retry.problems] == ["4 waiting"]


def test_a_failed_repeat_is_tried_again() -> None:
    """A repeat that could not be sent is due again at the next check."""
    state, _ = step(State(), [Condition("k", "down", "c")], now=0, repeat_every=100)
    new, repeat = step(state, [Condition("k", "down", "c")], now=100, repeat_every=100)
    assert repeat is not None
    kept = unsent(new, state, repeat)
    _state, again = step(kept, [Condition("k", "still down", "c")], now=110, repeat_every=100)
    assert again is not None and [p.summary for p in again.problems] == ["still down"]


def test_each_rejected_input_is_its_own_problem() -> None:
    """Each rejected input is told on its own; requeueing one resolves it alone."""
    folder = f"{INBOX}/rejected"
    listed = {INBOX: [f"{folder}/a.wav", f"{folder}/b.wav"]}
    found = conditions(_status(in_rejected_folder=2), {}, {}, now=0, started=0,
                       unavailable_after=1, rejected=listed)  # fmt: skip
    assert _keys(found) == [f"rejected:{folder}/a.wav", f"rejected:{folder}/b.wav"]
    assert found[0].path == f"{folder}/a.wav" and found[0].command.startswith(
        f"nbankctl explain {folder}/a.wav"
    )
    state, first = step(State(), found[:1], now=0, repeat_every=1e6)
    state, second = step(state, found, now=10, repeat_every=1e6)
    state, requeued = step(state, found[1:], now=20, repeat_every=1e6)
    assert first is not None and second is not None
    assert [p.path for p in second.problems] == [f"{folder}/b.wav"]
    assert requeued is not None and not requeued.problems
    assert [r.path for r in requeued.resolved] == [f"{folder}/a.wav"]


def test_a_rejected_name_with_control_characters_is_shown_escaped() -> None:
    """A rejected input named with a newline and an escape is told through printable
    (one line, no terminal command) and quoted in the command to paste; its key and
    path keep the name."""
    path = f"{INBOX}/rejected/a\n- resolved: all\x1b[2J.wav"
    found = conditions(_status(in_rejected_folder=1), {}, {}, now=0, started=0,
                       unavailable_after=1, rejected={INBOX: [path]})  # fmt: skip
    assert found[0].summary.startswith(f"{INBOX}/rejected/a\\x0a- resolved: all\\x1b[2J.wav ")
    assert found[0].command.startswith(f"nbankctl explain $'{INBOX}/rejected/a\\x0a")
    assert (found[0].key, found[0].path) == (f"rejected:{path}", path)


def test_rejected_inputs_of_a_folder_not_listed_now_are_kept() -> None:
    """Rejected inputs told before, of an inbox whose rejected folders could not be
    listed at this check (out of descriptors), are kept: neither resolved nor told."""
    folder = f"{INBOX}/rejected"
    listed = conditions(_status(), {}, {}, now=0, started=0, unavailable_after=1,
                        rejected={INBOX: [f"{folder}/a.wav"]})  # fmt: skip
    unlisted = conditions(_status(), {}, {}, now=0, started=0, unavailable_after=1,
                          rejected={INBOX: []})  # fmt: skip
    assert rejected_held([INBOX]) == [f"rejected:{INBOX}/"]
    state, told = step(State(), listed, now=0, repeat_every=1e6)
    state, message = step(state, unlisted, now=10, repeat_every=1e6, hold=rejected_held([INBOX]))
    assert told is not None and message is None
    assert list(state.tracked) == [f"rejected:{folder}/a.wav"] and not state.gone


def _item(**fields: Any) -> Item:
    base = Item(
        id=1, token="tok1", inbox=INBOX, relpath=b"take.wav", kind="file", state=ItemState.CHECKED,
        archive="birdsong", archive_path="/a", placement="copy", verify=True,
        created=0.0, updated=0.0,
    )  # fmt: skip
    return replace(base, **fields)


def test_an_input_retried_after_other_errors_is_stuck() -> None:
    """An input retried after a non-outage error is 'stuck', told after unavailable_after."""
    items = [
        _item(attempts=3, error_code="os-error", error_message="disk quota exceeded"),
        _item(id=3, token="tok3"),
        _item(id=4, token="tok4", state=ItemState.DONE, attempts=1, error_code="os-error"),
    ]
    found = conditions(_status(), {}, {}, now=0, started=0, unavailable_after=600,
                       unfinished=items)  # fmt: skip
    [stuck] = found
    assert stuck.key == "stuck:tok1" and stuck.kind == "stuck" and stuck.delay == 600
    assert stuck.path == f"{INBOX}/take.wav" and "disk quota exceeded" in stuck.summary
    assert stuck.command == f"nbankctl explain {INBOX}/take.wav"
    state, early = step(State(), found, now=0, repeat_every=1e6)
    state, told = step(state, found, now=600, repeat_every=1e6)
    state, moved_on = step(state, [], now=700, repeat_every=1e6)
    assert early is None and told is not None
    assert moved_on is not None and [r.key for r in moved_on.resolved] == ["stuck:tok1"]


@pytest.mark.parametrize(
    ("registry_problem", "expected"),
    [("connection refused", ["registry"]), (None, ["stuck:tok2"])],
    ids=["told-by-the-registry", "registry-answers-others"],
)
def test_an_input_waiting_on_the_registry_is_told_once(
    registry_problem: str | None, expected: list[str]
) -> None:
    """An input waiting after registry-unavailable is told by the registry's condition
    while there is one, else (the registry answering the other deposits) as stuck."""
    items = [_item(id=2, token="tok2", attempts=2, error_code="registry-unavailable")]
    status = _status()
    status["registry"] = {"problem": registry_problem}
    found = conditions(status, {}, {}, now=0, started=0, unavailable_after=600,
                       unfinished=items)  # fmt: skip
    assert [c.key for c in found] == expected


@pytest.mark.parametrize(
    ("archive_problem", "expected"),
    [("not mounted", ["archive:" + INBOX]), (None, ["stuck:tok1"])],
    ids=["told-by-the-archive", "archive-looks-fine"],
)
def test_an_input_waiting_on_its_archive_is_told_once(
    archive_problem: str | None, expected: list[str]
) -> None:
    """An input waiting after archive-unavailable is told by its archive's condition when
    there is one, else (a full archive the archive's check does not see) as stuck."""
    item = _item(attempts=1, error_code="archive-unavailable", error_message="No space left")
    found = conditions(_status(archive_problem=archive_problem), {}, {}, now=0, started=0,
                       unavailable_after=600, unfinished=[item])  # fmt: skip
    assert _keys(found) == expected


def _report(*archives: ArchiveResult, error: str | None = None) -> AuditReport:
    return AuditReport(id="r", started=0.0, finished=1.0, archives=archives, error=error)


MISMATCH = Finding("hash mismatch", "R1", Path("/a/resources/R1"), "sha1 differs")
MISSING = Finding("missing from archive", "R2", None)


def test_each_audit_finding_is_its_own_problem() -> None:
    """A new finding in a later audit is told; one absent from it is resolved."""
    status = _status()
    status["last_audit"] = {"ok": False, "report": "/r.json"}

    def found(report: AuditReport) -> list[Condition]:
        return conditions(status, {}, {}, now=0, started=0, unavailable_after=1, audit=report)

    first = found(_report(ArchiveResult("birdsong", "/a", findings=(MISMATCH,))))
    later = found(_report(ArchiveResult("birdsong", "/a", findings=(MISSING,))))
    assert _keys(first) == ["audit:birdsong:hash mismatch:R1"]
    assert "archive birdsong" in first[0].summary and "R1" in first[0].summary
    assert first[0].path == "/a/resources/R1" and "/r.json" in first[0].command
    state, told = step(State(), first, now=0, repeat_every=1e6)
    state, next_audit = step(state, later, now=10, repeat_every=1e6)
    assert told is not None and next_audit is not None
    assert [p.key for p in next_audit.problems] == ["audit:birdsong:missing from archive:R2"]
    assert [r.key for r in next_audit.resolved] == ["audit:birdsong:hash mismatch:R1"]


def test_findings_of_an_archive_not_audited_again_are_kept() -> None:
    """Findings of an archive the next audit could not read are kept, not resolved."""
    status = _status()
    status["last_audit"] = {"ok": False}
    good = _report(ArchiveResult("birdsong", "/a", findings=(MISMATCH,)))
    bad = _report(ArchiveResult("birdsong", "/a", error="not mounted"))
    first = conditions(status, {}, {}, now=0, started=0, unavailable_after=1, audit=good)
    later = conditions(status, {}, {}, now=0, started=0, unavailable_after=1, audit=bad)
    assert audit_held(bad) == ["audit:birdsong:", "audit:registry:"] and audit_held(good) == []
    state, _ = step(State(), first, now=0, repeat_every=1e6)
    state, message = step(state, later, now=10, repeat_every=1e6, hold=audit_held(bad))
    assert message is not None and not message.resolved
    assert [p.key for p in message.problems] == ["audit"]
    assert "not mounted" in message.problems[0].summary


def test_what_degrades_status_is_a_problem_unless_told_otherwise() -> None:
    """Each line of status's degraded list is a problem of its own ("degraded"), keyed
    without its numbers; lines another kind tells (rejected, stalled, registry, an
    inbox's archive, the audit, waiting inputs) and the alerts' own failure are not."""
    from nbankd.control.alert_status import degraded_conditions

    own = "alerts could not be sent (webhook: refused); tried again"
    lines = [
        "state_dir /var/lib/nbankd or its journal.sqlite3 was moved while nbankd ran",
        f"3 file(s) in {INBOX}/.nbank that no deposit of this daemon owns",
        f"watch of {INBOX}: no answer; scanned every 60s instead",
        f"2 rejected input(s) waiting in {INBOX}/rejected",
        f"1 stalled file(s) in {INBOX}",
        "registry: connection refused",
        f"archive for {INBOX}: not mounted",
        f"inbox {INBOX}: 2 input(s) waiting after checksum: changed",
        "last audit (2024-05-01T00:00:00+00:00) found problems: 1 missing",
        own,
    ]
    found = degraded_conditions({"degraded": lines, "alerts": {"problem": own}}, 600.0)
    assert [(c.summary, c.delay, c.kind) for c in found] == [
        (lines[0], 0.0, "degraded"),
        (lines[1], 0.0, "degraded"),
        (lines[2], 600.0, "degraded"),  # may pass by itself: told once it lasted
    ]
    again = degraded_conditions({"degraded": [lines[1].replace("3 file", "4 file")]}, 600.0)
    assert again[0].key == found[1].key  # a count that changes is the same problem


def test_a_repeat_due_repeats_every_problem_told_in_one_message() -> None:
    """Once one repeat is due, every problem told before goes with it: problems that
    last share their reminders instead of one message each."""
    first = Condition("rejected:/a", "/a was rejected", "c", kind="rejected")
    second = Condition("rejected:/b", "/b was rejected", "c", kind="rejected")
    state, message = step(State(), [first], now=0.0, repeat_every=100.0)
    assert message is not None
    state, message = step(state, [first, second], now=50.0, repeat_every=100.0)
    assert message is not None and [p.key for p in message.problems] == ["rejected:/b"]
    state, message = step(state, [first, second], now=100.0, repeat_every=100.0)
    assert message is not None
    assert sorted(p.key for p in message.problems) == ["rejected:/a", "rejected:/b"]
    state, message = step(state, [first, second], now=150.0, repeat_every=100.0)
    assert message is None  # /b was repeated with /a: nothing due before 200
