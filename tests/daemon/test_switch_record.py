"""What status makes of the record an unfinished registry switch leaves in state_dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nbankd.daemon.pauses import SWITCH_PAUSED, unfinished_switch
from nbankd.daemon.status import switch_problem

URL = "https://lab.example.org/neurobank/"


def _record(state_dir: Path, body: Any) -> dict[str, Any] | None:
    path = state_dir / SWITCH_PAUSED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return unfinished_switch(state_dir)


def test_no_record_means_no_switch(tmp_path: Path) -> None:
    """Without a record no switch is under way."""
    assert unfinished_switch(tmp_path) is None


def test_the_recorded_command_line_is_named(tmp_path: Path) -> None:
    """The status line names the switch's own command line, quoted for a shell."""
    words = ["nbankctl", "-c", "/etc/nbankd/my config.yaml", "registry", "switch", "--to", URL]
    record = _record(tmp_path, {"inboxes": ["/srv/a"], "to": URL, "command": words})
    assert record is not None
    line = switch_problem(record)
    assert line.endswith(
        f"finish it with: nbankctl -c '/etc/nbankd/my config.yaml' registry switch --to {URL}"
    )


@pytest.mark.parametrize(
    "command",
    [None, [], "nbankctl registry switch", ["nbankctl", 3], {"a": 1}],
    ids=["absent", "empty", "text", "not-words", "object"],
)
def test_a_record_without_a_usable_command_names_the_plain_switch(
    tmp_path: Path, command: Any
) -> None:
    """A record of an older nbankctl (or a damaged one) falls back to the plain command."""
    body: dict[str, Any] = {"inboxes": ["/srv/a"], "to": URL}
    if command is not None:
        body["command"] = command
    record = _record(tmp_path, body)
    assert record is not None and record["command"] is None
    assert switch_problem(record).endswith(f"finish it with: nbankctl registry switch --to {URL}")


def test_an_unreadable_record_still_counts_as_a_switch(tmp_path: Path) -> None:
    """A record that is not JSON is an unfinished switch, named with the URL unknown."""
    path = tmp_path / SWITCH_PAUSED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    record = unfinished_switch(tmp_path)
    assert record is not None
    assert "finish it with: nbankctl registry switch --to URL" in switch_problem(record)
