"""What the alerts have told, kept across a restart: ``state_dir/alerts.json``.

Each notifier's problems told and not yet resolved, and the resolutions not yet sent,
are written after every check that changes them (whole or not at all: a temporary
file in the same folder, fsynced, renamed over the old one) and read back at start.
A problem told before a restart and gone when the daemon comes back is then
resolved, and one still there is not told again before ``repeat_every``.

At most :data:`REMEMBERED` problems per notifier are kept (a corrupted archive can
have 100 000 audit findings): past that, the oldest told are forgotten, and are not
resolved after a restart. A file that cannot be read is logged and ignored (as if
nothing had been told).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.archive.fsops import write_atomic
from nbankd.control.alert_rules import State, Tracked
from nbankd.smallfile import SmallFileError, read_regular

log = structlog.get_logger("nbankd.alerts")

NAME = "alerts.json"
VERSION = 1
REMEMBERED = 5000

_FIELDS = frozenset(f.name for f in fields(Tracked))
_TEXT = ("summary", "command", "kind", "key")
_NUMBERS = ("first_seen", "told_at", "delay", "gone_at")


def remembered(state: State) -> tuple[list[Tracked], list[Tracked]]:
    """(problems told and not gone, resolutions pending) of ``state``: what is kept."""
    told = sorted(
        (t for t in state.tracked.values() if t.told_at is not None),
        key=lambda t: (t.told_at or 0.0, t.key),
    )[-REMEMBERED:]
    gone = sorted(state.gone.values(), key=lambda t: (t.gone_at or 0.0, t.key))[-REMEMBERED:]
    return told, gone


def fingerprint(states: Mapping[str, State]) -> tuple[Any, ...]:
    """Changes when what :func:`save` writes would change, summaries aside (a silent
    inbox's summary changes at every check: the file is not rewritten for it)."""
    out = []
    for name, state in sorted(states.items()):
        told, gone = remembered(state)
        out.append((name, tuple((t.key, t.told_at) for t in told), tuple(t.key for t in gone)))
    return tuple(out)


def save(state_dir: Path, states: Mapping[str, State]) -> None:
    """Writes ``states`` to ``state_dir/alerts.json`` atomically (OSError on failure)."""
    body: dict[str, Any] = {"version": VERSION, "notifiers": {}}
    for name, state in sorted(states.items()):
        told, gone = remembered(state)
        body["notifiers"][name] = {
            "told": [asdict(t) for t in told],
            "gone": [asdict(t) for t in gone],
        }
    # ensure_ascii: a name's bytes that are not UTF-8 (lone surrogates) as \\u escapes
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("ascii")
    write_atomic(state_dir / NAME, data, mode=0o640)


def unsaved(state_dir: Path, err: OSError) -> str:
    """Why :func:`save` failed, in words: nbankd out of file descriptors is told as
    its open-file limit (with what to do), never as a fault of ``state_dir``."""
    path = state_dir / NAME
    return errors.process_limit_problem(err, f"writing {path}") or f"{path}: {err.strerror or err}"


def _tracked(raw: Any) -> Tracked | None:
    """One entry of the file as :class:`Tracked`, or None when it is not one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or not raw["key"]:
        return None
    values = {k: v for k, v in raw.items() if k in _FIELDS}
    for k in _TEXT:
        if not isinstance(values.get(k, ""), str):
            return None
    for k in ("inbox", "path"):
        if values.get(k) is not None and not isinstance(values[k], str):
            return None
    for k in _NUMBERS:
        v = values.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return None
    if not isinstance(values.get("first_seen"), int | float):
        return None
    return Tracked(**values)


def _entries(raw: Any) -> Iterable[Tracked]:
    for entry in raw if isinstance(raw, list) else []:
        t = _tracked(entry)
        if t is not None:
            yield t


#: the most an alerts.json is read of
_LIMIT = 16 << 20


def load(state_dir: Path, notifiers: Iterable[str]) -> dict[str, State]:
    """The states kept for ``notifiers`` (the others are dropped); empty when the file
    is missing, and (logged) when it cannot be read."""
    path = state_dir / NAME
    try:
        # a small regular file: a FIFO or a device there never blocks the alert service
        data, _ = read_regular(path, _LIMIT, follow=False)
        body = json.loads(data)
    except SmallFileError as err:
        if err.reason == "missing":
            return {}
        why = err.noun if err.reason == "not-regular" else err.strerror or err.reason
        log.warning(
            "alert state not read; what was told before is forgotten", file=str(path), error=why
        )
        return {}
    except (ValueError, RecursionError) as err:
        log.warning("alert state not read; what was told before is forgotten", error=repr(err))
        return {}
    kept = body.get("notifiers") if isinstance(body, dict) else None
    if not isinstance(kept, dict) or body.get("version") != VERSION:
        log.warning("alert state not understood; what was told before is forgotten", path=str(path))
        return {}
    out = {}
    for name in notifiers:
        entry = kept.get(name)
        if not isinstance(entry, dict):
            continue
        told = {t.key: t for t in _entries(entry.get("told")) if t.told_at is not None}
        gone = {t.key: t for t in _entries(entry.get("gone")) if t.key not in told}
        out[name] = State(told, gone)
    return out


__all__ = ["NAME", "REMEMBERED", "fingerprint", "load", "remembered", "save"]
