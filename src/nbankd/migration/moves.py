"""The record of registry moves in ``state_dir``, and following it for old URLs.

Receipts keep the URL a deposit was registered under, forever. When the records of
a registry move to another one (``nbankctl registry switch``), the move is appended
to ``state_dir/registry-moves.jsonl`` (``{"from", "to", "time", "export"}``), and
``nbankctl history`` shows each receipt's URL under the registry that now holds the
record, keeping the recorded one as ``receipt_url``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MOVES_NAME = "registry-moves.jsonl"
_MAX_HOPS = 16


def moves_path(state_dir: Path) -> Path:
    return Path(state_dir) / MOVES_NAME


def _base(url: str) -> str:
    return url.rstrip("/") + "/"


def read_moves(state_dir: Path) -> dict[str, str]:
    """{old base URL: new base URL}; an unreadable or torn line is skipped."""
    out: dict[str, str] = {}
    try:
        text = moves_path(state_dir).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        try:
            move = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(move, dict)
            and isinstance(move.get("from"), str)
            and isinstance(move.get("to"), str)
            and move["from"] != move["to"]
        ):
            out[_base(move["from"])] = _base(move["to"])
    return out


def record_move(
    state_dir: Path, old: str, new: str, *, time: str, export: str | None = None
) -> bool:
    """Appends a move (fsynced); False when this move is recorded already."""
    old, new = _base(old), _base(new)
    if old == new or read_moves(state_dir).get(old) == new:
        return False
    path = moves_path(state_dir)
    line = json.dumps({"from": old, "to": new, "time": time, "export": export}, sort_keys=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        if created:  # the daemon's user reads it (history): give it the state folder's owner
            st = os.stat(path.parent)
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        from nbankd.archive.fsops import fsync_dir

        fsync_dir(path.parent)
    return True


def current_url(url: str, moves: dict[str, str]) -> str:
    """Where a recorded resource URL lives now, following every move."""
    for _ in range(_MAX_HOPS):
        for old, new in moves.items():
            if url.startswith(old + "resources/"):
                url = new + url[len(old) :]
                break
        else:
            return url
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


__all__ = ["MOVES_NAME", "current_url", "follow", "moves_path", "read_moves", "record_move"]
