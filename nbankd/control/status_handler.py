"""The ``status`` control command: the daemon's own status
(:meth:`~nbankd.daemon.service.Daemon.status`) with what only the inboxes' folders
tell: rejected inputs waiting (in the rejected folder and in earlier ones), folders
there that cannot be listed, files no deposit owns in work folders, and the alert,
metrics and audit services' problems. Every problem is one line of ``degraded``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbankd import errors
from nbankd.archive.fsops import DIR_NOFOLLOW
from nbankd.config import InboxConfig
from nbankd.daemon import orphans
from nbankd.daemon import requeue as requeue_mod
from nbankd.names import printable

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon


def status(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """The reply to ``status``: the daemon's status with the inboxes' folders' lines."""
    inboxes = daemon.snapshot().inboxes
    result = daemon.status()
    try:
        for entry in result["inboxes"]:
            state = inboxes.get(entry["path"])
            contents = (
                requeue_mod.rejected_contents(state.config, state.config.rejected_dir)
                if state is not None
                else requeue_mod.RejectedContents()
            )
            waiting = len(contents.entries)
            entry["in_rejected_folder"] = waiting
            entry["rejected_dir"] = str(state.config.rejected_path) if state is not None else None
            entry["rejected_without_reason"] = [str(p) for p in contents.unexplained[:LISTED]]
            entry["rejected_unreadable"] = _unreadable(contents)
            if waiting:
                result["degraded"].append(
                    f"{waiting} rejected input(s) waiting in {entry['rejected_dir']}"
                    + _without_reason(contents)
                )
            result["degraded"] += _unreadable_lines(entry["path"], entry["rejected_dir"], contents)
            entry["earlier_rejected_dirs"] = []
            if state is not None:
                for earlier, held in _earlier_rejected(state.config):
                    entry["earlier_rejected_dirs"].append(earlier)
                    result["degraded"] += _unreadable_lines(entry["path"], earlier["path"], held)
                    if earlier["empty"]:
                        continue
                    result["degraded"].append(
                        f"{earlier['rejected_inputs']} rejected input(s) still in "
                        f"{earlier['path']}, an earlier rejected folder of {entry['path']} "
                        f"(rejected_dir is now {state.config.rejected_dir}): nbankd never "
                        "deposits from it; requeue them (nbankctl requeue --all-rejected "
                        f"{entry['path']}, or nbankctl requeue FILE) or move them out, then "
                        "remove the folder"
                    )
            entry["former_work_dirs"] = (
                [str(state.config.path / w) for w in state.config.former_work_dirs]
                if state is not None
                else []
            )
            if state is not None:
                unowned, problem = orphans.check(state.config.work_dir, daemon.journal.known_tokens)
                entry["unowned_work_files"] = unowned
                if problem is not None:
                    result["degraded"].append(f"{entry['path']}: {problem}")
                for former in state.config.former_work_dirs:
                    # a former inbox's work folder inside this one: never scanned, so files
                    # no deposit owns there (a claim of a lost state_dir) are told as here
                    _unowned, problem = orphans.check(
                        state.config.path / former, daemon.journal.known_tokens
                    )
                    if problem is not None:
                        result["degraded"].append(
                            f"{entry['path']}: the work folder of a former inbox: {problem}"
                        )
    except OSError as err:  # nbankd out of descriptors: its folders not looked in now
        limit = errors.process_limit_problem(err, "looking in the inboxes' folders")
        if limit is None:
            raise
        result["degraded"].append(limit)
    alerts = daemon.alerts
    problem = getattr(alerts, "problem", None)
    result["alerts"] = None if alerts is None else {"problem": problem}
    if problem:
        result["degraded"].append(problem)
    metrics = daemon.metrics  # the metrics service, when configured
    textfile_problem = getattr(metrics, "problem", None)
    result["metrics"] = None if metrics is None else {"problem": textfile_problem}
    if textfile_problem:
        result["degraded"].append(textfile_problem)
    result["control_socket"] = str(daemon.config.control_socket)
    result["config"] = str(daemon.config.source)
    auditor = daemon.auditor
    if auditor is not None:
        result.update(auditor.status())
        result["degraded"] += auditor.problems()
    else:
        result.update(last_audit=None, next_audit=None, audit_running=None)
    result["degraded"] = list(dict.fromkeys(result["degraded"]))  # one limit line
    result["healthy"] = not result["degraded"]
    return result


#: entries a status line or list names at most (the count has them all)
LISTED = 20


def _without_reason(contents: requeue_mod.RejectedContents) -> str:
    """What a rejected folder's status line adds for entries without a ``NAME.reason``
    (removed by a person, or put there): how many, and the first ones' names."""
    if not contents.unexplained:
        return ""
    shown = ", ".join(printable(str(p)) for p in contents.unexplained[:3])
    more = ", ..." if len(contents.unexplained) > 3 else ""
    return (
        f" ({len(contents.unexplained)} without a .reason file beside it: {shown}{more}; "
        "nbankctl explain FILE says what the journal recorded; requeue it, or move it out)"
    )


def _unreadable(contents: requeue_mod.RejectedContents) -> list[dict[str, str]]:
    shown = [{"path": str(p), "error": why} for p, why in contents.unreadable]
    shown += [
        {"path": str(p), "error": f"a {noun}, not a folder: never followed"}
        for p, noun in contents.not_folders
    ]
    return shown[:LISTED]


def _not_folder_line(inbox: str, folder: str, path: Path, noun: str) -> str:
    """The status line for a link or file in the place of the rejected folder
    ``folder`` (or of a folder on the way to it): never followed."""
    if str(path) != folder:
        return (
            f"{printable(str(path))} on the way to the rejected folder {printable(folder)} "
            f"of {inbox} is a {noun}, not a folder: nbankd never follows it; make it a "
            "plain folder again"
        )
    return (
        f"the rejected folder {printable(folder)} of {inbox} is a {noun}, not a folder: "
        "nbankd never follows it, nor counts or tells what is behind it; put the original "
        "rejected folder back, or move this aside and restart nbankd (which makes a new one)"
    )


def _unreadable_lines(inbox: str, folder: str, contents: requeue_mod.RejectedContents) -> list[str]:
    """One status line per folder of a rejected folder that could not be listed: what
    is in it is not counted (never taken for empty)."""
    lines = [_not_folder_line(inbox, folder, path, noun) for path, noun in contents.not_folders]
    for path, why in contents.unreadable:
        where = (
            f"the rejected folder {printable(str(path))}"
            if str(path) == folder
            else f"{printable(str(path))} in the rejected folder {printable(folder)}"
        )
        lines.append(
            f"{where} of {inbox} cannot be listed ({why}): the rejected inputs in it are "
            "not counted nor told; give nbankd's user read and search access to it"
        )
    return lines


def _earlier_rejected(
    inbox: InboxConfig,
) -> list[tuple[dict[str, Any], requeue_mod.RejectedContents]]:
    """Each earlier rejected folder of ``inbox`` still there (``rejected_dir`` changed
    since it was used): its path, what waits in it and whether it is empty (another
    rejected folder nested in it aside), with what it holds."""
    out = []
    nested = {str(inbox.path / d) for d in inbox.rejected_dirs}
    for folder in inbox.earlier_rejected_dirs:
        path = inbox.path / folder
        try:
            fd = os.open(path, DIR_NOFOLLOW)  # a link in its place: never looked through
            try:
                with os.scandir(fd) as entries:
                    empty = all(str(path / e.name) in nested for e in entries)
            finally:
                os.close(fd)
        except OSError:  # cannot be looked in: not known to be empty
            empty = False
        held = requeue_mod.rejected_contents(inbox, folder)
        count = len(held.entries)
        out.append(({"path": str(path), "rejected_inputs": count, "empty": empty}, held))
    return out


__all__ = ["LISTED", "status"]
