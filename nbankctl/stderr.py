"""nbankctl's standard error: what a command says there is its report (headings, a
line per item, the summary, the error that ends it), so a write waits for its reader
as any program's output does: a report read slowly (``2>&1 | less``, the pager
paused) is given whole, never cut short. Nothing waits in a buffer: each write goes
to the descriptor at once, so a command stopped while its reader is away (Ctrl-C,
SIGTERM) has nothing left to write and ends at once. A standard error that fails
(closed, its reader gone, on a full disk) loses what is said there, never the
command's outcome: :class:`QuietStderr` drops the failed write and the command ends
with its own exit status."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import IO, Any


def _descriptor(stream: IO[str] | None) -> int | None:
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError):  # not a file (a test's capture): written as a stream
        return None


class QuietStderr:
    """A text stream over ``stream`` (None: stderr closed): each write goes to its
    descriptor unbuffered and waits as that does; a failure is dropped and counted in
    :attr:`failed`. A stream without a descriptor is written and flushed as it is."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.failed = 0  # writes or flushes that failed
        self._fd = _descriptor(stream)
        self.encoding: str = getattr(stream, "encoding", None) or "utf-8"
        self.errors: str = getattr(stream, "errors", None) or "backslashreplace"
        if self._fd is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()  # type: ignore[union-attr]  # what was said before, first

    def write(self, text: str) -> int:
        try:
            if self._fd is not None:
                data = memoryview(text.encode(self.encoding, self.errors))
                while data:
                    data = data[os.write(self._fd, data) :]
            elif self.stream is not None:
                self.stream.write(text)
                self.stream.flush()
        except (OSError, ValueError):  # closed, EPIPE, ENOSPC: said to no one
            self.failed += 1
        return len(text)

    def flush(self) -> None:
        if self._fd is None and self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.failed += 1

    def fileno(self) -> int:
        if self._fd is None:
            raise OSError("standard error has no descriptor here")
        return self._fd

    def isatty(self) -> bool:
        return self._fd is not None and os.isatty(self._fd)

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[QuietStderr]:
    """``sys.stderr`` is a :class:`QuietStderr` while the block runs."""
    before = sys.stderr
    quiet = QuietStderr(before)
    sys.stderr = quiet  # type: ignore[assignment]
    try:
        yield quiet
    finally:
        sys.stderr = before


__all__ = ["QuietStderr", "quiet_stderr"]
