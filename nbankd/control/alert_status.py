"""What makes ``nbankctl status`` degraded, as alerts: one problem per line of its
``degraded`` list that no other alert tells already (a user's file left in an inbox's
``.nbank/``, an inbox folder moved or replaced, the state directory moved, audits
disabled, an archive filesystem that cannot publish, ...).

Pure, like :mod:`nbankd.control.alert_rules`: the alert service adds these to the
conditions of each check. A line's key is the line with its numbers left out, so a
count that changes ("3 file(s) in ...", "no progress for 75s") is the same problem,
told once, with its newest words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nbankd.control.alert_rules import Condition
from nbankd.names import without_controls

#: status lines another alert tells, in its own words and after its own delay:
#: rejected inputs, stalled files, the registry, an inbox's archive, the last audit
TOLD_ELSEWHERE = re.compile(
    r"\d+ rejected input\(s\) waiting in "
    r"|\d+ stalled file\(s\) in "
    r"|registry: "
    r"|archive for "
    r"|last audit \("
)

#: inputs waiting after a failed step: told as stuck inputs, or as the registry or
#: archive outage they wait on
WAITING = re.compile(r": \d+ input\(s\) waiting after ")

#: what may pass by itself (an archive still being set up, a watch that fell back to
#: polling, a slow registry holding the lane): told once it has lasted
#: ``unavailable_after``, like an outage
PASSING = re.compile(r"archive \S+ not ready: |watch of |the lane of small files ")

_NUMBER = re.compile(r"\d+(\.\d+)?")


def degraded_conditions(status: Mapping[str, Any], unavailable_after: float) -> list[Condition]:
    """One ``degraded`` condition per line of ``status["degraded"]`` not told by
    another kind of alert (nor the alert service's own failure: it cannot tell it)."""
    alerts = status.get("alerts")
    own = alerts.get("problem") if isinstance(alerts, Mapping) else None
    out: list[Condition] = []
    seen: set[str] = set()
    for line in status.get("degraded") or []:
        line = str(line)
        if line == own or TOLD_ELSEWHERE.match(line) or WAITING.search(line):
            continue
        key = "status:" + _NUMBER.sub("#", line)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Condition(
                key,
                without_controls(line),  # it may name an inbox, a file, a registry's words
                "nbankctl status",
                unavailable_after if PASSING.match(line) else 0.0,
                kind="degraded",
            )
        )
    return out


__all__ = ["PASSING", "TOLD_ELSEWHERE", "WAITING", "degraded_conditions"]
