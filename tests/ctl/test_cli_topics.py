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
