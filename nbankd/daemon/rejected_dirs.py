"""Every rejected folder each inbox has used, kept in ``state_dir/rejected_dirs.json``.

An inbox's rejected folder lies inside the inbox; scans and the watcher leave it
alone. When ``rejected_dir`` changes (a reload, or a restart with an edited file),
the folder used until then would become an ordinary sub-folder of a recursive
inbox: its ``NAME.reason`` files and the rejected inputs beside them would be
deposited as new inputs, without anyone deciding so. The daemon therefore records
every rejected folder it has used for each inbox, and keeps excluding an earlier
one for as long as it exists: ``nbankctl status`` names it while it holds
anything, ``nbankctl requeue`` still takes inputs out of it, and once a person has
removed it, it is forgotten (a folder of that name made later is an ordinary
folder again).

The file maps inbox paths to folder paths relative to the inbox (the current
rejected folder included), is written whole or not at all
(:func:`nbankd.archive.fsops.write_atomic`) before a configuration that uses a new
rejected folder is applied, and is read as a small regular file (a link, FIFO or
device put in its place is refused). A state_dir without it (an upgrade) starts
from the folders the journal's rejections went to.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.archive.fsops import write_atomic
from nbankd.deposit.inboxfs import Escape, components
from nbankd.names import REASON_SUFFIX, WORK_DIR_NAME
from nbankd.smallfile import SmallFileError, read_regular

RECORD_NAME = "rejected_dirs.json"
REASON_SUFFIX_B = os.fsencode(REASON_SUFFIX)
#: the most the record is read of (inbox paths and a few folder names each)
_LIMIT = 4 << 20

Record = dict[str, tuple[str, ...]]


class RecordError(errors.NbankdError):
    """The record of the rejected folders cannot be written: a configuration that
    changes a rejected folder is not applied."""

    code = "state"


def load(state_dir: Path) -> tuple[Record, str | None]:
    """(inbox path -> the rejected folders recorded for it, why the record cannot be
    read or None). An absent record holds nothing; entries that are no folder inside
    an inbox (absolute, ``..``, the work folder) are left out."""
    path = state_dir / RECORD_NAME
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return {}, "it is a symbolic link, not a file"
        data, _ = read_regular(path, _LIMIT)
        doc = json.loads(data)
        inboxes = doc["inboxes"]
        if not isinstance(inboxes, dict):
            raise ValueError("'inboxes' is not a mapping of inbox paths")
    except FileNotFoundError:
        return {}, None
    except SmallFileError as err:
        if err.reason == "missing":
            return {}, None
        return {}, _said(err)
    except OSError as err:
        return {}, err.strerror or str(err)
    except (ValueError, KeyError, TypeError) as err:
        return {}, str(err) or type(err).__name__
    record: Record = {}
    for key, folders in inboxes.items():
        if isinstance(key, str) and isinstance(folders, list):
            record[key] = tuple(sorted({f for f in folders if valid(f)}))
    return record, None


def _said(err: SmallFileError) -> str:
    if err.reason == "not-regular":
        return f"it is {err.noun}, not a file"
    if err.reason == "too-large":
        return f"it is larger than {_LIMIT >> 20} MiB"
    return err.strerror or err.reason


def save(state_dir: Path, record: Mapping[str, Iterable[str]]) -> None:
    """Writes ``record`` durably; raises :class:`RecordError` naming the file."""
    path = state_dir / RECORD_NAME
    doc = {"inboxes": {key: sorted(set(folders)) for key, folders in sorted(record.items())}}
    try:
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o640)
    except OSError as err:
        raise RecordError(
            f"cannot record the inboxes' rejected folders in {path}: {err.strerror or err}",
            hint="check that the daemon's user can write its state_dir",
        ) from None


def valid(folder: Any) -> bool:
    """Whether ``folder`` is a normalised folder path inside an inbox (never the
    inbox itself, nor its work folder)."""
    if not isinstance(folder, str) or not folder or folder.startswith("/"):
        return False
    if os.path.normpath(folder) != folder or folder.split("/")[0] in ("..", WORK_DIR_NAME):
        return False
    return folder != "."


def present(inbox: Path, folder: str) -> bool:
    """Whether something still stands at ``folder`` in ``inbox`` (an entry that cannot
    be looked at counts as there: only a removed folder is forgotten)."""
    try:
        os.lstat(inbox / folder)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


#: the most entries :func:`holds_rejection` looks at, and how deep it goes, before it
#: answers "cannot tell" (a rejection is then assumed: the folder stays excluded)
WALK_ENTRIES = 100_000
WALK_DEPTH = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def holds_rejection(inbox: Path, folder: str, skip: Iterable[str] = ()) -> bool:
    """Whether ``folder`` (relative to ``inbox``) still holds a rejection: a
    ``NAME.reason`` file somewhere in it. Walked from descriptors without following a
    link, stopping at the first one; the folders of ``skip`` (other rejected folders
    nested in it, relative to the inbox) are left out. An entry that is no folder is
    no rejected folder (False); one that cannot be read, or a walk past
    :data:`WALK_ENTRIES` entries or :data:`WALK_DEPTH` levels, counts as holding one
    (kept out: a rejected input is never taken for a new one on a guess)."""
    skipped = {os.fsencode(s) for s in skip}
    try:
        top = os.open(inbox / folder, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        return err.errno != errno.ELOOP  # a link in its place is no folder of the inbox
    seen = 0
    stack: list[tuple[int, bytes, int]] = [(top, os.fsencode(folder), 0)]
    try:
        while stack:
            fd, rel, depth = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > WALK_ENTRIES:
                            return True
                        name = os.fsencode(entry.name)
                        if name.endswith(REASON_SUFFIX_B) and not entry.is_dir(
                            follow_symlinks=False
                        ):
                            return True
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        sub = rel + b"/" + name
                        if sub in skipped:
                            continue
                        if depth + 1 >= WALK_DEPTH:
                            return True
                        try:
                            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        except (FileNotFoundError, NotADirectoryError):
                            continue  # gone, or replaced by a link, meanwhile
                        except OSError as err:
                            if err.errno == errno.ELOOP:
                                continue
                            return True
                        stack.append((child, sub, depth + 1))
            except OSError:
                return True
            finally:
                os.close(fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return False


def nested(inbox: Path, other: str) -> str | None:
    """The path of inbox ``other`` relative to ``inbox`` when it lies strictly inside
    it (an inbox widened to a folder above it), else None."""
    rel = os.path.relpath(other, inbox)
    if not os.path.isabs(other) or rel == "." or rel == ".." or rel.startswith("../"):
        return None
    return rel


def from_journal(inbox: Path, rejections: Iterable[tuple[bytes, str | None]]) -> set[str]:
    """The rejected folders ``rejections`` went to: for each, the rejected input's path
    relative to its rejected folder and its reason (JSON, naming ``rejected_path``)."""
    found: set[str] = set()
    for rejected_relpath, reason_json in rejections:
        try:
            where = json.loads(reason_json or "{}").get("rejected_path")
        except (ValueError, AttributeError):
            continue
        if not isinstance(where, str) or not os.path.isabs(where):
            continue
        try:
            depth = len(components(rejected_relpath))
        except Escape:
            continue
        folder = Path(where)
        for _ in range(depth):
            folder = folder.parent
        rel = os.path.relpath(folder, inbox)
        if valid(rel):
            found.add(rel)
    return found


__all__ = [
    "RECORD_NAME",
    "RecordError",
    "from_journal",
    "holds_rejection",
    "load",
    "nested",
    "present",
    "save",
    "valid",
]
