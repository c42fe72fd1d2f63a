"""The global --json works before every command: no command's own option undoes it;
and the commands whose text nbank logs write JSON, and only JSON, to standard output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fixtures.cli_backends import Backend
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
    ["dtype", "add", "n", "text/plain"],
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
    ["tape", "register", "T", "0", "t.tar"],
    ["tape", "import", "t.tar", "a"],
    ["registry", "export"],
    ["registry", "import", "f", "--to", "u"],
    ["registry", "migrate", "--to", "u"],
    ["registry", "switch", "--to", "u"],
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


# --- the output: JSON on stdout, whichever side of the command word --json is -----------


def with_json(where: str, *words: str) -> list[str]:
    """WORDS with --json before the command word (global) or after all of them (its own)."""
    return ["--json", *words] if where == "before" else [*words, "--json"]


def json_out(backend: Backend, argv: list[str]) -> Any:
    """Runs nbankctl ARGV; its standard output as one JSON document (stderr empty)."""
    proc = backend.ctl(*argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


@pytest.mark.parametrize("where", ["before", "after"])
def test_init_json_prints_the_new_archive(backend: Backend, where: str) -> None:
    """init --json prints the archive's record, the registry and the nbank.json it wrote."""
    folder = backend.tmp / backend.name("js")
    out = json_out(backend, with_json(where, "init", str(folder)))
    assert out["archive"] == {
        "name": folder.name,
        "scheme": "neurobank",
        "root": str(folder),
        "accessibility": "local",
    }
    assert (out["registry"], out["path"], out["registered"]) == (
        backend.registry.url,
        str(folder),
        True,
    )
    assert out["nbank_json"] == json.loads((folder / "nbank.json").read_text())


@pytest.mark.parametrize("where", ["before", "after"])
def test_registry_info_json_on_stdout(backend: Backend, where: str) -> None:
    """registry-info --json prints the address, backend and the registry's own info."""
    out = json_out(backend, with_json(where, "registry-info"))
    assert (out["address"], out["backend"]) == (backend.registry.url, backend.registry.backend)
    assert out["api_version"] == "1.2"


@pytest.mark.parametrize("where", ["before", "after"])
def test_dtype_add_json_on_stdout(backend: Backend, where: str) -> None:
    """dtype add --json prints the new datatype's record."""
    name = backend.name("dt")
    out = json_out(backend, with_json(where, "dtype", "add", name, "audio/wav"))
    assert (out["name"], out["content_type"]) == (name, "audio/wav")
