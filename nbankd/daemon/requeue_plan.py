"""Deciding what a requeue moves (:func:`plan`), and what every part of a requeue
shares: the errors that say nothing moved, and the lock that lets one requeue run at a
time. An input the journal has no record of goes back only into the existing folder it
mirrors, whatever its reason says (:func:`_unrecorded_destination`). Nothing here moves
a file: :mod:`nbankd.daemon.requeue` carries a plan out.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.config import InboxConfig
from nbankd.daemon.explain import (
    in_rejected,
    locate,
    reason_for,
    rejected_folder_for,
    rejected_item,
)
from nbankd.deposit.lifecycle import State
from nbankd.deposit.rejection import reason_name
from nbankd.names import (
    MARKER_SUFFIX,
    SIDECAR_SUFFIXES,
    WORK_DIR_NAME,
    printable,
)

_LOCK = threading.Lock()  # one requeue at a time: two would race for the same names


class NothingToRequeue(errors.NbankdError):
    """The path names no rejected input that is still in a rejected folder."""

    code = "not-found"
    exit_code = errors.EXIT_USAGE


class RequeueConflict(errors.NbankdError):
    """Moving back would overwrite something, or the input is being deposited."""

    code = "conflict"
    exit_code = errors.EXIT_PROBLEMS


@dataclass(frozen=True)
class Plan:
    inbox: str
    rejected: Path  # the rejected input
    original: Path  # where it goes back to
    reason_file: Path | None
    moves: tuple[tuple[Path, Path], ...]  # (from, to), input last
    token: str | None = None
    reason: dict[str, Any] = field(default_factory=dict)
    root: Path = Path("/")  # the inbox folder
    rejected_dir: Path = Path("/")  # its rejected folder (current, or an earlier one)
    #: whether folders missing on the way to ``original`` are made (only for an input
    #: the journal records: see :func:`_unrecorded_destination`)
    make_folders: bool = True

    @property
    def rejected_rel(self) -> str:
        """The rejected folder relative to the inbox folder."""
        return os.path.relpath(self.rejected_dir, self.root)


def plan(path: str | os.PathLike[str], configs: Mapping[str, InboxConfig], journal: Any) -> Plan:
    """Decides what to move for ``path`` (rejected or original); moves nothing."""
    text = os.path.abspath(os.fspath(path))
    where = locate(text, configs)
    if where is None:
        raise NothingToRequeue(f"{printable(text)} is not in any inbox")
    key, rel = where
    config = configs[key]
    found = in_rejected(config, rel)  # the rejected folder, or an earlier one still there
    if found is not None and found[1] != "":
        folder, rrel = found
        input_rel, item, reason = rejected_item(key, config, rrel, journal, folder)
    elif found is None and rel:
        relb = os.fsencode(rel)
        if journal.active_for(key, relb) is not None:
            raise RequeueConflict(f"{printable(text)} is being deposited right now")
        item = journal.latest_for(key, relb)
        if item is None or item.state is not State.REJECTED or item.rejected_relpath is None:
            if item is not None and item.state is State.DONE:
                what = f"was deposited as {item.name}, not rejected"
            else:
                what = "was not rejected"
            raise NothingToRequeue(f"{printable(text)} {what}; nothing to requeue")
        input_rel = os.fsdecode(item.rejected_relpath)
        folder = rejected_folder_for(config, item)
        reason = reason_for(config, input_rel, item, folder)
    else:
        raise NothingToRequeue(f"{printable(text)} is a folder, not a rejected input")
    rejected = folder / input_rel
    if not os.path.lexists(rejected):
        raise NothingToRequeue(
            f"{printable(str(rejected))} is not in the rejected folder (already requeued?)"
        )
    if item is not None:
        original_rel = item.relpath_str
    else:  # no record: where the input sits decides, never what its reason says
        original_rel = _unrecorded_destination(key, config, rejected, input_rel, reason)
    top = original_rel.split("/")[0]
    if top == WORK_DIR_NAME or in_rejected(config, original_rel) is not None:
        raise NothingToRequeue(f"{printable(original_rel)} is no place to requeue to")
    original = config.path / original_rel
    moves: list[tuple[Path, Path]] = []
    # NAME.done is a marker only where markers say a file is ready; elsewhere it is an
    # input of its own (perhaps rejected too), never moved with NAME
    markers = (MARKER_SUFFIX,) if config.ready == "marker" else ()
    for suffix in (*SIDECAR_SUFFIXES, *markers):
        side = rejected.with_name(rejected.name + suffix)
        if os.path.lexists(side):
            moves.append((side, original.with_name(original.name + suffix)))
    moves.append((rejected, original))
    taken = [dst for _, dst in moves if os.path.lexists(dst)]
    if taken:
        names = ", ".join(printable(str(t)) for t in taken)
        raise RequeueConflict(
            f"cannot requeue {printable(str(rejected))}: {names} already exists in the inbox; "
            "nothing was moved",
            hint="rename or remove what is in the way, then requeue again",
        )
    base = os.fsencode(rejected.name)
    reason_file = rejected.parent / os.fsdecode(reason_name(base))
    return Plan(
        inbox=key,
        rejected=rejected,
        original=original,
        reason_file=reason_file if os.path.lexists(reason_file) else None,
        moves=tuple(moves),
        token=item.token if item is not None else None,
        reason=dict(reason or {}),
        root=config.path,
        rejected_dir=folder,
        make_folders=item is not None,
    )


def _unrecorded_destination(
    key: str, config: InboxConfig, rejected: Path, input_rel: str, reason: Mapping[str, Any] | None
) -> str:
    """Where an input the journal has no record of (a state_dir lost, or a file someone
    put in the rejected folder with a ``.reason`` of their own) goes back: into the
    inbox's folder that the one it sits in mirrors (``rejected/a/b.wav``: ``a/``), which
    must exist (never made for it), under the original name its reason gives (undoing
    a ``~N`` rename) when that reason names this same folder. A reason naming another
    folder, or none, is refused: a reason file is not evidence of where a file was.
    But for an input at the top of the rejected folder whose reason was written for
    that very place (its ``rejected_path``): one whose sub-folder there was blocked
    (a file or link in its place) is put at the top, so its reason names the folder
    it came from, which must exist too (an inbox writer could move it there anyway)."""
    said = str(reason.get("original_path") or "") if reason else ""
    if not said:
        raise NothingToRequeue(f"nothing records where {printable(str(rejected))} came from")
    back = locate(said, {key: config})
    mirror = os.path.dirname(input_rel)
    top = mirror == "" and reason is not None and reason.get("rejected_path") == str(rejected)
    if top and back is not None and back[1]:  # put at the top: its sub-folder was blocked
        mirror = os.path.dirname(back[1])
    if back is None or not back[1] or os.path.dirname(back[1]) != mirror:
        where = printable(str(config.path / mirror))
        raise NothingToRequeue(
            f"nbankd has no record of rejecting {printable(str(rejected))} (a lost "
            f"state_dir, or a file put there), and its reason names {printable(said)}, "
            f"not a file in {where}, the folder it mirrors; nothing was moved",
            hint="if it belongs in the inbox, move it there yourself",
        )
    st = _lstat(config.path / mirror)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise NothingToRequeue(
            f"nbankd has no record of rejecting {printable(str(rejected))} (a lost "
            f"state_dir, or a file put there), and {printable(str(config.path / mirror))} "
            "is not a folder of the inbox: nbankd makes no folder for it; nothing was moved",
            hint="make the folder, then requeue again",
        )
    return back[1]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


__all__ = [
    "NothingToRequeue",
    "Plan",
    "RequeueConflict",
    "plan",
]
