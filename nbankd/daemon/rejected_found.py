"""Rejection reasons nbankd wrote, and the inputs they explain, found outside the
rejected folders: a rejected folder a person renamed (``rejected`` to ``rejected-old``)
or moved within the inbox is an ordinary folder of it for the scans, which would
deposit its ``NAME.reason`` files, and the rejected inputs beside them, as fresh data.
A scan holds them instead (:func:`not_rejected_inputs`): a ``NAME.reason`` is
recognised by its content (a JSON object with the code, original path and rejected
path of a rejection, read bounded and without following a link), and an input by such
a reason beside it under the name rejection gives it.

Anyone who can write the inbox can put such a file there, so one is taken for
nbankd's only when it is plausibly nbankd's (:func:`_nbankds`): its rejected path lies
in a rejected folder of the inbox (current or earlier, as ``rejected_dirs.json``
records them), or the journal has the rejection; when the journal cannot tell (it
began after the reason's time, or it cannot be read), it is held too, rather than a
real rejected input being deposited. Any other is an ordinary file, deposited like the
input beside it. Whatever is held is counted and named in ``nbankctl status``
(``InboxState.held_for_reason``, from the scan: status walks nothing). Moving both back
into the rejected folder (then ``nbankctl requeue``), or deleting the reason, ends the
hold.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.daemon.explain_look import read_reason_below
from nbankd.daemon.view import InboxState
from nbankd.deposit.journal import Journal
from nbankd.deposit.rejection import reason_name
from nbankd.names import REASON_SUFFIX, printable
from nbankd.watch import settle

log = structlog.get_logger("nbankd.daemon")

#: what ``explain`` says of an input held by :func:`not_rejected_inputs`
REJECTED_HELD = settle.Verdict(
    settle.State.SETTLING,
    "a rejected input, not deposited: nbankd's NAME.reason of its rejection is beside it "
    "(its rejected folder renamed or moved by someone); move it back into the rejected "
    "folder and requeue it, or delete its NAME.reason to have it deposited",
)
REASON_HELD = settle.Verdict(
    settle.State.SETTLING,
    "nbankd's reason for a rejection (its rejected folder renamed or moved by someone), "
    "never deposited: move it back into the rejected folder, or delete it",
)
_KEYS = ("code", "original_path", "rejected_path")


def _reason_at(inbox: Path, rel: str) -> dict[str, Any] | None:
    """The ``NAME.reason`` at ``rel`` in ``inbox`` when it has the shape of one nbankd
    writes: a small regular file (reached without following a link) holding a JSON
    object with the code, the original path and the rejected path of a rejection."""
    reason = read_reason_below(inbox, rel)
    if reason is None or not all(isinstance(reason.get(k), str) for k in _KEYS):
        return None
    return reason


def _in_rejected_folder(state: InboxState, path: str) -> bool:
    """Whether ``path`` lies in a rejected folder of the inbox, current or earlier."""
    inbox = state.config.path
    rel = os.path.relpath(path, inbox) if os.path.isabs(path) else ".."
    if rel == ".." or rel.startswith("../"):
        return False
    return state.config.rejected_dir_of(os.path.normpath(rel)) is not None


def _journal_cannot_tell(journal: Journal, reason: dict[str, Any]) -> bool:
    """Whether the journal could hold no record of this rejection: it began after the
    reason's time (a state_dir lost or replaced), or the reason gives no time."""
    try:
        when = datetime.fromisoformat(str(reason.get("time"))).timestamp()
    except (ValueError, OverflowError, OSError):
        return True
    first = journal.get(1)  # items are never deleted: the first is the oldest
    return first is None or when < int(first.created)


def _journal_has(journal: Journal, key: str, state: InboxState, reason: dict[str, Any]) -> bool:
    """Whether the journal has this rejection: an input of the inbox still rejected
    under the name the reason gives it (its path below the rejected folder, or at its
    top, where a rejection goes that cannot reach the sub-folder)."""
    rejected, original = reason["rejected_path"], reason["original_path"]
    name = os.path.basename(rejected)
    tails = {name}
    orel = os.path.relpath(original, state.config.path) if os.path.isabs(original) else ".."
    if orel != ".." and not orel.startswith("../"):
        tails.add(os.path.join(os.path.dirname(orel), name))
    try:
        wanted = [os.fsencode(tail) for tail in sorted(tails)]
        orel_b = os.fsencode(orel)
    except UnicodeError:  # a surrogate no file name gives: never a path nbankd wrote
        return False
    for tail in wanted:
        item = journal.find_rejected(key, tail)
        if item is None:
            continue
        if item.relpath == orel_b or _rejected_path(item.reason_json) == rejected:
            return True
    return False


def _rejected_path(reason_json: str | None) -> Any:
    try:
        return json.loads(reason_json or "{}").get("rejected_path")
    except (ValueError, AttributeError, RecursionError):
        return None


def _nbankds(journal: Journal, key: str, state: InboxState) -> Callable[[str], bool]:
    """Whether the reason at a relative path is plausibly one nbankd wrote for a
    rejection of this inbox (see the module's text); each path read once per scan."""
    seen: dict[str, bool] = {}

    def plausible(reason: dict[str, Any]) -> bool:
        if _in_rejected_folder(state, reason["rejected_path"]):
            return True
        try:
            return _journal_cannot_tell(journal, reason) or _journal_has(
                journal, key, state, reason
            )
        except (sqlite3.Error, errors.NbankdError):  # the journal unreadable: held
            return True

    def check(rel: str) -> bool:
        if rel not in seen:
            reason = _reason_at(state.config.path, rel)
            seen[rel] = reason is not None and plausible(reason)
        return seen[rel]

    return check


def not_rejected_inputs(
    key: str, state: InboxState, ready: list[Any], before: Any, journal: Journal
) -> list[Any]:
    """``ready`` but the rejection reasons nbankd wrote and the inputs they explain,
    found outside the rejected folders (a rejected folder renamed or moved by a person:
    it is no longer excluded): those are never deposited as fresh data; their verdict
    says why, each is logged once, and the inputs are kept in
    ``state.held_for_reason`` for status."""
    nbankds = _nbankds(journal, key, state)
    out = []
    held = []
    for e in ready:
        rel = e.relpath
        if rel.endswith(REASON_SUFFIX) and nbankds(rel):
            verdict = REASON_HELD
        else:
            name = os.fsdecode(reason_name(os.fsencode(os.path.basename(rel))))
            if not nbankds(os.path.join(os.path.dirname(rel), name)):
                out.append(e)
                continue
            verdict = REJECTED_HELD
            held.append(rel)
        state.verdicts[rel] = verdict
        if before.get(rel) is not verdict:
            log.warning(
                "a rejected input, or its reason, outside the rejected folder is not "
                "deposited (its folder renamed or moved?)",
                inbox=key,
                source=printable(rel),
            )
    state.held_for_reason = tuple(sorted(held))
    return out


__all__ = ["REASON_HELD", "REJECTED_HELD", "not_rejected_inputs"]
