"""Durations as written in the configuration: ``30s``, ``10m``, ``24h``, ``7d``.

Stored everywhere as float seconds. A plain number (YAML int or float, or a
string of digits) is a number of seconds. :func:`format_duration` writes the
shortest exact form back, so ``parse_duration(format_duration(x)) == x``.
"""

from __future__ import annotations

import math
import re

UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ACCEPTED_FORMS = "a number of seconds, or a number with a unit s, m, h or d (30s, 10m, 24h, 7d)"

_DURATION_RE = re.compile(
    r"^\s*(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>[smhdSMHD]?)\s*$"
)


def parse_duration(value: object) -> float:
    """Returns the duration in seconds; raises ValueError saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration: {ACCEPTED_FORMS}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"is too long a duration; expected {ACCEPTED_FORMS}") from None
    else:
        if value.strip().startswith("-"):
            raise ValueError(f"must not be negative; expected {ACCEPTED_FORMS}")
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; expected {ACCEPTED_FORMS}")
        unit = match["unit"].lower() or "s"
        seconds = float(match["number"]) * UNITS[unit]
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"must be a finite duration; expected {ACCEPTED_FORMS}")
    if seconds < 0:
        raise ValueError(f"must not be negative; expected {ACCEPTED_FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact text for a duration: 86400 -> '1d', 90 -> '90s', 1.5 -> '1.5s'."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"not a valid duration: {seconds!r}")
    if float(seconds).is_integer():
        whole = int(seconds)
        for unit in ("d", "h", "m"):
            size = UNITS[unit]
            if whole and whole % size == 0 and float(whole // size) * size == seconds:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{float(seconds)!r}s"
