"""Which inboxes are paused, kept in ``state_dir/paused.json`` across restarts.

``nbankctl pause`` is an operator's decision (a rig being serviced, a registry
switch under way): a daemon restarted by systemd's watchdog or ``Restart=``
must not quietly resume depositing. The file lists inbox paths; it is written
whole or not at all (:func:`nbankd.archive.fsops.write_atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.archive.fsops import write_atomic
from nbankd.smallfile import SmallFileError, read_regular

log = structlog.get_logger("nbankd.daemon")

PAUSED_NAME = "paused.json"
#: where ``nbankctl registry switch`` records the inboxes it paused (and its target)
#: until it finishes: ``state_dir/migration/paused.json``
SWITCH_PAUSED = Path("migration") / PAUSED_NAME


def load(state_dir: Path) -> frozenset[str]:
    """The inbox paths recorded as paused; none when the file is absent.

    An unreadable or malformed file is reported and every inbox in it is lost
    from the record, so the daemon treats it as "nothing paused" and says so. Read at
    start, when a reload brings an inbox (back), and by each pause or resume (which
    keep the record of inboxes a reload left out). Raises
    :class:`~nbankd.errors.OpenFileLimit` when nbankd has no file descriptor to read
    it with: nothing is known of the file then, never "nothing paused" (the daemon
    keeps the pauses it last read or wrote, :mod:`nbankd.daemon.configuring`).
    """
    path = state_dir / PAUSED_NAME
    paused, why = _read(path)
    if why is not None:
        log.error(
            "cannot read the paused inboxes; counting none as paused",
            file=str(path),
            error=why,
            hint="pause the inboxes again with nbankctl pause; the file is rewritten then",
        )
    return paused


#: the most a paused.json is read of (a list of inbox paths)
_LIMIT = 4 << 20


def _read(path: Path) -> tuple[frozenset[str], str | None]:
    """(the inboxes ``path`` records as paused, why it cannot be read or None); an
    absent file records none. Read as a small regular file: a FIFO or a device put
    there never blocks the start (:mod:`nbankd.smallfile`). Raises
    :class:`~nbankd.errors.OpenFileLimit` when nbankd has no file descriptor to read
    it with (EMFILE, ENFILE): nothing is known of the file then."""
    try:
        data, _ = read_regular(path, _LIMIT)
        doc = json.loads(data)
        paused = doc["paused"]
        if not isinstance(paused, list) or not all(isinstance(p, str) for p in paused):
            raise ValueError("'paused' is not a list of inbox paths")
    except SmallFileError as err:
        if err.reason == "missing":
            return frozenset(), None
        if err.errno in errors.DESCRIPTOR_ERRNOS:
            limit = OSError(err.errno, err.strerror)
            raise errors.open_file_limit(limit, f"reading {path}") from None
        return frozenset(), _said(err)
    except (ValueError, KeyError, TypeError) as err:
        return frozenset(), str(err) or type(err).__name__
    return frozenset(paused), None


def _said(err: SmallFileError) -> str:
    if err.reason == "not-regular":
        return f"it is {err.noun}, not a file"
    if err.reason == "too-large":
        return f"it is larger than {_LIMIT >> 20} MiB"
    return err.strerror or err.reason


def problem(state_dir: Path) -> str | None:
    """The status line when ``paused.json`` exists but cannot be read (its pauses are
    not in force: every inbox deposits), else None; nbankd out of file descriptors is
    told as its open-file limit, never as the file's fault."""
    path = state_dir / PAUSED_NAME
    try:
        _, why = _read(path)
    except errors.OpenFileLimit as err:
        return str(err)
    if why is None:
        return None
    return (
        f"{path} cannot be read ({why}): no inbox counts as paused; pause those that "
        "should be again (nbankctl pause INBOX), which rewrites it"
    )


class Record:
    """``paused.json`` as the running daemon last read or wrote it: what a reload that
    brings an inbox back goes by when the file cannot be read for want of a file
    descriptor (nbankd's open-file limit: nothing is known of the file then, and
    counting nothing paused would resume an inbox nobody resumed)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.known: frozenset[str] | None = None  # None: never read yet

    def load(self) -> frozenset[str]:
        """:func:`load`, remembered; out of descriptors, the pauses last known (logged
        naming the limit). Raises :class:`~nbankd.errors.OpenFileLimit` when none are
        known yet (at start)."""
        try:
            self.known = load(self.state_dir)
        except errors.OpenFileLimit as err:
            if self.known is None:
                raise
            log.error(
                "paused inboxes not read; keeping those recorded before",
                file=str(self.state_dir / PAUSED_NAME),
                error=str(err),
                paused=sorted(self.known),
            )
        return self.known

    def save(self, paused: Iterable[str]) -> None:
        """:func:`save`, remembered once written."""
        wanted = frozenset(paused)
        save(self.state_dir, wanted)
        self.known = wanted


def unfinished_switch(state_dir: Path) -> dict[str, Any] | None:
    """What a registry switch that has not finished left recorded: the inboxes it
    paused, the URL it moves to (``to``) and the command line that finishes it
    (``command``; both absent in records of older nbankctl), or
    None when no switch is under way. A record that cannot be read counts as one."""
    path = state_dir / SWITCH_PAUSED
    try:
        data, _ = read_regular(path, _LIMIT)  # a FIFO there never blocks status or a start
        doc = json.loads(data)
    except SmallFileError as err:
        if err.reason == "missing":
            return None
        if err.errno in errors.DESCRIPTOR_ERRNOS:  # not known now; never told as a switch
            raise OSError(err.errno, err.strerror) from None
        return {"inboxes": [], "to": None, "problem": f"{path}: {_said(err)}"}
    except (ValueError, RecursionError) as err:
        return {"inboxes": [], "to": None, "problem": f"{path}: {err}"}
    if not isinstance(doc, dict):
        return {"inboxes": [], "to": None, "problem": f"{path}: not a JSON object"}
    inboxes = doc.get("inboxes")
    to = doc.get("to")
    command = doc.get("command")
    words = isinstance(command, list) and all(isinstance(w, str) for w in command)
    return {
        "inboxes": [k for k in inboxes if isinstance(k, str)] if isinstance(inboxes, list) else [],
        "to": to if isinstance(to, str) else None,
        "command": command if words and command else None,
    }


def save(state_dir: Path, paused: Iterable[str]) -> None:
    """Records ``paused`` durably (an empty set removes nothing: it writes ``[]``)."""
    body = json.dumps({"paused": sorted(paused)}, indent=2) + "\n"
    write_atomic(state_dir / PAUSED_NAME, body.encode(), mode=0o640)


__all__ = ["PAUSED_NAME", "SWITCH_PAUSED", "Record", "load", "save", "unfinished_switch"]
