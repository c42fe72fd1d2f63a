"""The switch's file edits: the configuration's registry line, nbank.json, backups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from nbankd.archive.fsops import write_atomic
from nbankd.migration import switch

URL = "https://lab.example/neurobank/"

EDITS = [
    (
        "value replaced, comment kept",
        "# my config\nregistry: embedded   # for now\nstate_dir: /var/lib/nbankd\n",
        "# my config\nregistry: https://lab.example/neurobank/   # for now\n"
        "state_dir: /var/lib/nbankd\n",
    ),
    (
        "missing key inserted after the leading comments",
        "# comment\n---\nstate_dir: /s\n",
        "# comment\n---\nregistry: https://lab.example/neurobank/\nstate_dir: /s\n",
    ),
    (
        "registry_url commented out",
        "registry: embedded\nregistry_url: https://old/neurobank/\nstate_dir: /s\n",
        "registry: https://lab.example/neurobank/\n# registry_url: https://old/neurobank/"
        "  # replaced by 'registry' (nbankctl registry switch T)\nstate_dir: /s\n",
    ),
    (
        "quoted value",
        'registry: "embedded"\n',
        "registry: https://lab.example/neurobank/\n",
    ),
]


@pytest.mark.parametrize(("before", "after"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_config_edits_change_only_the_registry_lines(before: str, after: str) -> None:
    """The registry line is edited in place; everything else is byte for byte the same."""
    edit = switch.edit_config_text(before, URL, stamp="T")
    assert edit.text == after
    parsed = yaml.safe_load(after)
    assert parsed["registry"] == URL and "registry_url" not in parsed


def test_registry_auth_is_set_or_added() -> None:
    """--registry-auth replaces an existing registry_auth or adds one under registry."""
    added = switch.edit_config_text("registry: embedded\nx: 1\n", URL, registry_auth="/etc/a")
    assert added.text == f"registry: {URL}\nregistry_auth: /etc/a\nx: 1\n"
    replaced = switch.edit_config_text(
        "registry_auth: /old  # creds\nregistry: embedded\n", URL, registry_auth="/etc/a"
    )
    assert replaced.text == f"registry_auth: /etc/a  # creds\nregistry: {URL}\n"


UNSAFE = [
    ("flow style", "{registry: embedded, state_dir: /s}\n", "editing lines would"),
    ("duplicate key", "registry: embedded\nregistry: embedded\n", "appears twice"),
    ("block scalar", "registry: >\n  embedded\n", "does not edit"),
    ("anchor", "registry: &r embedded\nother: *r\n", "does not edit"),
    ("not a mapping", "- a\n- b\n", "not a mapping"),
    ("broken yaml", "registry: [\n", "does not parse"),
]


@pytest.mark.parametrize(("text", "why"), [u[1:] for u in UNSAFE], ids=[u[0] for u in UNSAFE])
def test_unsafe_configurations_are_not_edited(text: str, why: str) -> None:
    """What line edits cannot change safely is refused, with the edits to make by hand."""
    edit = switch.edit_config_text(text, URL)
    assert edit.text is None
    assert why in edit.unsafe
    assert edit.edits[0] == f"set 'registry: {URL}'"


def test_an_edited_configuration_already_switched_is_unchanged() -> None:
    """Running the edit again on its own output changes nothing."""
    first = switch.edit_config_text("registry: embedded\n", URL)
    assert first.text is not None
    second = switch.edit_config_text(first.text, URL)
    assert second.text == first.text and not second.changed


def test_replace_file_keeps_a_backup_mode_and_no_temp(tmp_path: Path) -> None:
    """The old content goes to NAME.bak-STAMP; the new file keeps the old mode."""
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    backup = switch.replace_file(path, b"new\n", "20240101T000000Z")
    assert backup == tmp_path / "config.yaml.bak-20240101T000000Z"
    assert backup.read_text() == "old\n" and path.read_text() == "new\n"
    assert (path.stat().st_mode & 0o777, backup.stat().st_mode & 0o777) == (0o640, 0o640)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", backup.name]


def test_backups_in_the_same_second_get_a_counter(tmp_path: Path) -> None:
    """Two runs in one second keep both backups (.bak-STAMP, .bak-STAMP.1): none overwritten."""
    path = tmp_path / "nbank.json"
    path.write_text("first\n")
    one = switch.replace_file(path, b"second\n", "T")
    two = switch.replace_file(path, b"third\n", "T")
    assert (one.name, two.name) == ("nbank.json.bak-T", "nbank.json.bak-T.1")
    assert (one.read_text(), two.read_text(), path.read_text()) == (
        "first\n",
        "second\n",
        "third\n",
    )
    assert sorted(os.listdir(tmp_path)) == ["nbank.json", one.name, two.name]  # no temp left


def test_write_atomic_never_replaces_when_asked_not_to(tmp_path: Path) -> None:
    """replace=False refuses an existing file and leaves it and no temporary file behind."""
    path = tmp_path / "x"
    write_atomic(path, b"one", mode=0o600)
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_atomic(path, b"two", replace=False)
    write_atomic(path, b"three")
    assert path.read_bytes() == b"three" and os.listdir(tmp_path) == ["x"]


def test_nbank_json_rewrite_changes_only_the_registry(tmp_path: Path) -> None:
    """Only 'registry' changes (key order kept); the archive names the old one before."""
    path = tmp_path / "nbank.json"
    data = {"$schema": "s", "project": {"name": None}, "registry": "file:///db/", "policy": {}}
    path.write_text(json.dumps(data, indent=4))
    assert switch.check_nbank_json(path, "file:///db", URL).action == "rewrite"
    backup = switch.rewrite_nbank_json(path, URL, "T")
    new = json.loads(path.read_text())
    assert list(new) == list(data) and new == {**data, "registry": URL}
    assert json.loads(backup.read_text()) == data
    assert switch.check_nbank_json(path, "file:///db/", URL).action == "already"
    assert switch.check_nbank_json(path, "file:///other/", URL.upper()).action == "other"
    assert switch.check_nbank_json(tmp_path / "none.json", "a", URL).action == "unreadable"


def test_nbank_json_naming_either_url_of_the_embedded_registry_is_rewritten(
    tmp_path: Path,
) -> None:
    """With registry_url set, an archive still naming the database's file: URL is old too."""
    path = tmp_path / "nbank.json"
    olds = ("https://old.example/neurobank/", "file:///var/lib/nbankd/registry.sqlite3/")
    for named in (*olds, "https://old.example/neurobank"):
        path.write_text(json.dumps({"registry": named}))
        assert switch.check_nbank_json(path, olds, URL).action == "rewrite", named
    path.write_text(json.dumps({"registry": "https://third.example/neurobank/"}))
    assert switch.check_nbank_json(path, olds, URL).action == "other"
