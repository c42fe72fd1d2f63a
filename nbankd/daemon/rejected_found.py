"""Rejection reasons nbankd wrote, and the inputs they explain, found outside the
rejected folders: a rejected folder a person renamed (``rejected`` to ``rejected-old``)
or moved within the inbox is an ordinary folder of it for the scans, which would
deposit its ``NAME.reason`` files, and the rejected inputs beside them, as fresh data.
A scan holds them instead (:func:`not_rejected_inputs`): a ``NAME.reason`` is
recognised by its content (a JSON object with the code, original path and rejected
path of a rejection, read bounded and without following a link), and an input by such
a reason beside it under the name rejection gives it. Moving them back into the
rejected folder (then ``nbankctl requeue``), or deleting the reason, ends the hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from nbankd.daemon.explain_look import read_reason_below
from nbankd.daemon.view import InboxState
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


def _is_reason(inbox: Path, rel: str) -> bool:
    """Whether ``rel`` in ``inbox`` is a ``NAME.reason`` nbankd wrote: a small regular
    file (reached without following a link) holding a JSON object with the code, the
    original path and the rejected path of a rejection."""
    reason = read_reason_below(inbox, rel)
    return reason is not None and all(
        isinstance(reason.get(k), str) for k in ("code", "original_path", "rejected_path")
    )


def not_rejected_inputs(key: str, state: InboxState, ready: list[Any], before: Any) -> list[Any]:
    """``ready`` but the rejection reasons nbankd wrote and the inputs they explain,
    found outside the rejected folders (a rejected folder renamed or moved by a person:
    it is no longer excluded): those are never deposited as fresh data; their verdict
    says why, and each is logged once."""
    inbox = state.config.path
    out = []
    for e in ready:
        rel = e.relpath
        if rel.endswith(REASON_SUFFIX) and _is_reason(inbox, rel):
            verdict = REASON_HELD
        else:
            name = os.fsdecode(reason_name(os.fsencode(os.path.basename(rel))))
            beside = os.path.join(os.path.dirname(rel), name)
            if not _is_reason(inbox, beside):
                out.append(e)
                continue
            verdict = REJECTED_HELD
        state.verdicts[rel] = verdict
        if before.get(rel) is not verdict:
            log.warning(
                "a rejected input, or its reason, outside the rejected folder is not "
                "deposited (its folder renamed or moved?)",
                inbox=key,
                source=printable(rel),
            )
    return out


__all__ = ["REASON_HELD", "REJECTED_HELD", "not_rejected_inputs"]
