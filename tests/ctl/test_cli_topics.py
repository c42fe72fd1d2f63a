"""nbankctl imports only the topic module that owns the command it is given."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nbankctl.cli import TOPICS, build_parser, topics_for


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse keeps sub-parsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_topic_table_lists_exactly_the_commands_the_module_registers(topic: str) -> None:
    """TOPICS names every command each module adds, and no other."""
    assert _commands(build_parser((topic,))) == set(TOPICS[topic])


@pytest.mark.parametrize(
    ("argv", "topic"),
    [
        (["status"], "nbankctl.daemon_cmds"),
        (["-c", "/x.yaml", "audit", "--full"], "nbankctl.daemon_cmds"),
        (["--json", "-r", "http://h/", "search", "-k", "x"], "nbankctl.registry_cmds"),
        (["-a", "u:p", "tape", "list"], "nbankctl.tape_cmds"),
        (["-r", "http://h/", "locate", "abc"], "nbankctl.locate_cmds"),
        (["--config", "status", "registry", "export"], "nbankctl.migrate"),
    ],
)
def test_a_command_imports_only_its_topic(argv: list[str], topic: str) -> None:
    """The first word after the options (and their values) picks one topic."""
    assert topics_for(argv) == (topic,)


@pytest.mark.parametrize(
    "argv", [[], ["--help"], ["-h", "status"], ["--json"], ["no-such-command"], ["-c"]]
)
def test_help_no_command_or_an_unknown_one_imports_every_topic(argv: list[str]) -> None:
    """Without a known command every topic is imported, so help and errors list them all."""
    assert topics_for(argv) == tuple(TOPICS)


def test_a_daemon_command_does_not_import_the_registry_client() -> None:
    """`nbankctl status` starts without loading requests or the audit runner."""
    code = (
        "import sys; from nbankctl.cli import build_parser, topics_for;"
        "build_parser(topics_for(['status']));"
        "print(sorted(m for m in ('requests', 'nbankd.audit.run', 'watchdog') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_abbreviated_top_level_options_are_refused() -> None:
    """`--conf FILE` is not taken for --config: the topic chosen must match the parse."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--conf", "tape", "status"])


def test_the_version_imports_no_topic() -> None:
    """`nbankctl --version` prints the version without importing any command topic."""
    assert topics_for(["--version"]) == ()
    code = (
        "import sys; from nbankctl.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('nbankctl.') and m.endswith('_cmds')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nbankctl ") and out.stdout.splitlines()[-1] == "[]"


def test_dash_v_before_a_command_is_the_version() -> None:
    """`nbankctl -v` is `--version` (as nbank's -v): it imports no topic and prints it."""
    assert topics_for(["-v"]) == ()
    out = subprocess.run(
        [sys.executable, "-m", "nbankctl.cli", "-v"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("nbankctl ")


@pytest.mark.parametrize(
    "argv",
    [["check", "all", "-v"], ["check", "archive", "-v", "d"], ["archive", "check", "-v", "d"]],
)
def test_dash_v_after_the_command_is_its_verbose_flag(argv: list[str]) -> None:
    """After the command, -v is the command's own --verbose."""
    assert topics_for(argv) != ()
    assert build_parser(topics_for(argv)).parse_args(argv).verbose is True


@pytest.mark.parametrize(
    ("argv", "debug"),
    [
        (["--debug", "status"], True),
        (["search", "x", "--debug"], True),
        (["-c", "x.yaml", "--debug", "check", "all"], True),
        (["check", "all"], False),
    ],
)
def test_debug_is_taken_before_or_after_the_command(argv: list[str], debug: bool) -> None:
    """--debug is a top-level option; a registry command also takes it after its name."""
    assert build_parser().parse_args(argv).debug is debug


def test_a_command_without_debug_does_not_load_logging() -> None:
    """Debug logging costs nothing when not asked for: `status` parses without `logging`."""
    code = (
        "import sys; from nbankctl.cli import build_parser, topics_for;"
        "build_parser(topics_for(['status'])).parse_args(['status']);"
        "print('logging' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
