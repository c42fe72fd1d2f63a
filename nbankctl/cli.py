"""The ``nbankctl`` command line: one parser, commands registered by topic modules.

Each topic module exposes ``register(subparsers, common)``: it adds its
sub-commands, each with ``set_defaults(func=handler)``; a handler takes the
parsed arguments and a :class:`~nbankctl.report.Report`, records into the report
what it found (failed items, an outage it judged) and returns nothing. :func:`main`
records into the same report how the command ended when it ended early (an error
from the one error tree, said on stderr; the output closed; Ctrl-C, SIGTERM or
SIGHUP) and exits with :attr:`Report.exit_code <nbankctl.report.Report.exit_code>`,
the one place deciding the status.

SIGTERM (``kill``, a job's time limit) and SIGHUP (the terminal or SSH session
closed) raise :class:`Stopped` in the main thread, as SIGINT raises
KeyboardInterrupt, so the command's clean-ups run (a fetch or export removes its
temporary file: nothing partial is left) instead of the process dying on the spot
(:func:`_stop_signals_raise`).

Only the topic that owns the command given is imported (:data:`TOPICS`), so a
daemon command such as ``status`` does not pay for the registry clients; help,
no command or an unknown one imports them all.

As nbank's, ``-v`` before the command is ``--version`` (after it, a command's own
``--verbose``), and ``--debug`` turns on debug messages on stderr: the registry's
requests among them, with credentials never shown (:func:`_debug_logging`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from nbankctl.report import Handler, Report
from nbankctl.stderr import quiet_stderr
from nbankd import __version__, errors

if TYPE_CHECKING:
    import logging

# topic modules, each with register(subparsers, common), and the commands each adds
TOPICS: dict[str, tuple[str, ...]] = {
    "nbankctl.daemon_cmds": (
        "status",
        "queue",
        "history",
        "explain",
        "requeue",
        "pause",
        "resume",
        "rescan",
        "audit",
        "reload",
    ),
    "nbankctl.registry_cmds": (
        "registry-info",
        "init",
        "search",
        "info",
        "modify",
        "dtype",
        "archive",
    ),
    "nbankctl.locate_cmds": ("locate", "verify"),
    "nbankctl.deposit_cmds": ("deposit",),
    "nbankctl.transfer_cmds": ("fetch", "export", "copy"),
    "nbankctl.check_cmds": ("check",),
    "nbankctl.tape_cmds": ("tape",),
    "nbankctl.migrate": ("registry",),
}
# top-level options that take a value (the command is the first word after them)
_VALUE_OPTIONS = ("-c", "--config", "-r", "--registry", "-a", "--auth")


def topics_for(argv: list[str]) -> tuple[str, ...]:
    """The topic modules to import for ``argv``: the one owning its command, else all."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return tuple(TOPICS)  # the top-level help lists every command
        if word in ("-v", "--version"):
            return ()  # argparse prints it and exits: no command is needed
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif word == "--":
            word = next(words, "")
            break
        elif not word.startswith("-"):
            break
    else:
        return tuple(TOPICS)
    owners = tuple(t for t, commands in TOPICS.items() if word in commands)
    return owners or tuple(TOPICS)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command must survive the sub-parser's defaults
    common.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        help="nbankd configuration (default: $NBANKD_CONFIG or /etc/nbankd/config.yaml)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug messages on stderr (the registry requests among them; never credentials)",
    )
    return common


def build_parser(topics: tuple[str, ...] = tuple(TOPICS)) -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="nbankctl",
        allow_abbrev=False,  # topics_for() must see options as they are spelled
        description="Query the neurobank registry, run tape operations and control nbankd.",
        # its own copies: parents share action objects, and set_defaults below would
        # otherwise replace the sub-commands' SUPPRESS (losing "-c FILE COMMAND")
        parents=[_common_options()],
    )
    # -v only before the command (as nbank's); after it, -v is a command's own --verbose
    parser.add_argument("-v", "--version", action="version", version=f"nbankctl {__version__}")
    parser.add_argument(
        "-r", "--registry", help="registry URL (default: $NBANK_REGISTRY, else the configuration)"
    )
    parser.add_argument(
        "-a", "--auth", help="user:password for the registry (visible to other users; prefer netrc)"
    )
    parser.set_defaults(config=None, json=False, debug=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in topics:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub, common)
    return parser


def _debug_logging(args: argparse.Namespace) -> logging.Logger:
    """``--debug``: every logger's debug records on stderr, the registry requests among
    them (urllib3 logs each request's line, never its headers: no credentials), with
    any password, Authorization value or ``user:password@`` of a URL hidden all the same.
    Returns nbankctl's own logger."""
    import logging  # here: a command without --debug does not load it for nbankctl

    from nbankd.service.logs import redact_text

    class Redacting(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return redact_text(super().format(record))

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Redacting("nbankctl: debug: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    log = logging.getLogger("nbankctl")
    log.debug("nbankctl %s, Python %s", __version__, sys.version.split()[0])
    # the command's name only: an option's value may be a password (-a user:pass)
    func = getattr(args, "func", None)
    log.debug("command: %s (%s)", args.command, getattr(func, "__qualname__", "?"))
    return log


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread as SIGINT raises
    KeyboardInterrupt (a BaseException, so that no ``except Exception`` takes it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: the signals that stop a command as Ctrl-C does
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise :class:`Stopped` (once: a
    repeat while the command's clean-ups run is ignored). A signal already ignored
    (``nohup``) stays ignored; the previous handlers are put back after. Only in the
    main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}  # a handler, SIG_DFL, or None (set outside Python)

    def stop(signum: int, frame: FrameType | None) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # the clean-ups are under way
        raise Stopped(signum)

    for sig in STOP_SIGNALS:
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; its exit status. Standard error is :mod:`nbankctl.stderr`'s
    while it runs: it waits for its reader, and its failures never change the status."""
    with quiet_stderr():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    parser = build_parser(topics_for(argv))
    args, extra = parser.parse_known_args(argv)
    # a list of paths split by options (``deposit ARCHIVE -d X FILE``): argparse gives
    # the words after the options back; a command that takes them names its list
    more = getattr(args, "more_positionals", None)
    if extra and (more is None or any(w.startswith("-") for w in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, more, [*getattr(args, more), *extra])
    func: Handler | None = getattr(args, "func", None)
    if func is None:  # as argparse's own usage errors: help, and status 2
        parser.print_help(sys.stderr)
        return errors.EXIT_USAGE
    debug = _debug_logging(args) if args.debug else None
    report = Report()
    try:
        with _stop_signals_raise():
            func(args, report)
    except errors.NbankdError as err:
        if debug is not None:
            debug.debug("the command ended with:", exc_info=True)
        report.error(err)
    except BrokenPipeError:
        report.output_closed()
    except KeyboardInterrupt:
        report.interrupted()
    except Stopped as stop:
        report.interrupted(stop.signum)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
