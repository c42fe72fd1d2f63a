"""What one nbankctl command found and how it ended, and the exit status that follows.

Every command handler takes the parsed arguments and a :class:`Report`, and records
into it instead of returning a status: :meth:`Report.failed` for each item that
failed (an unknown id, a mismatch, a problem found), :meth:`Report.unreachable` when
the command judged that the registry or the daemon could not be reached. ``cli.main``
records how the command ended, when it ended early: :meth:`Report.error`,
:meth:`Report.output_closed` or :meth:`Report.interrupted`; then it exits with
:attr:`Report.exit_code`, the one place deciding the status (SPEC section 4).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from nbankd import errors
from nbankd.names import lines_without_controls

#: the status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it); one
#: stopped by SIGTERM or SIGHUP exits with 128 + that signal (143, 129)
EXIT_INTERRUPTED = 128 + signal.SIGINT


class Report:
    """The findings of one command; :attr:`exit_code` turns them into its status."""

    def __init__(self) -> None:
        self._failures = 0
        self._unreachable = False
        self._error: errors.NbankdError | None = None
        self._output_closed = False
        self._interrupted: int | None = None  # the signal that stopped the command

    # -- what the command found -----------------------------------------------------

    def failed(self, count: int = 1) -> None:
        """Records ``count`` items that failed (0 records nothing)."""
        if count < 0:
            raise ValueError(f"a number of failures cannot be negative, not {count}")
        self._failures += count

    def unreachable(self) -> None:
        """Records that the command judged the registry or the daemon out of reach."""
        self._unreachable = True

    # -- how it ended, when early ---------------------------------------------------

    def error(self, err: errors.NbankdError) -> None:
        """Records the error that ended the command, and says it on stderr: its lines
        as they are, any other control character in it (a registry's text, a file's
        name) shown as text (:func:`~nbankd.names.lines_without_controls`). Like
        everything nbankctl says there, it waits for its reader: a report read slowly
        (``2>&1 | less``) is never cut short."""
        if self._error is None:
            self._error = err
        print(f"nbankctl: {lines_without_controls(str(err))}", file=sys.stderr)

    def output_closed(self) -> None:
        """Records that the reader of the output went away (``| head``): the command
        stopped there, and what it found is not judged."""
        self._output_closed = True

    def interrupted(self, signum: int = signal.SIGINT) -> None:
        """Records that the command was stopped by Ctrl-C (SIGINT), or by ``signum``
        (SIGTERM, SIGHUP)."""
        if self._interrupted is None:
            self._interrupted = int(signum)

    # -- the verdict ----------------------------------------------------------------

    @property
    def failures(self) -> int:
        """How many items failed so far."""
        return self._failures

    @property
    def exit_code(self) -> int:
        """The process exit status; the first that applies, in this order:

        1. interrupted: 128 + the signal (130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP);
        2. ended by an error: that error's own ``exit_code`` (2 usage, configuration or
           permission; 3 unreachable; 1 otherwise);
        3. the output was closed: 0 (the command stopped before judging all it found);
        4. the registry or the daemon was out of reach: 3;
        5. any item failed: 1;
        6. else 0.
        """
        if self._interrupted is not None:
            return 128 + self._interrupted
        if self._error is not None:
            return errors.exit_code_for(self._error)
        if self._output_closed:
            return errors.EXIT_OK
        if self._unreachable:
            return errors.EXIT_UNREACHABLE
        if self._failures:
            return errors.EXIT_PROBLEMS
        return errors.EXIT_OK

    def __repr__(self) -> str:
        return (
            f"Report(failures={self._failures}, unreachable={self._unreachable}, "
            f"error={self._error!r}, output_closed={self._output_closed}, "
            f"interrupted={self._interrupted}, exit_code={self.exit_code})"
        )


#: a command handler, as registered with ``set_defaults(func=...)``
Handler = Callable[[argparse.Namespace, Report], None]

__all__ = ["EXIT_INTERRUPTED", "Handler", "Report"]
