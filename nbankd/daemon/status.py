"""The daemon's status document (``nbankctl status``) and its one-line summary.

A daemon is *degraded* (``nbankctl status`` exits 1) when any of these holds:
the registry is unreachable or refused the start-up checks; an inbox's inotify
watch failed (its liveness check went unanswered, or the kernel refused a watch:
the inbox is then scanned every ``fallback_poll_every``); an archive is not usable
(unmounted, not writable, not set up, or the registry records its name at another
root, or not at all, or, mounted after the start, it holds resources the registry
has no record of: :mod:`~nbankd.daemon.late_archives`); an inbox's
``placement: rename`` is not proved to work
(:func:`~nbankd.daemon.setup.check_placement`); inputs wait after a failed step
(registry outage, full or failing archive filesystem, ...); files are stalled; inputs
are held for a ``NAME.reason`` of a rejection beside them
(:mod:`~nbankd.daemon.rejected_found`: a rejected folder renamed or moved); the
lane of small files has shown no progress, or has waited for the registry's answers,
for a minute; the last reload of the configuration file failed (until a reload
or a restart succeeds); the process is short of file descriptors (fewer than
:data:`~nbankd.service.limits.LOW_DESCRIPTORS` free under its open-file limit), or
inputs wait because nbankd ran out of descriptors or threads; the log output fails
or is stuck (its lines dropped, counted in ``log.dropped``). The control
handler adds rejected inputs, files in an inbox's ``.nbank/`` that no deposit of
this daemon owns (:mod:`nbankd.daemon.orphans`) and audit findings. Each reason is
one line naming the registry, archive or inbox at
fault and why.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nbankd import __version__
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL, State
from nbankd.deposit.outcomes import ARCHIVE_CODES, PROCESS_CODES, REGISTRY_CODES
from nbankd.deposit.verdicts import RECHECK_CODES
from nbankd.names import printable

if TYPE_CHECKING:
    from nbankd.daemon.view import Snapshot


#: attempts in a row after which an input waiting on another input of the same bytes
#: (:data:`~nbankd.deposit.verdicts.RECHECK_CODES`) is told: about 15 s of waiting (the
#: backoff doubles from 1 s); a duplicate in a burst waits for one round, never telling
RECHECKS_TOLD_AFTER = 4


def waiting_problems(items: Iterable[Item]) -> list[str]:
    """One status line per (registry, archive or inbox; error code) that inputs wait on.

    An input waits on an error when its last step failed and will be retried
    (``attempts`` > 0); the line quotes the newest error message. An input waiting on
    another input of the same bytes (``identifier-busy``, ``sha1-held``) is not a
    problem until :data:`RECHECKS_TOLD_AFTER` attempts in a row: that other input
    normally moves on within a round or two.
    """
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        if item.state in FINAL or not item.attempts or not item.error_code:
            continue
        if item.error_code in RECHECK_CODES and item.attempts < RECHECKS_TOLD_AFTER:
            continue
        if item.error_code in PROCESS_CODES:
            where = "nbankd"
        elif item.error_code in REGISTRY_CODES:
            where = "registry"
        elif item.error_code in ARCHIVE_CODES:
            where = f"archive {item.archive} ({item.archive_path})"
        else:
            where = f"inbox {item.inbox}"
        groups.setdefault((where, item.error_code), []).append(item)
    lines = []
    for (where, code), group in sorted(groups.items()):
        newest = max(group, key=lambda i: i.updated)
        fix = f" (to fix: {newest.error_hint})" if newest.error_hint else ""
        lines.append(
            f"{where}: {len(group)} input(s) waiting after {code}: {newest.error_message}{fix}"
        )
    return lines


#: unexpected errors in a row at one state after which an input is told in status
BUGS_TOLD_AFTER = 2


def bug_problem(bugs: Iterable[tuple[str, int, str, str]]) -> str | None:
    """The status line for inputs an unexpected error (a bug in nbankd, outside the
    steps' own error handling) failed at least :data:`BUGS_TOLD_AFTER` times in a row
    at the same state; ``bugs``: (state, times in a row, path, last error)."""
    again = sorted((w, n, e) for _state, n, w, e in bugs if n >= BUGS_TOLD_AFTER)
    if not again:
        return None
    where, count, err = again[0]
    more = f" (and {len(again) - 1} more)" if len(again) > 1 else ""
    return (
        f"{len(again)} input(s) fail again and again with an unexpected error (code "
        f"internal, a bug in nbankd), retried later each time: {where}{more}, {count} "
        f"times in a row: {err}; please report it with the log"
    )


def worker_problem(stuck: Mapping[str, str], wedge_after: float | None) -> str | None:
    """The status line for pool workers without a sign of life for ``wedge_after``
    seconds inside a step (``stuck``: worker -> the input it moves), or None."""
    if not stuck:
        return None
    inputs = ", ".join(sorted(stuck.values()))
    return (
        f"{len(stuck)} deposit worker(s) have shown no progress for over "
        f"{wedge_after:g}s (a step stuck on an unresponsive filesystem or registry?): "
        f"{inputs} wait(s) with it; under systemd the watchdog restarts nbankd"
    )


def switch_problem(record: Mapping[str, Any]) -> str:
    """The status line of a registry switch that has not finished (interrupted, or
    under way): it paused inboxes, which stay paused until it is run again."""
    to = record.get("to")
    paused = len(record.get("inboxes") or [])
    if record.get("command"):
        command = shlex.join(record["command"])
    else:  # recorded by an older nbankctl
        command = f"nbankctl registry switch --to {to or 'URL'}"
    why = f" ({record['problem']})" if record.get("problem") else ""
    return (
        f"a registry switch{' to ' + to if to else ''} has not finished{why}: the "
        f"{paused} inbox(es) it paused stay paused; finish it with: {command}"
    )


def reload_line(source: str, problem: str) -> str:
    """The status line of a reload that failed: what of the file is not in force."""
    problem = "; ".join(part.strip() for part in problem.splitlines() if part.strip())
    return (
        f"reload of {source} failed: {problem}; fix it, then reload again (nbankctl "
        "reload, or systemctl reload nbankd) or restart nbankd"
    )


#: inputs held for a NAME.reason beside them that status names (the count has them all)
HELD_NAMED = 5


def held_line(key: str, rejected: os.PathLike[str], held: Sequence[str]) -> str:
    """The status line of inputs held, never deposited, for a ``NAME.reason`` nbankd
    wrote beside each (:mod:`~nbankd.daemon.rejected_found`): how many, the first
    ones, and what to do."""
    names = ", ".join(printable(rel) for rel in held[:HELD_NAMED])
    more = f" and {len(held) - HELD_NAMED} more" if len(held) > HELD_NAMED else ""
    return (
        f"{len(held)} input(s) in {key} never deposited: a NAME.reason of a rejection is "
        f"beside each (a rejected folder renamed or moved?): {names}{more}; delete an "
        "input's NAME.reason to have it deposited, or move both into "
        f"{os.fspath(rejected)} and requeue it (nbankctl requeue FILE)"
    )


def status_line(snap: Snapshot) -> str:
    """One line for systemd's STATUS=: queue depth and the last deposit."""
    last = snap.last_deposit["id"] if snap.last_deposit else "none"
    unreachable = snap.registry_problem or snap.setup_problem
    problem = " (registry unreachable)" if unreachable else ""
    return f"queue {snap.queue}; last deposit {last}{problem}"


def build_status(
    snap: Snapshot, counts: Mapping[tuple[str, str], int], unfinished: Sequence[Item]
) -> dict[str, Any]:
    """The status document of a snapshot, with the journal's counts by (inbox, state)
    and its unfinished items."""
    inboxes = []
    degraded: list[str] = []
    shown_archives = set()
    for key, state in snap.inboxes.items():
        watch = snap.watches.get(key)
        per_state = {s: n for (ib, s), n in counts.items() if ib == key}
        inboxes.append(
            {
                "path": key,
                "archive": state.config.archive,
                "watch": state.config.watch,
                "watch_mode": watch.mode.value if watch is not None else "poll",
                "watch_problem": watch.reason if watch is not None and watch.degraded else None,
                "paused": state.paused,
                "items": {s: n for s, n in per_state.items() if s not in ("done",)},
                "deposited": per_state.get("done", 0),
                "rejected": per_state.get("rejected", 0),
                "in_flight": sum(n for s, n in per_state.items() if State(s) not in FINAL),
                "waiting_on_errors": sum(
                    1 for i in unfinished if i.inbox == key and i.attempts and i.error_code
                ),
                # queued, running or waiting to retry: when the oldest was claimed
                "oldest_waiting": min(
                    (i.created for i in unfinished if i.inbox == key), default=None
                ),
                "stalled": list(state.stalled),
                # ready but held: a program still has them open for writing
                "open_for_writing": sorted(state.open_for_writing),
                "unreadable": [rel for rel, _ in state.unreadable],
                "skipped": dict(state.skipped),
                # held for an nbankd NAME.reason beside each: how many, the first ones
                "held_for_reason": len(state.held_for_reason),
                "held_for_reason_first": list(state.held_for_reason[:HELD_NAMED]),
                # the registry's record first: an archive made where it is not placed
                # would not help
                "archive_problem": state.registration_problem or state.archive_problem,
                "inbox_problem": state.inbox_problem,
                "placement_problem": state.placement_problem,
                "last_scan": state.last_scan,
                "scans": state.scans,
            }
        )
        if state.inbox_problem:
            degraded.append(f"inbox {key}: {state.inbox_problem}")
        if state.placement_problem:
            degraded.append(f"inbox {key}: {state.placement_problem}")
        archive_problem = state.registration_problem or state.archive_problem
        if archive_problem:
            degraded.append(f"archive for {key}: {archive_problem}")
            shown_archives.add(snap.config.archive_for(state.config).name)
        if watch is not None and watch.degraded:
            every = state.config.fallback_poll_every
            degraded.append(f"watch of {key}: {watch.reason}; scanned every {every:g}s instead")
        if state.unreadable:
            rel, why = state.unreadable[0]
            degraded.append(
                f"{len(state.unreadable)} folder(s) or file(s) in {key} cannot be read, so "
                f"what is inside is never deposited (first: {printable(rel)}: {why}); give "
                "the daemon's user access, or shorten the path"
            )
        if state.stalled:
            degraded.append(f"{len(state.stalled)} stalled file(s) in {key}")
        if state.held_for_reason:
            degraded.append(held_line(key, state.config.rejected_path, state.held_for_reason))
    registry_problem = snap.registry_problem or snap.setup_problem
    if snap.registry_problem and snap.registry_problem != snap.setup_problem:
        degraded.append(f"registry: {snap.registry_problem}")
    degraded += [
        line
        for line in snap.setup_problems
        if not any(line.startswith(f"archive {name} ") for name in shown_archives)
    ]
    degraded += waiting_problems(unfinished)
    for name, caps in sorted(snap.capabilities.items()):
        if not caps.can_publish:
            degraded.append(f"archive {name}: {caps.notes()[0]}")
    if snap.unfinished_switch is not None:
        degraded.append(switch_problem(snap.unfinished_switch))
    if snap.lane_problem:
        degraded.append(snap.lane_problem)
    if snap.bug_problem:
        degraded.append(snap.bug_problem)
    if snap.worker_problem:
        degraded.append(snap.worker_problem)
    if snap.paused_problem:
        degraded.append(snap.paused_problem)
    if snap.reload_problem:
        degraded.append(reload_line(str(snap.config.source), snap.reload_problem))
    if snap.log_output.get("problem"):
        degraded.append(str(snap.log_output["problem"]))
    if snap.limits_problem:
        degraded.insert(0, snap.limits_problem)
    if snap.state_problem:
        degraded.insert(0, snap.state_problem)
    if snap.journal_problem:
        degraded.insert(0, snap.journal_problem)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": snap.now - snap.started,
        "registry": {
            "backend": snap.registry_backend,
            "url": snap.registry_url,
            "problem": registry_problem,
        },
        "inboxes": inboxes,
        "queue": snap.queue,
        "last_deposit": snap.last_deposit,
        "last_error": snap.last_error,
        "unfinished_switch": snap.unfinished_switch,
        "archive_filesystems": {
            name: {**caps.to_json(), "notes": caps.notes()}
            for name, caps in sorted(snap.capabilities.items())
        },
        "log": dict(snap.log_output),
        "degraded": degraded,
    }
