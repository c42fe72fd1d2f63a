"""The test seams of nbankd, all in one place: inert unless a variable names one.

Crash points (deposit steps, migrations, the registry switch, audit commits, tape prune):

- ``NBANKD_CRASH_AT=<point>`` (or ``<point>:<n>``, the n-th time) kills the process
  with SIGKILL there, as a power cut or ``kill -9`` would;
- ``NBANKD_HANG_AT=<point>`` wedges the thread that reaches it forever (to test the
  watchdog);
- ``NBANKD_PAUSE_AT=<point>`` with ``NBANKD_PAUSE_UNTIL=<path>`` holds every thread
  that reaches it until ``<path>`` exists (to change an input at an exact moment); the
  first to arrive creates ``<path>.reached``, so a test knows the moment has come;
- ``NBANKD_RAISE_AT=<point>`` raises :class:`InjectedFault` there every time (an
  unexpected error, as a bug would raise).

Audit pauses: ``NBANKD_AUDIT_PAUSE_AT=<point>`` with ``NBANKD_AUDIT_PAUSE_UNTIL=<path>``
holds an audit at ``<point>`` until ``<path>`` exists; the first thread to arrive
creates ``<path>.reached`` holding its thread id, so a test knows the moment has come
without sleeping. Points: ``listed`` (the registry listing in hand, before it is
handed over), ``walk-top`` (``resources/`` listed, its stub folders not yet),
``hashing`` (after the walk, before the first read), ``walked`` (after the walk and
the listing, before the registry is asked again) and ``reading`` (after the first
block of each file read, in the reading thread).

Value seams, read where they act:

- ``NBANKD_WATCH_DEAF=1`` makes the inbox watcher drop every event before it is
  handled, so only rescans find inputs (:func:`watch_deaf`);
- ``NBANKD_WEDGE_AFTER=<seconds>`` is how long a worker may stay in one step before
  the daemon counts it wedged and stops pinging the watchdog (:func:`wedge_after`);
- ``NBANKD_READER_UNCONFINED=1`` makes metadata readers run as on a kernel without
  Landlock: unconfined, so never on a recording's only copy
  (:func:`reader_unconfined`, read by :mod:`nbankd.metadata_readers`).

Names are checked: code reaching a point that is not listed here raises ValueError,
and so does importing this module while a variable names an unknown point or a
value seam holds a value it does not take (a typo in a test would otherwise make its
seam silently do nothing). Without the
variables, :func:`reached` is a set lookup and a few string comparisons.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Mapping

#: the deposit life cycle's points, each crashed at by the reliability suite
DEPOSIT_POINTS = (
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
    "after-round-fsyncs",  # a round's fsyncs done; its published staged names not dropped
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
#: points outside the deposit life cycle
OTHER_POINTS = (
    "audit-committed",  # an audit's results written to its cache
    "migrate-after-create",  # a record created by the registry import, not yet noted
    "switch-before-nbank-json",
    "switch-after-nbank-json",
    "switch-after-config",
    "handover-checked",  # a manual deposit's peer checked; its files not yet journaled
    "before-intent",  # inputs found ready by a scan; their intents not yet built
    "requeue-side-moved",  # a requeue moved a sidecar or marker back; its input not yet
    "prune-location-removed",  # tape prune removed a copy's location; its file not checked
)
AUDIT_POINTS = ("listed", "walk-top", "walked", "hashing", "reading")

CRASH_AT, HANG_AT, RAISE_AT = "NBANKD_CRASH_AT", "NBANKD_HANG_AT", "NBANKD_RAISE_AT"
PAUSE_AT, PAUSE_UNTIL = "NBANKD_PAUSE_AT", "NBANKD_PAUSE_UNTIL"
AUDIT_PAUSE_AT, AUDIT_PAUSE_UNTIL = "NBANKD_AUDIT_PAUSE_AT", "NBANKD_AUDIT_PAUSE_UNTIL"

WATCH_DEAF, WEDGE_AFTER = "NBANKD_WATCH_DEAF", "NBANKD_WEDGE_AFTER"
READER_UNCONFINED = "NBANKD_READER_UNCONFINED"

_KNOWN = frozenset(DEPOSIT_POINTS + OTHER_POINTS)


class InjectedFault(RuntimeError):
    """The unexpected error ``NBANKD_RAISE_AT`` raises (stands in for a bug)."""


def _check_environment() -> None:
    for var, known in (
        (CRASH_AT, _KNOWN),
        (HANG_AT, _KNOWN),
        (PAUSE_AT, _KNOWN),
        (RAISE_AT, _KNOWN),
        (AUDIT_PAUSE_AT, frozenset(AUDIT_POINTS)),
    ):
        value = os.environ.get(var, "")
        name = value.partition(":")[0] if var == CRASH_AT else value
        if name and name not in known:
            raise ValueError(f"{var}={value!r} names no test seam; known: {', '.join(known)}")
    deaf = os.environ.get(WATCH_DEAF, "")
    if deaf not in ("", "0", "1"):
        raise ValueError(f"{WATCH_DEAF}={deaf!r} is neither 1 (deaf) nor 0")
    unconfined = os.environ.get(READER_UNCONFINED, "")
    if unconfined not in ("", "0", "1"):
        raise ValueError(f"{READER_UNCONFINED}={unconfined!r} is neither 1 (unconfined) nor 0")
    wedge = os.environ.get(WEDGE_AFTER, "")
    if wedge and not _positive(wedge):
        raise ValueError(f"{WEDGE_AFTER}={wedge!r} is not a number of seconds above 0")


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


_check_environment()
_name, _, _count = os.environ.get(CRASH_AT, "").partition(":")
_remaining = int(_count or 1)
_hang = os.environ.get(HANG_AT, "")
_pause = os.environ.get(PAUSE_AT, "")
_pause_until = os.environ.get(PAUSE_UNTIL, "")
_raise = os.environ.get(RAISE_AT, "")
_lock = threading.Lock()


def reached(name: str) -> None:
    """Acts on crash point ``name`` if a variable names it (see the module's text)."""
    global _remaining
    if name not in _KNOWN:
        raise ValueError(f"{name!r} is not a crash point listed in nbankd.seams")
    if name == _hang:
        threading.Event().wait()
    if name == _pause and _pause_until:
        _arrived(_pause_until)
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
    """The crash point ``NBANKD_CRASH_AT`` names, if any."""
    return _name or None


def audit_pause(point: str) -> None:
    """Holds the calling thread at audit point ``point`` if it is the active one."""
    if point not in AUDIT_POINTS:
        raise ValueError(f"{point!r} is not an audit pause point listed in nbankd.seams")
    if os.environ.get(AUDIT_PAUSE_AT) != point:
        return
    until = os.environ.get(AUDIT_PAUSE_UNTIL, "")
    if not until:
        return
    _arrived(until)
    waiter = threading.Event()
    while not os.path.exists(until):
        waiter.wait(0.02)


def _arrived(until: str) -> None:
    """Creates ``<until>.reached`` holding the thread's id, if no thread has yet."""
    with contextlib.suppress(OSError):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # the first to arrive
        fd = os.open(f"{until}.reached", flags, 0o644)
        try:
            os.write(fd, str(threading.get_native_id()).encode())
        finally:
            os.close(fd)


def watch_deaf(environ: Mapping[str, str] | None = None) -> bool:
    """True if ``NBANKD_WATCH_DEAF=1`` (in ``environ``, default the process's)."""
    env = os.environ if environ is None else environ
    return env.get(WATCH_DEAF) == "1"


def reader_unconfined() -> bool:
    """True if ``NBANKD_READER_UNCONFINED=1``: metadata readers run as where the kernel
    has no Landlock (read at each call)."""
    return os.environ.get(READER_UNCONFINED) == "1"


def wedge_after(default: float) -> float:
    """``NBANKD_WEDGE_AFTER`` in seconds, else ``default``."""
    return float(os.environ.get(WEDGE_AFTER, default))


__all__ = [
    "AUDIT_POINTS",
    "DEPOSIT_POINTS",
    "OTHER_POINTS",
    "READER_UNCONFINED",
    "WATCH_DEAF",
    "WEDGE_AFTER",
    "InjectedFault",
    "active",
    "audit_pause",
    "reached",
    "reader_unconfined",
    "watch_deaf",
    "wedge_after",
]
