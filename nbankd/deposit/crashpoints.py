"""Named crash points for the reliability suite: inert unless activated.

Set ``NBANKD_CRASH_AT=<name>`` (optionally ``<name>:<n>`` to crash at the n-th
time the point is reached) and the daemon kills itself with SIGKILL there, as a
power cut or ``kill -9`` would. ``NBANKD_HANG_AT=<name>`` instead wedges the
worker thread that reaches the point forever (to test the watchdog), and
``NBANKD_PAUSE_AT=<name>`` with ``NBANKD_PAUSE_UNTIL=<path>`` holds it there
until ``<path>`` exists (to change an input at an exact moment), and
``NBANKD_RAISE_AT=<name>`` raises :class:`InjectedFault` there every time (an
unexpected error, as a bug would raise). Without the
variables, :func:`reached` is a few string comparisons.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "after-journal-add",  # intent journaled; the claim rename has not run
    "after-claim-rename",  # input renamed into .nbank/; its sidecar not yet
    "stage-copied",
    "after-claim",
    "after-stage",
    "after-lookup",
    "after-register-request",
    "after-register",
    "after-publish-link",  # linked into resources/; stub folder not yet fsynced
    "after-publish",
    "after-verify",
    "after-receipt-append",
    "after-record",  # RECORDED committed; the source is still in .nbank/
    "after-release-source",  # source removed; sidecar and marker not yet
    "after-release-unlink",
    "after-reject-name",  # rejected name journaled; nothing written yet
    "after-reason-temp",  # NAME.reason written to its temporary name, not renamed
    "after-reject-reason",
    "after-reject-move",
    "after-put-back",  # changed input back in the inbox; its sidecar not yet
)

_spec = os.environ.get("NBANKD_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_remaining = int(_count or 1)
_hang = os.environ.get("NBANKD_HANG_AT", "")
_pause = os.environ.get("NBANKD_PAUSE_AT", "")
_pause_until = os.environ.get("NBANKD_PAUSE_UNTIL", "")
_raise = os.environ.get("NBANKD_RAISE_AT", "")
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """The unexpected error ``NBANKD_RAISE_AT`` raises (stands in for a bug)."""


def reached(name: str) -> None:
    """Dies here with SIGKILL if this crash point is the active one."""
    global _remaining
    if name == _hang:
        threading.Event().wait()
    if name == _pause and _pause_until:
        waiter = threading.Event()
        while not os.path.exists(_pause_until):
            waiter.wait(0.05)
    if name == _raise:
        raise InjectedFault(f"fault injected at crash point {name}")
    if name != _name:
        return
    with _lock:
        _remaining -= 1
        if _remaining > 0:
            return
    os.write(2, f"nbankd: crash point {name} reached; SIGKILL\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def active() -> str | None:
    return _name or None
