"""Times and durations as people read them: the one home of both.

(A duration in the configuration file's own notation, exact and parsable, is
:func:`nbankd.config.durations.format_duration`'s job.)
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso(t: float | None) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC timestamp to the second (None stays
    None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def compact_stamp(t: float) -> str:
    """Seconds since the epoch as a compact UTC stamp for names of files and runs,
    ``20260105T093000Z``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%SZ")


def from_iso(text: str | None) -> float | None:
    """The inverse of :func:`iso`: an ISO 8601 timestamp as seconds since the epoch
    (None or "" stays None)."""
    if not text:
        return None
    return datetime.fromisoformat(text).timestamp()


def human_duration(seconds: float) -> str:
    """``0.4 s``, ``3.2 s``, ``10 s``, ``5 m 3 s``, ``2 h 5 m``, ``3 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        text = f"{seconds:.1f}"
        return f"{text.removesuffix('.0')} s"
    whole = int(seconds)
    for unit, size, sub, subsize in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if whole >= size:
            major, rest = divmod(whole, size)
            minor = rest // subsize
            return f"{major} {unit} {minor} {sub}" if minor else f"{major} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["compact_stamp", "from_iso", "human_duration", "iso"]
