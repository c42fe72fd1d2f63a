"""Moving a rejected input back into its inbox (``nbankctl requeue``).

A requeue takes the rejected path or the original path of an input. It moves
the input -- and its sidecar and ``.done`` marker when they are in the rejected
folder next to it (including a sidecar a person put there to fix the cause) --
back to where it was in the inbox, then deletes ``NAME.reason``:

- nothing is ever overwritten: when a destination name is taken, nothing moves
  and the answer says which name is in the way;
- files move with ``link()`` + ``unlink()``, folders with
  ``renameat2(RENAME_NOREPLACE)``; both folders are fsynced after each move,
  and the reason file is deleted only once every move is durable, so a crash
  leaves the input in exactly one place, still explained;
- sidecar and marker move first and the input last, so a scan never sees the
  input back without them.

The journal row stays ``rejected`` (it is history); the daemon makes a new item
when a scan sees the file again (the caller asks for a rescan).

What to move is decided in :mod:`nbankd.daemon.requeue_plan` (an input the journal
has no record of goes back only into the existing folder it mirrors, whatever its
reason says); the record that lets a requeue a crash stopped half way be finished or
undone, and that recovery, are in :mod:`nbankd.daemon.requeue_recovery`. This module
carries a plan out, and requeues one input or all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nbankd import errors, seams
from nbankd.archive import fsops
from nbankd.config import InboxConfig
from nbankd.daemon.rejected_listing import RejectedContents, rejected_contents
from nbankd.daemon.requeue_plan import _LOCK, Plan, RequeueConflict, plan
from nbankd.daemon.requeue_recovery import (
    LEGACY_RECORD_NAME,
    _recover_locked,
    _rel,
    _write_record,
    record_path,
)
from nbankd.deposit.inboxfs import InboxFS
from nbankd.deposit.journal import Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.names import printable


class RequeueFailed(errors.NbankdError):
    """A move of the requeue failed (the filesystem refused it); what had moved went back."""

    code = "requeue-failed"
    exit_code = errors.EXIT_PROBLEMS


def apply(p: Plan, spec: InboxSpec, record: Path | None = None) -> dict[str, Any]:
    """Carries out a plan; returns what was moved (JSON-safe).

    Every folder is reached from the inbox folder without following a link (see
    :mod:`nbankd.deposit.inboxfs`), and the inbox is the one the daemon prepared:
    its work folder and its rejected folder are checked against what was recorded
    at start (``spec``), so an inbox or rejected folder swapped for a link or
    another folder stops the requeue, naming it, and nothing is moved through it.
    An earlier rejected folder (``rejected_dir`` changed since) has no recorded
    identity: it must be a real folder on the inbox's filesystem, reached from the
    inbox folder without a link.
    When a move fails (a name taken meanwhile, a filesystem error), what had already
    moved (sidecar, marker) goes back to the rejected folder: it never stays in the
    inbox beside another file. ``record``: where the plan is written (durably) before
    the first move and removed after the last, so that a requeue a crash stopped half
    way is undone at the next start (:func:`recover`).
    """
    done: list[list[str]] = []
    with spec.open_fs(rejected=p.rejected_rel) as fs:
        fs.work  # noqa: B018 - the inbox folder is the daemon's (opening it is the check)
        fs.rejected  # noqa: B018
        if record is not None:  # before the first move: a crash between moves is undone
            _write_record(record, p, fs)
        moved: list[tuple[tuple[int, bytes], tuple[int, bytes]]] = []
        for src, dst in p.moves:
            src_at = fs.rejected_parent(_rel(src, p.rejected_dir))
            try:
                dst_at = fs.parent(_rel(dst, p.root), create=p.make_folders)
                fs.move(*src_at, *dst_at)
            except OSError as err:
                back = _undo(fs, moved)
                if isinstance(err, FileExistsError):
                    raise RequeueConflict(
                        f"{printable(str(dst))} appeared while requeueing "
                        f"{printable(str(p.rejected))}; {back}",
                        hint="rename or remove what is in the way, then requeue again",
                    ) from None
                raise RequeueFailed(
                    f"cannot move {printable(str(src))} to {printable(str(dst))}: "
                    f"{err.strerror or err}; {back}",
                    hint="fix the cause (permissions, space, an immutable file), then "
                    "requeue again",
                ) from None
            moved.append((src_at, dst_at))
            done.append([str(src), str(dst)])
            if (src, dst) != p.moves[-1]:
                seams.reached("requeue-side-moved")
        if p.reason_file is not None:  # only now that every move is durable
            folder, name = fs.rejected_parent(_rel(p.reason_file, p.rejected_dir))
            if fs.unlink(folder, name):
                fsops.fsync_fd(folder)
    if record is not None:
        record.unlink(missing_ok=True)  # a crash before this: the recovery finds it done
    return {
        "inbox": p.inbox,
        "rejected_path": str(p.rejected),
        "requeued": str(p.original),
        "moved": done,
        "token": p.token,
        "code": p.reason.get("code"),
    }


def _undo(fs: InboxFS, moved: list[tuple[tuple[int, bytes], tuple[int, bytes]]]) -> str:
    """Moves what a stopped requeue had moved back into the rejected folder; says
    where everything is."""
    stuck: list[str] = []
    for src_at, dst_at in reversed(moved):
        try:
            fs.move(*dst_at, *src_at)
        except OSError as err:
            stuck.append(f"{printable(os.fsdecode(dst_at[1]))} ({err.strerror or err})")
    if stuck:
        return (
            "these stayed in the inbox and could not go back to the rejected folder: "
            + ", ".join(stuck)
        )
    return "nothing was moved (all of it is still in the rejected folder)"


def requeue(
    path: str | os.PathLike[str], specs: Mapping[str, InboxSpec], journal: Journal
) -> dict[str, Any]:
    """Moves one rejected input back into its inbox; see the module docstring."""
    configs = {key: spec.config for key, spec in specs.items()}
    state_dir = journal.path.parent
    with _LOCK:
        p = plan(path, configs, journal)
        record = record_path(state_dir, p.inbox)
        legacy = state_dir / LEGACY_RECORD_NAME
        if os.path.lexists(record) or os.path.lexists(legacy):  # left by an earlier one
            recovery = _recover_locked(state_dir, specs, {p.inbox})
            recovery.log()
            if recovery.failed:
                raise RequeueFailed(
                    f"an earlier requeue into {p.inbox} stopped half way and could not be "
                    f"finished or undone: {'; '.join(recovery.failed)}; nothing was moved",
                    hint="fix the cause, then requeue again",
                )
            p = plan(path, configs, journal)  # what that put back is moved with the input
        return apply(p, specs[p.inbox], record)


def rejected_inputs(config: InboxConfig, folder: str | None = None) -> Iterator[Path]:
    """Every input sitting in the inbox's rejected folder ``folder`` (relative to the
    inbox), one per ``NAME.reason``; without ``folder``, in the rejected folder and
    then in each earlier one still there (see :func:`rejected_contents`)."""
    yield from rejected_contents(config, folder).inputs


def requeue_all(
    specs: Mapping[str, InboxSpec], journal: Journal, *, inbox: str | None = None
) -> dict[str, Any]:
    """Requeues every rejected input (of one inbox, or all); failures do not stop the rest."""
    requeued: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for key, spec in specs.items():
        if inbox is not None and key != inbox:
            continue
        for target in list(rejected_inputs(spec.config)):
            try:
                requeued.append(requeue(target, specs, journal))
            except errors.NbankdError as err:
                failed.append({"path": str(target), "code": err.code, "message": str(err)})
            except OSError as err:  # a folder on the way could not be read or made
                message = f"{printable(str(target))}: {err.strerror or err}"
                failed.append({"path": str(target), "code": "io-error", "message": message})
    return {"requeued": requeued, "failed": failed}


__all__ = [
    "RejectedContents",
    "RequeueFailed",
    "apply",
    "rejected_contents",
    "rejected_inputs",
    "requeue",
    "requeue_all",
]
