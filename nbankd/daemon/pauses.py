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

from nbankd.archive.fsops import write_atomic

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
    keep the record of inboxes a reload left out).
    """
    path = state_dir / PAUSED_NAME
    try:
        doc = json.loads(path.read_text())
        paused = doc["paused"]
        if not isinstance(paused, list) or not all(isinstance(p, str) for p in paused):
            raise ValueError("'paused' is not a list of inbox paths")
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.error(
            "cannot read the paused inboxes; counting none as paused",
            file=str(path),
            error=str(err),
            hint="pause the inboxes again with nbankctl pause; the file is rewritten then",
        )
        return frozenset()
    return frozenset(paused)


def unfinished_switch(state_dir: Path) -> dict[str, Any] | None:
    """What a registry switch that has not finished left recorded: the inboxes it
    paused, the URL it moves to (``to``) and the command line that finishes it
    (``command``; both absent in records of older nbankctl), or
    None when no switch is under way. A record that cannot be read counts as one."""
    path = state_dir / SWITCH_PAUSED
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
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


__all__ = ["PAUSED_NAME", "SWITCH_PAUSED", "load", "save", "unfinished_switch"]
