"""Talking to the service manager: readiness, status, watchdog pings, and worker liveness.

The pure parts (message formatting, address and watchdog-interval parsing, the liveness
check) are plain functions and a small class with no I/O, so they are tested as tables;
:class:`Notifier` does the socket I/O.

``Notifier`` uses ``systemd.daemon.notify`` when the optional ``systemd`` extra is
installed and otherwise sends the same datagram to ``$NOTIFY_SOCKET`` itself (see
sd_notify(3)), so readiness and watchdog pings work either way. Without
``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``) every call is
a cheap no-op. A failing send never raises into the daemon: it is logged once, and
logged again only if sends start failing again after one succeeded.

The watchdog and liveness: worker threads call :meth:`Heartbeat.beat` each time round
their loop (and while waiting, at least every ``max_age``); before each ``WATCHDOG=1``
the daemon checks :meth:`Heartbeat.healthy` and skips the ping when a worker is wedged,
so systemd restarts the service after ``WatchdogSec=``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

__all__ = [
    "Heartbeat",
    "Notifier",
    "format_message",
    "notify_address",
    "stale_workers",
    "watchdog_interval_from",
]

_log = structlog.get_logger("nbankd.service.notify")

#: How long a send may block on a full notification socket before it is given up.
SEND_TIMEOUT_S = 5.0


# --- pure helpers ----------------------------------------------------------------------


def format_message(fields: Mapping[str, object]) -> bytes:
    """Returns the sd_notify datagram for ``fields``: ``KEY=value`` lines, UTF-8.

    Keys must be upper-case assignment names without ``=`` and values must hold no
    newline (a STATUS text with one is cut at the first newline, the rest would be read
    as another assignment).
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"invalid sd_notify key {key!r}")
        text = str(value).split("\n", 1)[0]
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


def notify_address(value: str | None) -> str | None:
    """Returns the socket address to send to for a ``$NOTIFY_SOCKET`` value, or None.

    A leading ``@`` means the Linux abstract namespace (returned with a leading NUL);
    otherwise the value must be an absolute path. Anything else (unset, empty, relative,
    or an ``vsock:`` address, which this sender does not speak) gives None.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_from(environ: Mapping[str, str], pid: int) -> float | None:
    """Returns how often (seconds) to ping the watchdog: half of ``$WATCHDOG_USEC``.

    None when the watchdog is off: ``$WATCHDOG_USEC`` unset, not a positive integer, or
    ``$WATCHDOG_PID`` set to another process than ``pid`` (the variables were inherited
    from a parent that is the one being watched).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    want_pid = environ.get("WATCHDOG_PID", "")
    if want_pid:
        try:
            if int(want_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def stale_workers(beats: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """Returns the names of workers whose last beat is older than ``max_age``, sorted.

    A beat exactly ``max_age`` old still counts as fresh; a beat "in the future" (clock
    skew between callers) counts as fresh too.
    """
    return sorted(name for name, last in beats.items() if now - last > max_age)


# --- liveness --------------------------------------------------------------------------


class Heartbeat:
    """Last-beat times of the daemon's worker threads, checked before each watchdog ping.

    Times are ``time.monotonic()`` seconds unless the caller passes ``now`` (tests,
    or a daemon with its own clock). Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, name: str, now: float | None = None) -> None:
        """Records that worker ``name`` is alive (registers it on the first beat)."""
        stamp = self._clock() if now is None else now
        with self._lock:
            self._beats[name] = stamp

    def forget(self, name: str) -> None:
        """Stops watching worker ``name`` (it finished on purpose); unknown names are fine."""
        with self._lock:
            self._beats.pop(name, None)

    def snapshot(self) -> dict[str, float]:
        """Returns a copy of the last beat of every watched worker."""
        with self._lock:
            return dict(self._beats)

    def stale(self, now: float, max_age: float) -> list[str]:
        """Returns the workers that have not beaten within ``max_age`` of ``now``."""
        return stale_workers(self.snapshot(), now, max_age)

    def healthy(self, now: float, max_age: float) -> bool:
        """Returns True when every watched worker beat within ``max_age`` of ``now``."""
        return not self.stale(now, max_age)


# --- socket I/O ------------------------------------------------------------------------


def _systemd_sender() -> Callable[[str], Any] | None:
    try:
        from systemd import daemon  # type: ignore[import-not-found]
    except ImportError:
        return None
    return daemon.notify  # type: ignore[no-any-return]


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op outside systemd.

    ``environ`` defaults to the process environment, read once here. ``pid`` (default:
    this process) is what ``$WATCHDOG_PID`` must name for the watchdog to be ours.
    ``use_systemd`` picks the sender: None (default) uses systemd-python when it is
    installed and ``environ`` is the process environment (it reads ``$NOTIFY_SOCKET``
    from there), False always sends the datagram directly.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        use_systemd: bool | None = None,
    ) -> None:
        from_process = environ is None
        env = dict(os.environ if environ is None else environ)
        self._environ = env
        self._pid = os.getpid() if pid is None else pid
        self._address = notify_address(env.get("NOTIFY_SOCKET"))
        self._failing = False
        self._lock = threading.Lock()
        sender = None
        if use_systemd is not False and from_process and self._address is not None:
            sender = _systemd_sender()
        self._systemd_send = sender

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``$NOTIFY_SOCKET`` names a usable socket)."""
        return self._address is not None

    @property
    def backend(self) -> str:
        """Which sender is used: ``"systemd-python"``, ``"socket"`` or ``"none"``."""
        if self._address is None:
            return "none"
        return "systemd-python" if self._systemd_send is not None else "socket"

    # -- messages --

    def ready(self, status: str | None = None) -> bool:
        """Tells systemd start-up is complete (``READY=1``), optionally with a status."""
        fields: dict[str, object] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(fields)

    def status(self, text: str) -> bool:
        """Sets the one-line status shown by ``systemctl status`` (``STATUS=``)."""
        return self.notify({"STATUS": text})

    def watchdog(self) -> bool:
        """Pings the watchdog (``WATCHDOG=1``); call every :meth:`watchdog_interval`."""
        return self.notify({"WATCHDOG": 1})

    def watchdog_if_healthy(
        self, heartbeat: Heartbeat, max_age: float, now: float | None = None
    ) -> list[str]:
        """Pings the watchdog only if every worker is alive; returns the stale workers.

        ``now`` defaults to ``time.monotonic()`` (the clock :class:`Heartbeat` uses).
        An empty list means the ping was due and sent (or the notifier is disabled).
        """
        stale = heartbeat.stale(time.monotonic() if now is None else now, max_age)
        if not stale:
            self.watchdog()
        return stale

    def watchdog_trigger(self) -> bool:
        """Asks systemd to act on the watchdog now (``WATCHDOG=trigger``), e.g. when wedged."""
        return self.notify({"WATCHDOG": "trigger"})

    def stopping(self, status: str | None = None) -> bool:
        """Tells systemd the daemon is shutting down (``STOPPING=1``)."""
        fields: dict[str, object] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(fields)

    def reloading(self) -> bool:
        """Tells systemd a reload began (RELOADING=1 with MONOTONIC_USEC); end it with ready()."""
        return self.notify({"RELOADING": 1, "MONOTONIC_USEC": _monotonic_usec()})

    def extend_timeout(self, usec: int, status: str | None = None) -> bool:
        """Asks for ``usec`` more microseconds to finish starting or stopping, with
        ``status`` (if given) the new one-line status, in the same message."""
        if usec <= 0:
            raise ValueError("extend_timeout needs a positive number of microseconds")
        fields: dict[str, object] = {"EXTEND_TIMEOUT_USEC": int(usec)}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(fields)

    def watchdog_interval(self) -> float | None:
        """Returns the ping interval in seconds (half of ``WatchdogSec=``), or None if off."""
        return watchdog_interval_from(self._environ, self._pid)

    def notify(self, fields: Mapping[str, object]) -> bool:
        """Sends one message; returns True if it was sent, False if disabled or it failed."""
        if self._address is None:
            return False
        message = format_message(fields)
        try:
            if self._systemd_send is not None:
                sent = bool(self._systemd_send(message.decode("utf-8")))
                if not sent:
                    raise OSError("systemd.daemon.notify returned false")
            else:
                self._send(self._address, message)
        except (OSError, ValueError) as err:
            self._report_failure(err)
            return False
        with self._lock:
            self._failing = False
        return True

    @staticmethod
    def _send(address: str, message: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(message, address)

    def _report_failure(self, err: BaseException) -> None:
        with self._lock:
            first = not self._failing
            self._failing = True
        if first:
            shown = self._address.replace("\0", "@") if self._address else None
            _log.warning(
                "cannot notify the service manager; further failures are not logged",
                notify_socket=shown,
                error=str(err),
            )
