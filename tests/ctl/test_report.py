"""nbankctl's Report: what a command found and how it ended decide its exit status."""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend
from nbankctl.cli import Stopped, _stop_signals_raise, build_parser
from nbankctl.report import EXIT_INTERRUPTED, Report
from nbankd import errors

# what a command can record, by name (errors with each of the exit codes they carry)
EVENTS = {
    "failed": lambda r: r.failed(),
    "unreachable": lambda r: r.unreachable(),
    "usage error": lambda r: r.error(errors.UsageError("bad option")),
    "problems error": lambda r: r.error(errors.ProblemsFound("stopped")),
    "outage error": lambda r: r.error(errors.RegistryUnavailable("down")),
    "output closed": lambda r: r.output_closed(),
    "interrupted": lambda r: r.interrupted(),
    "terminated": lambda r: r.interrupted(signal.SIGTERM),
    "hung up": lambda r: r.interrupted(signal.SIGHUP),
}


def report_of(*events: str) -> Report:
    report = Report()
    for event in events:
        EVENTS[event](report)
    return report


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ((), errors.EXIT_OK),
        (("failed",), errors.EXIT_PROBLEMS),
        (("failed", "failed", "failed"), errors.EXIT_PROBLEMS),
        (("unreachable",), errors.EXIT_UNREACHABLE),
        (("failed", "unreachable"), errors.EXIT_UNREACHABLE),
        (("usage error",), errors.EXIT_USAGE),
        (("outage error",), errors.EXIT_UNREACHABLE),
        (("failed", "usage error"), errors.EXIT_USAGE),
        (("unreachable", "problems error"), errors.EXIT_PROBLEMS),
        (("failed", "unreachable", "output closed"), errors.EXIT_OK),
        (("output closed", "problems error"), errors.EXIT_PROBLEMS),
        (("interrupted",), EXIT_INTERRUPTED),
        (("failed", "unreachable", "interrupted"), EXIT_INTERRUPTED),
        (("usage error", "interrupted"), EXIT_INTERRUPTED),
        (("terminated",), 143),
        (("failed", "usage error", "hung up"), 129),
        (("terminated", "interrupted"), 143),
    ],
    ids=lambda value: " + ".join(value) or "nothing" if isinstance(value, tuple) else str(value),
)
def test_the_exit_status_follows_the_documented_precedence(
    events: tuple[str, ...], status: int
) -> None:
    """Interrupt 128 + signal (130 Ctrl-C) > ending error's code > output closed 0 >
    unreachable 3 > failed 1."""
    assert report_of(*events).exit_code == status


@pytest.mark.parametrize(
    "events",
    [
        ("failed", "unreachable"),
        ("failed", "unreachable", "problems error"),
        ("failed", "output closed", "usage error", "interrupted"),
    ],
    ids=" + ".join,
)
def test_the_exit_status_does_not_depend_on_the_order_things_were_recorded(
    events: tuple[str, ...],
) -> None:
    """Every order of the same records gives the same status."""
    statuses = {report_of(*order).exit_code for order in itertools.permutations(events)}
    assert len(statuses) == 1


def test_no_failure_counted_is_success() -> None:
    """`failed(0)` records nothing (a summary with no failures can be passed as it is)."""
    report = Report()
    report.failed(0)
    assert (report.failures, report.exit_code) == (0, errors.EXIT_OK)


def test_failures_are_counted() -> None:
    """Each failure recorded adds to the count, one at a time or several at once."""
    report = Report()
    report.failed()
    report.failed(3)
    assert report.failures == 4


def test_a_negative_number_of_failures_is_refused() -> None:
    """`failed(-1)` is a programming error, not a way to undo a failure."""
    with pytest.raises(ValueError, match="negative"):
        Report().failed(-1)


def test_the_error_that_ended_a_command_is_said_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`error()` prints `nbankctl: ` and the error with its hint, on stderr only."""
    Report().error(errors.UsageError("no such thing", hint="try another"))
    out, err = capsys.readouterr()
    assert (out, err) == ("", "nbankctl: no such thing (try another)\n")


def test_a_registry_answer_with_terminal_escapes_ends_the_command_shown_as_text(
    django_backend: Backend,
) -> None:
    """A server's refusal quoting ESC, BEL, C1 and a newline: controls as text, lines kept."""
    name = django_backend.resource(django_backend.blob("escapes"), None)
    user = "ghost\x1b]0;pwned\x07\nsecond line\x9b2J"
    r = django_backend.ctl("modify", "--experimenter", user, name)
    assert r.returncode == 1, r.stderr
    assert not set(r.stderr) & {"\x1b", "\x07", "\x9b"}, repr(r.stderr)
    assert r.stderr.splitlines() == [
        "nbankctl: experimenter: no such user 'ghost\\x1b]0;pwned\\x07",
        "second line\\u009b2J' (experimenter must be a registry username)",
    ]


def test_an_error_of_several_lines_naming_a_file_keeps_its_lines(tmp_path: Path) -> None:
    """A configuration's problems, one a line, in a file named with ESC: lines kept, ESC as text."""
    config = tmp_path / "lab\x1b[2J.yaml"
    config.write_text("bogus: 1\nregistry: 5\n")
    r = subprocess.run(
        [NBANKCTL, "-c", str(config), "status"],
        env={k: v for k, v in os.environ.items() if not k.startswith("NBANK")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == errors.EXIT_USAGE, r.stderr
    shown = f"{tmp_path}/lab\\x1b[2J.yaml"
    assert "\x1b" not in r.stderr
    assert r.stderr.splitlines() == [
        f"nbankctl: {shown}: 2 problems in the configuration:",
        f"  {shown}:1: bogus: unknown key",
        f"  {shown}:2: registry: must be 'embedded' or the URL of a django-neurobank "
        "registry (https://host/neurobank/), not the number 5",
    ]


def test_the_first_error_decides_when_two_are_recorded() -> None:
    """The error that ended the command is the first recorded; both are printed."""
    report = report_of("usage error", "outage error")
    assert report.exit_code == errors.EXIT_USAGE


def handlers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, object]]:
    """(command, handler) of every command under ``parser``, sub-commands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                func = sub.get_default("func")
                if func is not None:
                    yield name, func
                yield from handlers(sub)


def test_every_command_handler_records_into_a_report_and_returns_nothing() -> None:
    """Each registered handler is `(args, report) -> None`: none returns a status."""
    found = dict(handlers(build_parser()))
    assert len(found) > 20  # every topic was registered
    for name, func in found.items():
        signature = inspect.signature(func)  # type: ignore[arg-type]
        assert list(signature.parameters) == ["args", "report"], name
        assert signature.return_annotation in (None, "None"), name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_sigterm_and_sighup_raise_in_the_command_as_ctrl_c_does(sig: int) -> None:
    """While a command runs, SIGTERM and SIGHUP raise Stopped (its clean-ups run), a
    repeat during the clean-ups is ignored, and the previous handler is put back."""
    before = signal.getsignal(sig)
    cleaned = []
    with pytest.raises(Stopped) as info, _stop_signals_raise():
        try:
            os.kill(os.getpid(), sig)
            signal.pause()  # not reached: the handler raises first
        finally:
            os.kill(os.getpid(), sig)  # a repeat: ignored
            cleaned.append(True)
    assert info.value.signum == sig and cleaned == [True]
    assert signal.getsignal(sig) == before


def test_a_signal_ignored_before_the_command_stays_ignored() -> None:
    """Under ``nohup`` (SIGHUP ignored), a hang-up does not stop the command."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _stop_signals_raise():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
