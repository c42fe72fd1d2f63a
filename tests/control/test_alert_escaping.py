"""Alert summaries show names and texts from outside the daemon (an archive's file
names, an inbox's path, an audit's or a registry's words) with their control
characters as text, as they show a rejected input's name: one line each, no terminal
command, in an email, a webhook's body and the log alike.

Findings, fixed since: an audit finding's path (a file in an archive), an inbox path,
a registry's or an archive's problem, an audit's error and a line of status's
``degraded`` list reached summaries raw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbankd.audit.model import UNEXPECTED, ArchiveResult, AuditReport, Finding
from nbankd.control.alert_rules import Condition, Message, Tracked, conditions
from nbankd.control.alert_status import degraded_conditions

EVIL = "a\n- resolved: all\x1b]0;owned\x07\x9b2J\u202e"
INBOX = f"/srv/inbox/{EVIL}"


def _has_controls(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text)


def _status(**inbox: Any) -> dict[str, Any]:
    return {"registry": {"problem": None}, "inboxes": [{"path": INBOX, **inbox}]}


def _tracked(c: Condition) -> Tracked:
    return Tracked(0.0, c.summary, c.command, kind=c.kind, inbox=c.inbox, path=c.path, key=c.key)


def test_an_audit_finding_is_shown_escaped() -> None:
    """An audit finding about a file whose name holds a newline and a terminal's
    escapes (put in the archive by someone) is told on one line, its name shown
    through printable; its path keeps the name."""
    path = Path(f"/srv/archive/resources/{EVIL}.wav")
    report = AuditReport(
        "r1",
        0.0,
        archives=(
            ArchiveResult("arch", "/srv/archive", findings=(Finding(UNEXPECTED, None, path),)),
        ),
    )
    status = {"inboxes": [], "last_audit": {"ok": False, "report": "/r.json"}}
    [found] = conditions(status, {}, {}, now=0, started=0, unavailable_after=1, audit=report)
    assert not _has_controls(found.summary), found.summary
    assert "/resources/a\\x0a- resolved: all\\x1b]0;owned\\x07\\u009b2J\\u202e.wav" in found.summary
    assert found.path == str(path)


def test_an_audits_error_is_shown_escaped() -> None:
    """An audit that could not finish tells its error (and the archive's) on one line,
    without its control characters."""
    report = AuditReport(
        "r1",
        0.0,
        error=f"cannot read {EVIL}",
        archives=(ArchiveResult("arch", "/srv/archive", error=f"cannot list {EVIL}"),),
    )
    status = {"inboxes": [], "last_audit": {"ok": False}}
    [found] = conditions(status, {}, {}, now=0, started=0, unavailable_after=1, audit=report)
    assert not _has_controls(found.summary), found.summary


def test_an_inbox_path_is_shown_escaped() -> None:
    """An inbox whose path holds control characters is told escaped in the summaries
    that name it (its archive's problem, its silence) and in a message's headline;
    the command to paste quotes it."""
    status = _status(archive_problem=f"not mounted: {EVIL}")
    status["registry"]["problem"] = f"refused: {EVIL}"
    found = conditions(
        status, {}, {INBOX: 10.0}, now=100, started=0, unavailable_after=1, rejected={}
    )
    assert [c.kind for c in found] == ["registry", "archive", "silent"]
    for c in found:
        assert not _has_controls(c.summary), c.summary
        assert not _has_controls(c.command), c.command
    assert found[2].inbox == INBOX
    both = Message((_tracked(found[1]), _tracked(found[2])), ())
    assert not _has_controls(both.headline()), both.headline()
    assert not _has_controls(both.text().replace("\n", "")), both.text()
    assert len(both.text().splitlines()) == 4  # two lines per problem (its summary, more:)


def test_a_line_of_status_degraded_is_shown_escaped() -> None:
    """A ``degraded`` line of status told as an alert (naming an inbox whose path holds
    control characters) is told without them."""
    status = {"inboxes": [], "degraded": [f"inbox {INBOX}: its folder was replaced"]}
    [found] = degraded_conditions(status, 1.0)
    assert not _has_controls(found.summary), found.summary
    assert found.summary.startswith("inbox /srv/inbox/a\\x0a- resolved: all\\x1b]0;")
