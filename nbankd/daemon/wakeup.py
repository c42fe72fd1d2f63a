"""How the daemon's main loop is woken: by other threads, and by signals.

A signal handler runs in the main thread between two bytecodes, possibly while that
thread holds a lock inside ``threading.Event.wait`` or a logger. Anything that takes a
lock there (``Event.set``, logging, starting a thread) can wait forever for a lock its
own thread holds: a SIGTERM that arrived at that instant hung the daemon. So a handler
does one thing, :meth:`Wakeup.post`, which is built on :class:`queue.SimpleQueue`, whose
``put`` Python documents as reentrant (safe to call while the same thread is inside a
``get``). The main loop takes the requests with :meth:`Wakeup.wait` and acts on them
itself, outside any handler.
"""

from __future__ import annotations

import enum
import queue
import signal
from collections.abc import Callable


class Request(enum.Enum):
    """Why the main loop was woken."""

    WAKE = "wake"  # something changed: look again
    STOP = "stop"  # SIGTERM or SIGINT
    RELOAD = "reload"  # SIGHUP


SIGNAL_REQUESTS: dict[int, Request] = {
    signal.SIGTERM: Request.STOP,
    signal.SIGINT: Request.STOP,
    signal.SIGHUP: Request.RELOAD,
}


class Wakeup:
    """A queue of requests to the main loop; :meth:`post` is safe from signal handlers."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Request, int | None]] = queue.SimpleQueue()
        # a wake-up queued and not yet taken: another one adds nothing (a flood of
        # inotify events while the main loop is busy queues one, not millions)
        self._woken = False

    def post(self, request: Request = Request.WAKE, signum: int | None = None) -> None:
        """Asks the main loop to act; never blocks and takes no lock a handler could meet."""
        self._queue.put((request, signum))

    def set(self) -> None:
        """Wakes the main loop (the name :class:`threading.Event` callers know), unless a
        wake-up is queued already: what the caller changed before is seen all the same,
        as the loop reads it after taking the queue empty (:meth:`pending`)."""
        if self._woken:
            return
        self._woken = True
        self.post(Request.WAKE)

    def wait(self, timeout: float) -> list[tuple[Request, int | None]]:
        """Waits up to ``timeout`` seconds for a request; returns every one pending."""
        try:
            got = [self._queue.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        return got + self.pending()

    def pending(self) -> list[tuple[Request, int | None]]:
        """Every request posted and not yet taken, without waiting."""
        got = []
        while True:
            try:
                got.append(self._queue.get_nowait())
            except queue.Empty:
                break
        # only now: a wake-up skipped until here changed what the loop is about to read
        self._woken = False
        return got


def install_handlers(wakeup: Wakeup) -> Callable[[int, object], None]:
    """Routes SIGTERM, SIGINT and SIGHUP to ``wakeup``; call from the main thread."""

    def on_signal(signum: int, frame: object) -> None:
        wakeup.post(SIGNAL_REQUESTS[signum], signum)

    for signum in SIGNAL_REQUESTS:
        signal.signal(signum, on_signal)
    return on_signal
