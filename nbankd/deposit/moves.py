"""The record of registry moves in ``state_dir``, and following it for old URLs.

Receipts keep the URL a deposit was registered under, forever. When the records of
a registry move to another one (``nbankctl registry switch``), the move is appended
to ``state_dir/registry-moves.jsonl`` (``{"from", "to", "time", "export"}``), and
``nbankctl history`` shows each receipt's URL under the registry that now holds the
record, keeping the recorded one as ``receipt_url``. A later line wins over an
earlier one it contradicts (going back: A to B, then B to A), so there is no loop.
``registry switch`` also reads it to finish an interrupted switch (:func:`moved_to`).

It is read as a bounded regular file, never through a link, without blocking
(:mod:`nbankd.smallfile`): a FIFO, a link or a device put there is told
(:class:`MovesUnreadable`), never waited on; an absent file records no move.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.archive.fsops import append_durable
from nbankd.smallfile import SmallFileError, read_regular

MOVES_NAME = "registry-moves.jsonl"
_MAX_HOPS = 16
#: the most registry-moves.jsonl is read of (a line per registry switch)
_LIMIT = 4 << 20


class MovesUnreadable(errors.ProblemsFound):
    """``state_dir/registry-moves.jsonl`` is there but is not a regular file that can
    be read: where receipts' records are now is not known."""

    code = "moves-unreadable"


def moves_path(state_dir: Path) -> Path:
    return Path(state_dir) / MOVES_NAME


def _base(url: str) -> str:
    return url.rstrip("/") + "/"


def records(state_dir: Path) -> list[dict[str, Any]]:
    """Each recorded move as written (a JSON object), in file order; torn or
    unreadable lines skipped, none when the file is absent. Raises
    :class:`MovesUnreadable` when it is not a regular file (a link is not followed)
    or cannot be read, and :class:`~nbankd.errors.OpenFileLimit` when nbankd has no
    file descriptor to read it with."""
    path = moves_path(state_dir)
    try:
        data, _ = read_regular(path, _LIMIT, follow=False)
    except SmallFileError as err:
        if err.reason == "missing":
            return []
        if err.errno in errors.DESCRIPTOR_ERRNOS:
            short = OSError(err.errno, err.strerror)
            raise errors.open_file_limit(short, f"reading {path}") from None
        why = {
            "not-regular": f"it is {err.noun}, not a file",
            "too-large": f"it is larger than {_LIMIT >> 20} MiB",
        }.get(err.reason, err.strerror or err.reason)
        raise MovesUnreadable(
            f"{path} cannot be read ({why}): which registry holds the records of "
            "earlier deposits is not known",
            hint="it lists the registry switches made (nbankctl registry switch): put "
            "it back as a regular file, or remove it if no switch was ever made",
        ) from None
    out = []
    for line in data.splitlines():
        try:
            move = json.loads(line)  # bytes: UTF-8 (not: ValueError, skipped)
        except ValueError:
            continue
        if isinstance(move, dict):
            out.append(move)
    return out


def _lines(state_dir: Path) -> list[tuple[str, str]]:
    """The recorded (from, to) base URLs, in file order (see :func:`records`)."""
    out = []
    for move in records(state_dir):
        if (
            isinstance(move.get("from"), str)
            and isinstance(move.get("to"), str)
            and _base(move["from"]) != _base(move["to"])
        ):
            out.append((_base(move["from"]), _base(move["to"])))
    return out


def read_moves(state_dir: Path) -> dict[str, str]:
    """{old base URL: new base URL}, later lines winning.

    A move that would close a loop (A to B, then B to A: going back; or A to B to C
    to A) ends the chain at its new registry, where the records are now, so
    following moves always ends there.
    """
    out: dict[str, str] = {}
    for old, new in _lines(state_dir):
        at, seen = new, {new}
        while at in out:  # does the new move lead back to ``old``?
            nxt = out[at]
            if nxt == old:  # the records are back at ``new``: it leads nowhere now
                del out[new]
                break
            if nxt in seen:  # pragma: no cover - out never holds a loop
                break
            seen.add(nxt)
            at = nxt
        out[old] = new
    return out


def moved_to(state_dir: Path, url: str) -> str | None:
    """The registry whose records were last recorded as moved to ``url``, if any."""
    moves = read_moves(state_dir)
    found = None
    for old, new in _lines(state_dir):
        if new == _base(url) and moves.get(old) == new:
            found = old
    return found


def record_move(
    state_dir: Path, old: str, new: str, *, time: str, export: str | None = None
) -> bool:
    """Appends a move (fsynced); False when this move is recorded already."""
    old, new = _base(old), _base(new)
    if old == new or read_moves(state_dir).get(old) == new:
        return False
    path = moves_path(state_dir)
    line = json.dumps({"from": old, "to": new, "time": time, "export": export}, sort_keys=True)
    st = os.stat(path.parent)  # the daemon's user reads it (history): the folder's owner
    append_durable(path, (line + "\n").encode("utf-8"), owner=(st.st_uid, st.st_gid))
    return True


def current_url(url: str, moves: dict[str, str]) -> str:
    """Where a recorded resource URL lives now, following every move (never in a loop)."""
    seen = {url}
    for _ in range(_MAX_HOPS):
        for old, new in moves.items():
            if url.startswith(old + "resources/"):
                moved = new + url[len(old) :]
                break
        else:
            return url
        if moved in seen:
            return url
        seen.add(moved)
        url = moved
    return url


def follow(receipts: Iterable[dict[str, Any]], state_dir: Path) -> list[dict[str, Any]]:
    """Receipts with ``url`` moved to the current registry (``receipt_url`` keeps the old)."""
    moves = read_moves(state_dir)
    out = []
    for r in receipts:
        url = r.get("url")
        if moves and isinstance(url, str):
            now = current_url(url, moves)
            if now != url:
                r = {**r, "url": now, "receipt_url": url}
        out.append(r)
    return out


__all__ = [
    "MOVES_NAME",
    "MovesUnreadable",
    "current_url",
    "follow",
    "moved_to",
    "moves_path",
    "read_moves",
    "record_move",
    "records",
]
