"""What is worth telling someone, and when: pure rules over the status document.

:func:`conditions` turns one status document (what ``nbankctl status`` shows), the
daemon's running totals and the clock into the problems present now, each with a
stable key, a sentence saying what happened and where, and the command that shows
more. :func:`step` folds them into the alerting state and decides the one message
to send now, if any:

- a problem is told once it has lasted its delay (``unavailable_after`` for a
  registry or archive outage, none for the others), then again at most every
  ``repeat_every`` while it lasts;
- problems are grouped: a new problem waits ``group_wait`` so that the others of
  the same moment join it, and every problem due at one check goes into one
  message (a burst of 500 rejections in an inbox is one problem: its rejected
  folder);
- a problem that was told and has gone is followed by a "resolved" line.

Nothing here does I/O; the alert service (:mod:`nbankd.control.alerts`) sends the
message and keeps the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nbankd.timefmt import human_duration, iso


@dataclass(frozen=True)
class Condition:
    """One problem present now."""

    key: str  # stable across checks: what it is about
    summary: str  # what happened, where
    command: str  # what shows more (the hint)
    delay: float = 0.0  # how long it must last before it is told
    kind: str = ""  # registry, archive, rejected, stalled, audit, silent
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


@dataclass(frozen=True)
class Message:
    """One alert message: the problems told now and those resolved since."""

    problems: tuple[Tracked, ...]
    resolved: tuple[Tracked, ...]

    def subject(self, host: str) -> str:
        if self.problems:
            return f"nbankd on {host}: {len(self.problems)} problem(s)"
        return f"nbankd on {host}: resolved"

    def text(self) -> str:
        lines = [f"- {p.summary}\n  more: {p.command}" for p in self.problems]
        lines += [f"- resolved: {r.summary}" for r in self.resolved]
        return "\n".join(lines) + "\n"

    def to_json(self, host: str, now: float) -> dict[str, Any]:
        """The webhook body: every alert of the message (firing, then resolved), and the
        first one's fields at the top level for receivers that read one."""
        alerts = [p.to_json("firing", now) for p in self.problems]
        alerts += [r.to_json("resolved", now) for r in self.resolved]
        return {**alerts[0], "host": host, "subject": self.subject(host), "alerts": alerts}


@dataclass(frozen=True)
class State:
    """The alerting state between checks: every problem seen and not yet gone."""

    tracked: Mapping[str, Tracked] = field(default_factory=dict)


def conditions(
    status: Mapping[str, Any],
    last_deposit: Mapping[str, float],
    expect_every: Mapping[str, float],
    *,
    now: float,
    started: float,
    unavailable_after: float,
) -> list[Condition]:
    """The problems in one status document (``last_deposit``: inbox -> time of its
    last deposit since ``started``; ``expect_every``: inbox -> its option)."""
    out: list[Condition] = []
    problem = (status.get("registry") or {}).get("problem")
    if problem:
        out.append(
            Condition(
                "registry",
                f"the registry cannot be used: {problem}; deposits wait",
                "nbankctl status",
                unavailable_after,
                kind="registry",
            )
        )
    for entry in status.get("inboxes") or []:
        inbox = str(entry.get("path"))
        if entry.get("archive_problem"):
            out.append(
                Condition(
                    f"archive:{inbox}",
                    f"the archive of {inbox} cannot take deposits: {entry['archive_problem']}",
                    "nbankctl status",
                    unavailable_after,
                    kind="archive",
                    inbox=inbox,
                )
            )
        rejected = int(entry.get("in_rejected_folder") or 0)
        if rejected:
            folder = entry.get("rejected_dir") or f"{inbox}/rejected"
            out.append(
                Condition(
                    f"rejected:{inbox}",
                    f"{rejected} rejected input(s) wait in {folder}",
                    f"nbankctl explain {folder}/FILE (each has a .reason file beside it)",
                    kind="rejected",
                    inbox=inbox,
                )
            )
        stalled = entry.get("stalled") or []
        if stalled:
            out.append(
                Condition(
                    f"stalled:{inbox}",
                    f"{len(stalled)} file(s) in {inbox} keep changing (first: {stalled[0]})",
                    f"nbankctl explain {inbox}/{stalled[0]}",
                    kind="stalled",
                    inbox=inbox,
                    path=f"{inbox}/{stalled[0]}" if len(stalled) == 1 else None,
                )
            )
        every = expect_every.get(inbox)
        if every is not None:
            since = last_deposit.get(inbox, started)
            if now - since > every:
                out.append(
                    Condition(
                        f"silent:{inbox}",
                        f"no deposit from {inbox} for {human_duration(now - since)} "
                        f"(expect_every: {human_duration(every)})",
                        f"nbankctl history --inbox {inbox}",
                        kind="silent",
                        inbox=inbox,
                    )
                )
    audit = status.get("last_audit")
    if isinstance(audit, Mapping) and audit.get("ok") is False:
        found = "; ".join(audit.get("problems") or []) or audit.get("error") or "problems"
        out.append(
            Condition(
                "audit",
                f"the last audit found: {found}",
                f"nbankctl status (report {audit.get('report')})"
                if audit.get("report")
                else "nbankctl status",
                kind="audit",
            )
        )
    return out


def step(
    state: State,
    present: Iterable[Condition],
    *,
    now: float,
    repeat_every: float,
    group_wait: float = 0.0,
) -> tuple[State, Message | None]:
    """The next state and the message to send now (None: nothing to tell). A new
    problem waits ``group_wait`` after it is due, so that others of the same moment
    (a burst) join it in one message; repeats and resolutions never wait."""
    tracked: dict[str, Tracked] = {}
    told: list[Tracked] = []
    for cond in present:
        prev = state.tracked.get(cond.key)
        item = Tracked(
            first_seen=prev.first_seen if prev is not None else now,
            summary=cond.summary,
            command=cond.command,
            told_at=prev.told_at if prev is not None else None,
            kind=cond.kind,
            inbox=cond.inbox,
            path=cond.path,
        )
        wait = cond.delay + (group_wait if item.told_at is None else 0.0)
        due = now - item.first_seen >= wait and (
            item.told_at is None or now - item.told_at >= repeat_every
        )
        if due:
            item = replace(item, told_at=now)
            told.append(item)
        tracked[cond.key] = item
    resolved = [t for k, t in state.tracked.items() if k not in tracked and t.told_at is not None]
    if not told and not resolved:
        return State(tracked), None
    return State(tracked), Message(tuple(told), tuple(resolved))


def unsent(new: State, old: State, message: Message) -> State:
    """The state after ``message`` could not be sent: what it told counts as untold
    (told again at the next check) and what it resolved is still to resolve."""
    told = {p.summary for p in message.problems}
    tracked = {
        key: replace(t, told_at=old.tracked[key].told_at if key in old.tracked else None)
        if t.summary in told
        else t
        for key, t in new.tracked.items()
    }
    for key, t in old.tracked.items():
        if key not in tracked and t.told_at is not None:
            tracked[key] = t  # its resolution is sent next time
    return State(tracked)


__all__ = ["Condition", "Message", "State", "Tracked", "conditions", "step", "unsent"]
