"""The global --json works before every command: no command's own option undoes it."""

from __future__ import annotations

import pytest

from nbankctl.cli import TOPICS, build_parser

#: each command's words with the fewest arguments it parses
COMMANDS = [
    ["status"],
    ["queue"],
    ["history"],
    ["explain", "f"],
    ["requeue", "f"],
    ["pause"],
    ["resume"],
    ["rescan"],
    ["audit"],
    ["reload"],
    ["registry-info"],
    ["init", "d"],
    ["search", "x"],
    ["info", "x"],
    ["modify", "x", "-k", "a=1"],
    ["dtype", "list"],
    ["archive", "list"],
    ["archive", "check", "d"],
    ["locate", "x"],
    ["verify", "f"],
    ["deposit", "a", "f"],
    ["fetch", "x"],
    ["export", "out.tar", "x"],
    ["copy", "d", "x"],
    ["check", "registry"],
    ["check", "archive", "d"],
    ["check", "all"],
    ["check", "tar", "t.tar"],
    ["tape", "prune", "a", "list"],
    ["registry", "export"],
]


def test_the_table_names_every_command() -> None:
    """Each command nbankctl has appears in the table below (a new one must be added)."""
    assert {words[0] for words in COMMANDS} == {c for cs in TOPICS.values() for c in cs}


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w[:2]) for w in COMMANDS])
def test_json_before_the_command_reaches_it(words: list[str]) -> None:
    """`nbankctl --json WORDS` parses with json set, and without it json is off."""
    parser = build_parser()
    assert parser.parse_args(["--json", *words]).json is True
    assert parser.parse_args(words).json is False
