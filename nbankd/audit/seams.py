"""Test seams of audits: hold an audit at a named point until a file exists.

``NBANKD_AUDIT_PAUSE_AT=<point>`` with ``NBANKD_AUDIT_PAUSE_UNTIL=<path>`` holds
the audit at ``<point>`` until ``<path>`` exists; on arriving there it creates
``<path>.reached``, so a test knows the moment has come without sleeping. Points:
``listed`` (in the listing's thread, the registry listing in hand, before it is
handed over), ``walk-top`` (``resources/`` listed, its stub folders not yet),
``hashing`` (after the walk, before the first read), ``walked`` (after the walk
and the listing, before the registry is asked again) and ``reading`` (after the
first block of each file read, in the reading thread; ``<path>.reached`` holds
the id of the first thread to arrive). Without the variables, :func:`pause` is one lookup.
"""

from __future__ import annotations

import contextlib
import os
import threading

PAUSE_AT = "NBANKD_AUDIT_PAUSE_AT"
PAUSE_UNTIL = "NBANKD_AUDIT_PAUSE_UNTIL"
POINTS = ("listed", "walk-top", "walked", "hashing", "reading")


def pause(point: str) -> None:
    """Holds the calling thread here if ``point`` is the active pause point."""
    if os.environ.get(PAUSE_AT) != point:
        return
    until = os.environ.get(PAUSE_UNTIL, "")
    if not until:
        return
    with contextlib.suppress(OSError):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # the first to arrive
        fd = os.open(f"{until}.reached", flags, 0o644)
        try:
            os.write(fd, str(threading.get_native_id()).encode())
        finally:
            os.close(fd)
    waiter = threading.Event()
    while not os.path.exists(until):
        waiter.wait(0.02)


__all__ = ["PAUSE_AT", "PAUSE_UNTIL", "POINTS", "pause"]
