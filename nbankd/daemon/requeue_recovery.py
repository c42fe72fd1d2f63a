"""The record of a requeue under way, and recovering from it.

:func:`nbankd.daemon.requeue.apply` writes the plan, with the identity of each entry it
moves, to a record in ``state_dir`` (one per inbox: :func:`record_path`) before the
first move and removes it after the last; :func:`recover` finishes or undoes each
requeue a crash stopped half way, at the next start or before the next requeue into
that inbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.archive import fsops
from nbankd.daemon import rejected_dirs
from nbankd.daemon.requeue_plan import _LOCK, NothingToRequeue, Plan
from nbankd.deposit.inboxfs import Escape, InboxFS
from nbankd.deposit.spec import InboxSpec
from nbankd.names import printable
from nbankd.smallfile import SmallFileError, read_regular

log = structlog.get_logger("nbankd.daemon")


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


__all__ = [
    "LEGACY_RECORD_NAME",
    "RECORD_PREFIX",
    "Recovery",
    "record_path",
    "recover",
]
