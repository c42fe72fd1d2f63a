"""What the watcher reports: how each inbox is watched (:class:`Mode`,
:class:`WatchStatus`) and which inboxes asked to be scanned (:class:`Wakeups`).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class Mode(enum.Enum):
    """How an inbox is actually being watched."""

    INOTIFY = "inotify"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """One inbox's watch, for ``nbankctl status``.

    ``requested`` is the configured ``watch`` option (``auto`` or ``poll``);
    ``mode`` is what happens now; ``reason`` says why it differs (empty when not).
    """

    inbox_id: str
    path: str
    requested: str
    mode: Mode
    reason: str = ""

    @property
    def degraded(self) -> bool:
        """True when inotify was wanted but the inbox is only polled."""
        return self.requested == "auto" and self.mode is Mode.POLL


class Wakeups:
    """A thread-safe mailbox of changed inboxes; its :meth:`notify` is an ``OnChange``.

    The daemon loop does ``wakeups.wait(timeout)`` then ``wakeups.take()``. Each
    inbox keeps the first ``keep`` relpaths reported since the last ``take``.
    """

    def __init__(self, keep: int = 16) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._pending: dict[str, list[str]] = {}
        self._keep = keep

    def notify(self, inbox_id: str, relpath: str = "") -> None:
        with self._lock:
            paths = self._pending.setdefault(inbox_id, [])
            if len(paths) < self._keep:
                paths.append(relpath)
            self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until something is pending or ``timeout`` passes; True if pending."""
        return self._event.wait(timeout)

    def take(self) -> dict[str, list[str]]:
        """Returns and clears what is pending: inbox id -> relpaths (first ``keep``)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._event.clear()
            return pending


__all__ = ["Mode", "Wakeups", "WatchStatus"]
