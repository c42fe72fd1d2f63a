"""What is worth telling someone, and when: pure rules over the status document.

:func:`conditions` turns one status document (what ``nbankctl status`` shows), the
daemon's running totals, the inputs in its rejected folders, its unfinished items,
the last audit report and the clock into the problems present now, each with a
stable key (one per rejected input, stalled file, stuck input, audit finding,
outage or silent inbox), a sentence saying what happened and where, and the command
that shows more. :func:`step` folds them into the alerting state and decides the
one message to send now, if any:

- a problem is *ready* once it has lasted its delay (``unavailable_after`` for a
  registry or archive outage or an input stuck retrying, none for the others);
- a problem that is gone after being told is to be *resolved*;
- problems are grouped: once the first ready problem (or resolution) not yet told
  has waited ``group_wait``, one message goes out with every problem ready and every
  resolution pending at that moment, whatever their kind (a burst of 500
  rejections across inboxes is one message);
- a problem still there is told again at most every ``repeat_every``; a repeat
  never waits, and once one is due every problem told before is repeated with it
  (problems that last share one reminder, not one message each), in a message that
  carries everything else ready then;
- a problem gone and back before its resolution was sent is neither resolved nor
  told again (a flapping mount is not a stream of messages).

The message lists at most :data:`LISTED` lines per kind and inbox, then how many
more (a corrupted archive can have 100 000 audit findings).

Nothing here does I/O; the alert service (:mod:`nbankd.control.alerts`) sends the
message, keeps the state, and after a failed send calls :func:`unsent`, which puts
back what the message told or resolved, by key.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nbankd.audit.model import AuditReport, Finding
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL
from nbankd.names import printable, without_controls
from nbankd.shellwords import quote
from nbankd.timefmt import human_duration, iso

#: lines listed per (kind, inbox) in a message's text; the webhook's ``alerts`` list
#: holds at most ALERTS_LISTED entries
LISTED = 20
ALERTS_LISTED = 100

#: error codes the registry or archive conditions tell of (after ``unavailable_after``):
#: an input waiting on one of these is not "stuck" (for the archive's, while its inbox's
#: archive condition is present: a full archive, or a disk failing under the copy,
#: which the archive's check does not see, is told by the inputs it holds up)
OUTAGE_CODES = frozenset({"registry-unavailable", "auth", "archive-unavailable"})

#: how a message's headline counts the problems of each kind
NOUNS = {
    "registry": "registry problem(s)",
    "archive": "archive(s) that cannot take deposits",
    "rejected": "rejected input(s)",
    "stalled": "file(s) that keep changing",
    "stuck": "input(s) stuck retrying",
    "audit": "audit finding(s)",
    "silent": "silent inbox(es)",
    "degraded": "problem(s) nbankctl status reports",
}


@dataclass(frozen=True)
class Condition:
    """One problem present now."""

    key: str  # stable across checks: what it is about
    summary: str  # what happened, where
    command: str  # what shows more (the hint)
    delay: float = 0.0  # how long it must last before it is told
    kind: str = ""  # registry, archive, rejected, stalled, stuck, audit, silent, degraded
    inbox: str | None = None  # the inbox concerned, if one
    path: str | None = None  # the file concerned, when one is


@dataclass(frozen=True)
class Tracked:
    """What the alerting state remembers of one problem."""

    first_seen: float
    summary: str
    command: str
    told_at: float | None = None
    kind: str = ""
    inbox: str | None = None
    path: str | None = None
    key: str = ""
    delay: float = 0.0
    gone_at: float | None = None  # when it was first seen gone (its resolution pending)

    @property
    def ready_at(self) -> float:
        return self.first_seen + self.delay

    def to_json(self, state: str, now: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": state,
            "summary": self.summary,
            "inbox": self.inbox,
            "path": self.path,
            "hint": self.command,
            "time": iso(now),
            "since": iso(self.first_seen),
        }


def _groups(items: Sequence[Tracked]) -> list[list[Tracked]]:
    """``items`` grouped by (kind, inbox), in order of first appearance."""
    groups: dict[tuple[str, str | None], list[Tracked]] = {}
    for t in items:
        groups.setdefault((t.kind, t.inbox), []).append(t)
    return list(groups.values())


def _headline(group: Sequence[Tracked]) -> str:
    first = group[0]
    noun = NOUNS.get(first.kind, "problem(s)")
    return f"{len(group)} {noun}" + (f" in {printable(first.inbox)}" if first.inbox else "")


@dataclass(frozen=True)
class Message:
    """One alert message: the problems told now and those resolved since."""

    problems: tuple[Tracked, ...]
    resolved: tuple[Tracked, ...]

    def subject(self, host: str) -> str:
        if self.problems:
            return f"nbankd on {host}: {len(self.problems)} problem(s)"
        return f"nbankd on {host}: resolved"

    def headline(self) -> str:
        """One sentence for the whole message: the one problem's summary, or how many
        of each kind (``500 rejected input(s) in /srv/inbox/rig3; 2 audit finding(s)``)."""
        shown = self.problems or self.resolved
        if len(shown) == 1:
            return shown[0].summary
        heads = "; ".join(_headline(g) for g in _groups(shown))
        return heads if self.problems else f"resolved: {heads}"

    def text(self) -> str:
        lines: list[str] = []
        for group in _groups(self.problems):
            if len(group) > 1:
                lines.append(f"{_headline(group)}:")
            lines += [f"- {p.summary}\n  more: {p.command}" for p in group[:LISTED]]
            if len(group) > LISTED:
                lines.append(f"- ... and {len(group) - LISTED} more (nbankctl status)")
        for group in _groups(self.resolved):
            lines += [f"- resolved: {r.summary}" for r in group[:LISTED]]
            if len(group) > LISTED:
                lines.append(f"- resolved: ... and {len(group) - LISTED} more")
        return "\n".join(lines) + "\n"

    def to_json(self, host: str, now: float) -> dict[str, Any]:
        """The webhook body: at the top level, the one alert of the message (or, for
        several, their headline, their common kind and inbox, and no path) for
        receivers that read one; then every alert of the message (firing, then
        resolved; at most :data:`ALERTS_LISTED`) under ``alerts``."""
        alerts = [p.to_json("firing", now) for p in self.problems]
        alerts += [r.to_json("resolved", now) for r in self.resolved]
        shown = self.problems or self.resolved
        top = dict(alerts[0])
        if len(shown) > 1:
            kinds = {t.kind for t in shown}
            inboxes = {t.inbox for t in shown}
            top.update(
                kind=kinds.pop() if len(kinds) == 1 else "several",
                summary=self.headline(),
                inbox=inboxes.pop() if len(inboxes) == 1 else None,
                path=None,
                since=iso(min(t.first_seen for t in shown)),
            )
        return {
            **top,
            "host": host,
            "subject": self.subject(host),
            "firing": len(self.problems),
            "resolved": len(self.resolved),
            "alerts": alerts[:ALERTS_LISTED],
            "not_listed": max(0, len(alerts) - ALERTS_LISTED),
        }


@dataclass(frozen=True)
class State:
    """The alerting state between checks: every problem seen and not yet gone, and
    those told and gone whose resolution is not sent yet."""

    tracked: Mapping[str, Tracked] = field(default_factory=dict)
    gone: Mapping[str, Tracked] = field(default_factory=dict)


def _audit_conditions(report: AuditReport, hint: str) -> list[Condition]:
    out: list[Condition] = []
    errors = [] if report.error is None else [f"audit failed: {without_controls(report.error)}"]
    errors += [
        f"archive {printable(a.name)}: {without_controls(a.error)}"
        for a in report.archives
        if a.error is not None
    ]
    if errors:
        out.append(
            Condition(
                "audit", f"the last audit could not finish: {'; '.join(errors)}", hint, kind="audit"
            )
        )
    found: list[tuple[str, Finding]] = [(a.name, f) for a in report.archives for f in a.findings]
    found += [("registry", f) for f in report.registry_findings]
    for where, f in found:
        what = f.resource if f.resource is not None else f.path if f.path is not None else f.detail
        place = "the registry" if where == "registry" else f"archive {printable(where)}"
        out.append(
            Condition(
                f"audit:{where}:{f.kind}:{what}",
                f"the last audit found in {place}: {_finding(f)}",
                hint,
                kind="audit",
                path=None if f.path is None else str(f.path),
            )
        )
    return out


def _finding(f: Finding) -> str:
    """``str(f)`` with its resource and path shown through :func:`printable` and its
    detail without control characters (a file in an archive may be named with a
    terminal's escapes)."""
    names = (printable(str(x)) for x in (f.resource, f.path) if x is not None)
    return f"{' : '.join(names)} - {f.kind}" + (
        f" ({without_controls(f.detail)})" if f.detail else ""
    )


def audit_held(report: AuditReport | None) -> list[str]:
    """Key prefixes of audit findings the last audit could not look at again (an
    archive it could not read, or every one when it failed): absent from its
    report, they are not resolved (see ``hold`` in :func:`step`)."""
    if report is None:
        return []
    if report.error is not None:
        return ["audit:"]
    held = [f"audit:{a.name}:" for a in report.archives if a.error is not None]
    return [*held, "audit:registry:"] if held else []


def rejected_held(unlisted: Iterable[str]) -> list[str]:
    """Key prefixes of the rejected inputs of the inboxes ``unlisted`` (their rejected
    folders could not be listed now, e.g. for want of file descriptors): absent from
    this check's conditions, they are not resolved (see ``hold`` in :func:`step`)."""
    return [f"rejected:{inbox}/" for inbox in unlisted]


def _stuck(
    items: Iterable[Item], unavailable_after: float, told: Collection[str]
) -> list[Condition]:
    """Inputs retried after an error, but those waiting on an outage a present
    condition (key in ``told``) tells of."""
    out = []
    for item in items:
        code = item.error_code
        if item.state in FINAL or not item.attempts or not code:
            continue
        if code in OUTAGE_CODES:
            # told by the outage's own condition while there is one; an input held up
            # alone (the registry answering others, the archive's check passing) is
            # stuck
            teller = f"archive:{item.inbox}" if code == "archive-unavailable" else "registry"
            if teller in told:
                continue
        where = os.path.join(item.inbox, item.relpath_str)
        out.append(
            Condition(
                f"stuck:{item.token}",
                f"{printable(where)} is retried after {code} ({item.attempts} attempt(s)): "
                + without_controls(
                    (item.error_message or code)
                    + (f" (to fix: {item.error_hint})" if item.error_hint else "")
                ),
                f"nbankctl explain {quote(where)}",
                unavailable_after,
                kind="stuck",
                inbox=item.inbox,
                path=where,
            )
        )
    return out


def conditions(
    status: Mapping[str, Any],
    last_deposit: Mapping[str, float],
    expect_every: Mapping[str, float],
    *,
    now: float,
    started: float,
    unavailable_after: float,
    rejected: Mapping[str, Sequence[str]] | None = None,
    unfinished: Iterable[Item] = (),
    audit: AuditReport | None = None,
) -> list[Condition]:
    """The problems in one status document (``last_deposit``: inbox -> time of its
    last deposit since ``started``; ``expect_every``: inbox -> its option;
    ``rejected``: inbox -> the paths in its rejected folder, one problem each (an
    inbox not in it: one problem for its count); ``unfinished``: the journal's
    unfinished items (those retried after an error other than an outage are
    "stuck"); ``audit``: the last audit's report, one problem per finding (without
    it: one problem for the status's summary))."""
    out: list[Condition] = []
    problem = (status.get("registry") or {}).get("problem")
    if problem:
        out.append(
            Condition(
                "registry",
                f"the registry cannot be used: {without_controls(str(problem))}; deposits wait",
                "nbankctl status",
                unavailable_after,
                kind="registry",
            )
        )
    rejected = rejected or {}
    for entry in status.get("inboxes") or []:
        inbox = str(entry.get("path"))
        if entry.get("archive_problem"):
            out.append(
                Condition(
                    f"archive:{inbox}",
                    f"the archive of {printable(inbox)} cannot take deposits: "
                    + without_controls(str(entry["archive_problem"])),
                    "nbankctl status",
                    unavailable_after,
                    kind="archive",
                    inbox=inbox,
                )
            )
        folder = entry.get("rejected_dir") or f"{inbox}/rejected"
        earlier = [str(e.get("path")) for e in entry.get("earlier_rejected_dirs") or []]
        if inbox in rejected:
            for path in rejected[inbox]:
                # an input in an earlier rejected folder (rejected_dir changed) waits there
                holding = [f for f in (folder, *earlier) if path.startswith(f + "/")]
                where = max(holding, key=len, default=folder)
                out.append(
                    Condition(
                        f"rejected:{path}",
                        f"{printable(path)} was rejected (it waits in {printable(where)})",
                        f"nbankctl explain {quote(path)} (its .reason file is beside it)",
                        kind="rejected",
                        inbox=inbox,
                        path=path,
                    )
                )
        elif int(entry.get("in_rejected_folder") or 0):
            out.append(
                Condition(
                    f"rejected:{inbox}",
                    f"{entry['in_rejected_folder']} rejected input(s) wait in {printable(folder)}",
                    f"nbankctl explain {quote(folder)}/FILE (each has a .reason file beside it)",
                    kind="rejected",
                    inbox=inbox,
                )
            )
        for rel in entry.get("stalled") or []:
            where = f"{inbox}/{rel}"
            out.append(
                Condition(
                    f"stalled:{where}",
                    f"{printable(where)} keeps changing past stall_after: not deposited until "
                    "it settles",
                    f"nbankctl explain {quote(where)}",
                    kind="stalled",
                    inbox=inbox,
                    path=where,
                )
            )
        every = expect_every.get(inbox)
        if every is not None:
            since = last_deposit.get(inbox, started)
            if now - since > every:
                out.append(
                    Condition(
                        f"silent:{inbox}",
                        f"no deposit from {printable(inbox)} for {human_duration(now - since)} "
                        f"(expect_every: {human_duration(every)})",
                        f"nbankctl history --inbox {quote(inbox)}",
                        kind="silent",
                        inbox=inbox,
                    )
                )
    out += _stuck(unfinished, unavailable_after, {c.key for c in out})
    last = status.get("last_audit")
    if isinstance(last, Mapping) and last.get("ok") is False:
        hint = (
            f"nbankctl status (report {last['report']})"
            if last.get("report")
            else "nbankctl status"
        )
        if audit is not None:
            out += _audit_conditions(audit, hint)
        else:
            found = "; ".join(last.get("problems") or []) or last.get("error") or "problems"
            found = without_controls(str(found))
            out.append(Condition("audit", f"the last audit found: {found}", hint, kind="audit"))
    return out


def step(
    state: State,
    present: Iterable[Condition],
    *,
    now: float,
    repeat_every: float,
    group_wait: float = 0.0,
    hold: Collection[str] = (),
) -> tuple[State, Message | None]:
    """The next state and the message to send now (None: nothing to tell).

    A message goes out once the earliest problem ready and not yet told, or the
    earliest resolution pending, has waited ``group_wait``, or when a repeat is due;
    it carries every problem ready, every resolution pending and, when a repeat is
    due, every problem told before (their reminders go together from then on).
    A tracked problem absent from ``present`` whose key starts with one of ``hold``
    is kept as it is (not known now: neither told nor resolved)."""
    tracked: dict[str, Tracked] = {}
    for cond in present:
        prev = state.tracked.get(cond.key) or state.gone.get(cond.key)
        tracked[cond.key] = Tracked(
            first_seen=prev.first_seen if prev is not None else now,
            summary=cond.summary,
            command=cond.command,
            told_at=prev.told_at if prev is not None else None,
            kind=cond.kind,
            inbox=cond.inbox,
            path=cond.path,
            key=cond.key,
            delay=cond.delay,
        )
    for key, t in state.tracked.items():
        if key not in tracked and any(key.startswith(p) for p in hold):
            tracked[key] = t
    gone = {k: t for k, t in state.gone.items() if k not in tracked}
    for key, t in state.tracked.items():
        if key not in tracked and t.told_at is not None:
            gone[key] = replace(t, gone_at=now)
    ready = [t for t in tracked.values() if t.told_at is None and now >= t.ready_at]
    repeats = [
        t for t in tracked.values() if t.told_at is not None and now - t.told_at >= repeat_every
    ]
    starts = [t.ready_at for t in ready] + [t.gone_at or now for t in gone.values()]
    if not repeats and not (starts and now >= min(starts) + group_wait):
        return State(tracked, gone), None
    if repeats:  # one reminder for everything still there, not one message each
        repeats = [t for t in tracked.values() if t.told_at is not None]
    told_keys = {t.key for t in ready} | {t.key for t in repeats}
    told = []
    for key, t in tracked.items():
        if key in told_keys:
            tracked[key] = replace(t, told_at=now)
            told.append(tracked[key])
    return State(tracked), Message(tuple(told), tuple(gone.values()))


def unsent(new: State, old: State, message: Message) -> State:
    """The state after ``message`` could not be sent: what it told counts as untold
    (or told when it was told before), and what it resolved is still to resolve; by
    key, so a summary that changes before the next check loses nothing."""
    told = {p.key for p in message.problems}
    tracked = {}
    for key, t in new.tracked.items():
        if key in told:
            prev = old.tracked.get(key) or old.gone.get(key)
            t = replace(t, told_at=prev.told_at if prev is not None else None)
        tracked[key] = t
    gone = dict(new.gone)
    for r in message.resolved:
        if r.key not in tracked:
            gone[r.key] = r
    return State(tracked, gone)


__all__ = [
    "ALERTS_LISTED",
    "LISTED",
    "NOUNS",
    "OUTAGE_CODES",
    "Condition",
    "Message",
    "State",
    "Tracked",
    "audit_held",
    "conditions",
    "rejected_held",
    "step",
    "unsent",
]
