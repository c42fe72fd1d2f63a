"""nbankctl's standard error, bounded: what a command says there never holds it for ever.

:func:`bounded_stderr` puts a :class:`BoundedStderr` in ``sys.stderr`` for the whole
command, so every write there (headings, warnings, a line per item, tqdm's bar,
argparse's usage, ``--debug``'s log, the last error line) goes through one writer
thread. A write returns once its text is written, as before, unless the writer has
been blocked for :data:`DEADLINE` seconds (a pipe nobody reads, a terminal paused
with Ctrl-S): from then on what the command says there is dropped, at once, until
the writer gets through again, when a line says how much was dropped. Standard
output is left as it is: a reader that stops reading it still holds the command, as
any program's.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

#: how long a write waits for a blocked standard error before dropping output (as
#: long as nbankd waits at exit for its last log lines, and nbankctl did for its last
#: error line alone)
DEADLINE = 2.0


def _raw_writer(stream: TextIO) -> Callable[[str], None]:
    """Writes text to ``stream``: with ``os.write`` on its descriptor when it has one
    (no lock of Python's own held while a write blocks), else with its ``write``."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        fd = None
    if fd is None:

        def write_text(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write_text
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.flush()  # anything said before it is ours goes first

    def write_fd(text: str) -> None:
        data = memoryview(text.encode(encoding, "backslashreplace"))
        while data:
            data = data[os.write(fd, data) :]

    return write_fd


class BoundedStderr(io.TextIOBase):
    """A text stream that writes to ``stream`` from a thread of its own and waits for
    it at most ``deadline`` seconds (see the module's documentation). It never raises
    for its output: a standard error that fails drops what is said there."""

    def __init__(self, stream: TextIO, deadline: float = DEADLINE) -> None:
        super().__init__()
        self.stream = stream
        self.deadline = deadline
        self._raw = _raw_writer(stream)
        self._cond = threading.Condition()
        self._pending: list[str] = []
        self._given = 0  # writes handed to the writer
        self._done = 0  # writes it has finished (written, or failed)
        self._stuck = False  # a wait passed the deadline: drop until the writer is back
        self._failed = False  # the stream failed: drop everything from then on
        self.dropped = 0  # characters dropped, for the note once the writer is back
        self._thread: threading.Thread | None = None

    # -- TextIO's face ---------------------------------------------------------------

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def write(self, text: str) -> int:
        """Hands ``text`` to the writer and, when it ends a line, waits until it is
        written, at most the deadline (a line said is out before the command goes on,
        as before); dropped at once while the writer is blocked past it."""
        if not text:
            return 0
        with self._cond:
            if self._failed or self._stuck:
                self.dropped += len(text)
                return len(text)
            if self.dropped:  # the writer got through again: say what was lost
                self._pending.append(
                    f"\nnbankctl: {self.dropped} characters of standard error were dropped "
                    "while nothing read it\n"
                )
                self._given += 1
                self.dropped = 0
            self._pending.append(text)
            self._given += 1
            self._start()
            self._cond.notify_all()
            if text.endswith("\n"):
                self._wait(self._given)
        return len(text)

    def flush(self) -> None:
        """Waits, at most the deadline, for what was handed over to be written."""
        with self._cond:
            if not (self._failed or self._stuck):
                self._wait(self._given)

    def wait_written(self, timeout: float) -> bool:
        """Waits at most ``timeout`` seconds for everything handed over to be written (or
        to fail), stuck or not; whether it was."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._done < self._given:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:  # the stream it writes to is not ours to close
        with contextlib.suppress(Exception):
            self.flush()

    # -- the writer --------------------------------------------------------------------

    def _wait(self, target: int) -> None:
        """Waits (holding the condition) until write ``target`` is done, at most the
        deadline; past it, the writer is stuck."""
        end = time.monotonic() + self.deadline
        while self._done < target and not self._failed:
            left = end - time.monotonic()
            if left <= 0:
                self._stuck = True
                return
            self._cond.wait(left)

    def _start(self) -> None:
        if self._thread is not None:
            return
        thread = threading.Thread(target=self._run, name="nbankctl-stderr", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to spare: failing, nothing said
            self._failed = True
            return
        self._thread = thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending, []
            try:
                self._raw("".join(batch))
            except Exception:  # a closed or failing stderr: nothing to tell it to
                with self._cond:
                    self._failed = True
            with self._cond:
                self._done += len(batch)
                if not self._pending:
                    self._stuck = False  # through again: the next write goes out
                self._cond.notify_all()


@contextlib.contextmanager
def bounded_stderr(deadline: float = DEADLINE) -> Iterator[BoundedStderr]:
    """``sys.stderr`` made a :class:`BoundedStderr` for the block, then given back
    (after waiting, at most the deadline, for what was said to be written)."""
    original = sys.stderr
    bounded = BoundedStderr(original, deadline)
    sys.stderr = bounded
    try:
        yield bounded
    finally:
        bounded.flush()
        if sys.stderr is bounded:
            sys.stderr = original


__all__ = ["DEADLINE", "BoundedStderr", "bounded_stderr"]
