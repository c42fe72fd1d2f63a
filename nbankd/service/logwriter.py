"""Where log lines go: a log call never raises, and in the daemon never waits.

Every rendered line (json and console on a stream, entries for the journal) is handed
to :data:`OUTPUT`. Until :func:`start_writer` it is written in the caller's thread
(``nbankctl``, a test); from nbankd's start-up on it is put on a bounded queue that one
thread, ``log-writer``, writes out in order, so deposits never wait on their logs:

- the queue full (:data:`QUEUE_LINES` lines or :data:`QUEUE_BYTES`: the output is
  slower than the logging, or blocked, e.g. a pipe nobody reads): the line is dropped;
- a write that fails (``EPIPE`` once the reader of stdout went away, ``ENOSPC``,
  journald's queue full, journald and stderr both unreachable): the line is dropped,
  and that output is not tried again for a backoff (1 s, doubling up to a minute):
  not once a line.

Dropped lines are counted (:meth:`LogOutput.status`: ``nbankctl status``'s ``log``
section and the ``nbankd_log_lines_dropped_total`` metric); an output failing now, or
stuck in one write for :data:`STUCK_AFTER` seconds, is a problem of the status. Once
lines go out again, the writer logs how many were dropped. At exit the queue is
written out with a bounded wait (:func:`flush`), so a failed start still says why.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import structlog

from nbankd import errors

__all__ = [
    "FLUSH_AT_EXIT",
    "OUTPUT",
    "QUEUE_BYTES",
    "QUEUE_LINES",
    "STUCK_AFTER",
    "LogOutput",
    "flush",
    "is_writer",
    "start_writer",
    "stream_writer",
]

#: lines the queue holds at most
QUEUE_LINES = 10_000
#: characters the queued lines hold at most
QUEUE_BYTES = 8 << 20
#: seconds an output that failed is left alone, first (doubling at each failure)
BACKOFF_FIRST = 1.0
#: ... and at most
BACKOFF_MAX = 60.0
#: seconds one write may take before the status says the output is stuck
STUCK_AFTER = 10.0
#: seconds the exit waits for queued lines to be written
FLUSH_AT_EXIT = 2.0
#: seconds between two lines telling how many lines were dropped
TELL_EVERY = 10.0
WRITER_NAME = "log-writer"

Write = Callable[[Any], None]


@dataclass
class _Failure:
    until: float  # not tried again before (monotonic)
    delay: float
    error: str


class LogOutput:
    """The process's log output: lines written now, or by one thread from a queue."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[tuple[Write, object, Any, int]] = deque()
        self._queued = 0  # characters
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._now_lock = threading.Lock()  # one write at a time without the thread
        self._failing: dict[object, _Failure] = {}
        self._writing_since: float | None = None
        self.dropped = 0
        self._told = 0
        self._told_at = -TELL_EVERY
        #: the output in use, as the status names it, and what may keep it stuck
        self.output = ("nbankd's stdout", "a pipe nobody reads?")

    # -- the callers' side --------------------------------------------------------

    def submit(self, write: Write, key: object, payload: Any, size: int) -> None:
        """Has ``write(payload)`` called (``key``: its output, for the backoff),
        ``size`` characters long; never raises, never waits once the writer runs."""
        try:
            if self._thread is None:
                with self._now_lock:
                    self._write(write, key, payload)
                return
            with self._cond:
                if len(self._queue) >= QUEUE_LINES or self._queued + size > QUEUE_BYTES:
                    self.dropped += 1
                    return
                self._queue.append((write, key, payload, size))
                self._queued += size
                self._cond.notify_all()
        except Exception:  # never into the code that logged
            self._drop()

    def dropped_one(self) -> None:
        """Counts a line lost before it reached the output (the stdlib bridge's)."""
        self._drop()

    def _drop(self, n: int = 1) -> None:
        with self._cond:
            self.dropped += n

    # -- writing --------------------------------------------------------------------

    def _write(self, write: Write, key: object, payload: Any) -> bool:
        """Writes one line unless its output is backing off; False when it was dropped."""
        now = self._clock()
        with self._cond:
            failure = self._failing.get(key)
            if failure is not None and now < failure.until:
                self.dropped += 1
                return False
        try:
            write(payload)
        except Exception as err:
            delay = BACKOFF_FIRST if failure is None else min(failure.delay * 2, BACKOFF_MAX)
            with self._cond:
                self._failing[key] = _Failure(self._clock() + delay, delay, _describe(err))
                self.dropped += 1
            return False
        if failure is not None:
            with self._cond:
                self._failing.pop(key, None)
        return True

    def start(self) -> None:
        """Starts the writer thread (nbankd's start-up); ThreadLimit when it cannot."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(target=self._run, name=WRITER_NAME, daemon=True)
            try:
                thread.start()
            except RuntimeError as err:
                if not errors.thread_refused(err):
                    raise
                raise errors.thread_limit("starting the log writer") from err
            self._thread = thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                write, key, payload, size = self._queue.popleft()
                self._queued -= size
                self._writing_since = self._clock()
            written = self._write(write, key, payload)
            with self._cond:
                self._writing_since = None
                self._cond.notify_all()
                now = self._clock()
                untold = self.dropped - self._told
                if not written or not untold or now < self._told_at + TELL_EVERY:
                    untold = 0
                self._told += untold
                self._told_at = now if untold else self._told_at
            if untold:  # the output takes lines again: say how many it lost
                structlog.get_logger("nbankd.logs").warning(
                    "log lines were dropped (the log output was full, stuck or failing)",
                    dropped=untold,
                    dropped_since_start=self.dropped,
                )

    def flush(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the queued lines to be written; False
        when some are still waiting (an output stuck)."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._queue or self._writing_since is not None:
                left = deadline - self._clock()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self, timeout: float) -> None:
        """Writes out the queue (waiting up to ``timeout``), then writes in the
        callers' threads again (lines still queued are dropped and counted)."""
        self.flush(timeout)
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self.dropped += len(self._queue)
            self._queue.clear()
            self._failing.clear()  # a fresh start for every output
            self._queued = 0
            self._cond.notify_all()
        if thread is not None:
            thread.join(min(timeout, 1.0))

    def is_writer(self, thread: threading.Thread) -> bool:
        return thread is self._thread

    @property
    def busy(self) -> bool:
        """Whether the writer thread is inside a write now."""
        with self._cond:
            return self._writing_since is not None

    # -- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``{"dropped": lines dropped since the start, "problem": a line or None}``."""
        now = self._clock()
        with self._cond:
            dropped, queued = self.dropped, len(self._queue)
            since = self._writing_since
            failures = [f.error for f in self._failing.values()]
        name, stuck_hint = self.output
        problem = None
        if since is not None and now - since > STUCK_AFTER:
            problem = (
                f"the log output has taken no line for {now - since:.0f}s ({name}: "
                f"{stuck_hint}): {dropped} log line(s) dropped since the start, {queued} "
                f"waiting; deposits go on; fix {name}, or restart nbankd"
            )
        elif failures:
            problem = (
                f"the log output fails ({name}: {failures[0]}): {dropped} log line(s) "
                f"dropped since the start; deposits go on; fix {name}, or restart nbankd"
            )
        return {"dropped": dropped, "problem": problem}


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (errno {err.errno})"
    return f"{type(err).__name__}: {err}"[:200]


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def stream_writer(stream: IO[str]) -> Callable[[str], None]:
    """Writes one line (``"\\n"`` added) to ``stream``: with ``os.write`` on its
    descriptor when it has one (no lock of Python's own held while a write blocks,
    which would stop the interpreter's exit), else with its ``write``."""
    fd = _fileno(stream)
    if fd is None:

        def write_text(line: str) -> None:
            stream.write(line + "\n")
            stream.flush()

        return write_text
    encoding = getattr(stream, "encoding", None) or "utf-8"

    def write_fd(line: str) -> None:
        data = memoryview((line + "\n").encode(encoding, "backslashreplace"))
        while data:
            data = data[os.write(fd, data) :]

    return write_fd


def say_within(stream: IO[str], line: str, timeout: float = FLUSH_AT_EXIT) -> bool:
    """Writes ``line`` to ``stream`` (:func:`stream_writer`) from a thread of its own,
    waiting at most ``timeout`` seconds: a last word (nbankd's error before it exits)
    never holds the exit on a pipe nobody reads. False when it was not written in
    time, or could not be (the stream failing, no thread to spare)."""
    write = stream_writer(stream)
    done = threading.Event()

    def run() -> None:
        with contextlib.suppress(Exception):  # nothing to tell it to: it is the last word
            write(line)
            done.set()

    try:
        threading.Thread(target=run, name="last-word", daemon=True).start()
    except RuntimeError:  # no thread to spare: said here, unbounded, rather than lost
        run()
    return done.wait(timeout)


#: the process's log output (see the module's documentation)
OUTPUT = LogOutput()


def start_writer() -> None:
    """Starts writing logs from the queue, in their own thread, until the exit (which
    waits up to :data:`FLUSH_AT_EXIT` seconds for the queue to be written)."""
    OUTPUT.start()
    atexit.register(flush)


def is_writer(thread: threading.Thread) -> bool:
    """Whether ``thread`` is the log writer (never joined at exit: see :func:`flush`)."""
    return OUTPUT.is_writer(thread)


def flush(timeout: float = FLUSH_AT_EXIT) -> bool:
    """Waits up to ``timeout`` seconds for the queued log lines to be written."""
    return OUTPUT.flush(timeout)
