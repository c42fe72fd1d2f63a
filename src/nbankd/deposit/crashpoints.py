"""Named crash points for the reliability suite: inert unless activated.

Set ``NBANKD_CRASH_AT=<name>`` (optionally ``<name>:<n>`` to crash at the n-th
time the point is reached) and the daemon kills itself with SIGKILL there, as a
power cut or ``kill -9`` would. ``NBANKD_HANG_AT=<name>`` instead wedges the
worker thread that reaches the point forever (to test the watchdog), and
``NBANKD_PAUSE_AT=<name>`` with ``NBANKD_PAUSE_UNTIL=<path>`` holds it there
until ``<path>`` exists (to change an input at an exact moment). Without the
variables, :func:`reached` is a few string comparisons.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "after-claim-rename",
    "stage-copied",
    "after-claim",
    "after-stage",
    "after-lookup",
    "after-register-request",
    "after-register",
    "after-publish-link",
    "after-publish",
    "after-verify",
    "after-receipt-append",
    "after-record",
    "after-release-unlink",
    "after-reject-reason",
    "after-reject-move",
)

_spec = os.environ.get("NBANKD_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_remaining = int(_count or 1)
_hang = os.environ.get("NBANKD_HANG_AT", "")
_pause = os.environ.get("NBANKD_PAUSE_AT", "")
_pause_until = os.environ.get("NBANKD_PAUSE_UNTIL", "")
_lock = threading.Lock()


def reached(name: str) -> None:
    """Dies here with SIGKILL if this crash point is the active one."""
    global _remaining
    if name == _hang:
        threading.Event().wait()
    if name == _pause and _pause_until:
        waiter = threading.Event()
        while not os.path.exists(_pause_until):
            waiter.wait(0.05)
    if name != _name:
        return
    with _lock:
        _remaining -= 1
        if _remaining > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def active() -> str | None:
    return _name or None
