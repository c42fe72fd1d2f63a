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
when a scan sees the file again (the caller asks for a rescan). An input the journal
has no record of goes back only into the existing folder it mirrors, whatever its
reason says (:func:`_unrecorded_destination`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors, seams
from nbankd.archive import fsops
from nbankd.config import InboxConfig
from nbankd.daemon import rejected_dirs
from nbankd.daemon.explain import (
    in_rejected,
    locate,
    reason_for,
    rejected_folder_for,
    rejected_item,
)
from nbankd.daemon.rejected_listing import RejectedContents, rejected_contents
from nbankd.deposit.inboxfs import Escape, InboxFS
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State
from nbankd.deposit.rejection import reason_name
from nbankd.deposit.spec import InboxSpec
from nbankd.names import (
    MARKER_SUFFIX,
    SIDECAR_SUFFIXES,
    WORK_DIR_NAME,
    printable,
)
from nbankd.smallfile import SmallFileError, read_regular

log = structlog.get_logger("nbankd.daemon")

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


#: the plan of the one requeue under way, in state_dir, in earlier releases: read at
#: start (an upgrade), and renamed to its inbox's record while that inbox is not
#: configured
LEGACY_RECORD_NAME = "requeue.json"
RECORD_PREFIX = "requeue-"


def record_path(state_dir: Path, inbox: str) -> Path:
    """Where the plan of a requeue into ``inbox`` is written while it runs (see
    :func:`recover`): one record per inbox, so that a record kept for an inbox the
    configuration leaves out is never replaced by a requeue elsewhere."""
    digest = hashlib.sha256(os.fsencode(inbox)).hexdigest()[:32]
    return state_dir / f"{RECORD_PREFIX}{digest}.json"


def _rel(path: Path, folder: Path) -> bytes:
    return os.fsencode(os.path.relpath(path, folder))


def _identity(st: os.stat_result) -> list[int]:
    """What a move keeps of an entry, to know it again: device, inode (a number the
    filesystem may give a new file once the entry is deleted), size and mtime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _write_record(record: Path, p: Plan, fs: InboxFS) -> None:
    """The plan, with the identity of each entry to move, written durably."""
    moves = []
    for src, dst in p.moves:
        folder, name = fs.rejected_parent(_rel(src, p.rejected_dir))
        st = fs.lstat(folder, name)
        if st is None:
            raise NothingToRequeue(f"{printable(str(src))} is gone (already requeued?)")
        moves.append(
            {
                "from": os.fsdecode(_rel(src, p.rejected_dir)),
                "to": os.fsdecode(_rel(dst, p.root)),
                "id": _identity(st),
            }
        )
    reason = None if p.reason_file is None else os.fsdecode(_rel(p.reason_file, p.rejected_dir))
    data = {"inbox": p.inbox, "moves": moves, "reason": reason, "rejected_dir": p.rejected_rel}
    fsops.write_atomic(record, json.dumps(data).encode(), mode=0o600)


@dataclass
class Recovery:
    """What :func:`recover` did (``done``) and could not do (``failed``), in words."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def log(self) -> None:
        for outcome in self.done:
            log.warning("requeue interrupted", outcome=outcome)
        for problem in self.failed:
            log.error("an interrupted requeue could not be recovered", error=problem)


def recover(
    state_dir: Path, specs: Mapping[str, InboxSpec], keys: Collection[str] | None = None
) -> Recovery:
    """Finishes or undoes each requeue a crash stopped half way (its record in
    ``state_dir``) into one of the configured inboxes (``specs``; only those named in
    ``keys``, when given): when the input went back, its reason file is removed (the
    requeue was done); otherwise what went back before it (sidecar, marker) returns
    to the rejected folder, so that no new file of the input's name takes it for its
    own. Only entries still the ones recorded (:func:`_identity`) are moved; a record
    whose recovery fails (its inbox's folders replaced, a move refused) is kept for the
    next try (the next start, or a requeue into that inbox), its problem in ``failed``.

    Records are kept per inbox (:func:`record_path`): the record of an inbox not
    configured now stays until the inbox is, whatever requeues run elsewhere
    meanwhile; the single record of an older release (``requeue.json``) is read too,
    and renamed to its inbox's record when that inbox is not configured."""
    with _LOCK:
        return _recover_locked(state_dir, specs, keys)


def _recover_locked(
    state_dir: Path, specs: Mapping[str, InboxSpec], keys: Collection[str] | None = None
) -> Recovery:
    result = Recovery()
    records = [state_dir / LEGACY_RECORD_NAME]
    if keys is None:
        records += sorted(p for p in _listing(state_dir) if _is_record(p.name))
    else:  # only theirs: a record of another inbox is left as it is
        records += [record_path(state_dir, key) for key in sorted(keys)]
    for record in records:
        try:  # one entry that cannot be handled never stops the others' recovery
            _recover_record(state_dir, specs, keys, record, result)
        except OSError as err:
            result.failed.append(
                f"the requeue record {printable(str(record))} could not be handled "
                f"({err.strerror or err}); it is left as it is"
            )
    return result


def _recover_record(
    state_dir: Path,
    specs: Mapping[str, InboxSpec],
    keys: Collection[str] | None,
    record: Path,
    result: Recovery,
) -> None:
    """Recovers the requeue ``record`` lists (see :func:`recover`), saying in ``result``
    what it did or could not do."""
    try:
        key, moves, reason, folder = _read_record(record)
    except _NotARecord as err:  # a FIFO, folder, device or link: never opened
        result.failed.append(
            f"{printable(str(record))} is {err}, not a requeue record; it is left "
            "as it is (remove it)"
        )
        return
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as err:
        record.unlink(missing_ok=True)
        result.done.append(f"an unreadable requeue record was removed ({err})")
        return
    spec = specs.get(key)
    if spec is None:
        if record.name == LEGACY_RECORD_NAME:
            record = _adopt_legacy(record, record_path(state_dir, key))
        if keys is None:
            result.done.append(
                f"a requeue into {key} was stopped half way; that inbox is not "
                f"configured now: its record {record} is kept, and the requeue is "
                "finished or undone when the inbox is configured again (if it never "
                "is, move back by hand what the record lists, then delete it)"
            )
        return
    if keys is not None and key not in keys:
        return
    try:
        if moves:
            result.done.append(_recover_one(spec, key, moves, reason, folder))
    except (errors.NbankdError, OSError) as err:
        why = err.strerror or err if isinstance(err, OSError) else err
        result.failed.append(f"a requeue into {key} (record {record}): {why}")
        return
    record.unlink(missing_ok=True)


#: the most a requeue record is read of (a few moves)
_RECORD_LIMIT = 1 << 20


class _NotARecord(Exception):
    """What stands at a record's name is no regular file (its noun in the message)."""


def _read_record(record: Path) -> tuple[str, list[dict[str, Any]], str | None, str | None]:
    """The inbox, moves, reason file and rejected folder a record lists; ValueError
    when it is not a record requeue wrote. The rejected folder (relative to the inbox)
    is the one the input was taken from; absent from older records: None, the inbox's
    rejected folder."""
    try:
        if stat.S_ISLNK(os.lstat(record).st_mode):
            raise _NotARecord("a symbolic link")
        raw, _ = read_regular(record, _RECORD_LIMIT)
    except SmallFileError as err:
        if err.reason == "missing":
            raise FileNotFoundError(err.errno, err.strerror, str(record)) from None
        if err.reason == "not-regular":
            raise _NotARecord(err.noun) from None
        if err.reason == "too-large":
            raise ValueError(f"larger than {_RECORD_LIMIT >> 10} KiB") from None
        raise OSError(err.errno, err.strerror or err.reason, str(record)) from None
    data = json.loads(raw)
    key, moves, reason = data["inbox"], data["moves"], data.get("reason")
    folder = data.get("rejected_dir")
    if folder is not None and not rejected_dirs.valid(folder):
        raise ValueError(f"{folder!r} is no rejected folder inside the inbox")
    good = isinstance(key, str) and isinstance(moves, list) and isinstance(reason, str | None)
    for move in moves if good else ():
        good = good and isinstance(move, dict) and isinstance(move.get("id"), list)
        good = good and all(isinstance(move.get(k), str) for k in ("from", "to"))
    if not good:
        raise ValueError("not a requeue record")
    return key, moves, reason, folder


def _listing(state_dir: Path) -> list[Path]:
    try:
        return list(state_dir.iterdir())
    except FileNotFoundError:
        return []


def _is_record(name: str) -> bool:
    return name.startswith(RECORD_PREFIX) and name.endswith(".json")


def _adopt_legacy(legacy: Path, record: Path) -> Path:
    """Renames the single record of an older release to its inbox's record, never
    over one there (then, or when it cannot be renamed, it stays where it is, read
    again at each start); returns where it is now."""
    try:
        os.link(legacy, record)
    except OSError:
        return legacy
    legacy.unlink()
    fsops.fsync_dir(legacy.parent)
    return record


def _recover_one(
    spec: InboxSpec, key: str, moves: list[dict[str, Any]], reason: Any, folder: str | None
) -> str:
    """Finishes or undoes one stopped requeue into inbox ``key``, taken from its
    rejected folder ``folder`` (None: the inbox's rejected folder now)."""
    with spec.open_fs(rejected=folder) as fs:
        fs.work  # noqa: B018 - the inbox folder is the daemon's (opening it is the check)
        fs.rejected  # noqa: B018

        def back(move: dict[str, Any]) -> bool:
            try:
                st = fs.lstat(*fs.parent(os.fsencode(move["to"])))
            except (FileNotFoundError, NotADirectoryError, Escape):
                return False
            return st is not None and _identity(st) == move["id"]

        if back(moves[-1]):  # the input went back: the requeue was done
            if reason is not None:
                fs.unlink(*fs.rejected_parent(os.fsencode(reason)))
            return f"a requeue into {key} stopped after its input moved back; finished"
        for move in moves[:-1]:
            if back(move):
                src = fs.rejected_parent(os.fsencode(move["from"]))
                with contextlib.suppress(FileExistsError):
                    fs.move(*fs.parent(os.fsencode(move["to"])), *src)
        return (
            f"a requeue into {key} stopped before its input moved back; what had "
            "moved is back in the rejected folder (requeue it again)"
        )


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
    "NothingToRequeue",
    "Plan",
    "Recovery",
    "RejectedContents",
    "RequeueConflict",
    "RequeueFailed",
    "apply",
    "plan",
    "record_path",
    "recover",
    "rejected_contents",
    "rejected_inputs",
    "requeue",
    "requeue_all",
]
