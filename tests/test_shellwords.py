"""Shell quoting of file names: what a user pastes gives back the exact name."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nbankd.shellwords import quote, requeue_command

NAMES = [
    "plain.wav",
    "my file.wav",
    "it's.wav",
    "-dash.wav",
    "new\nline.wav",
    "tab\there",
    "back\\slash",
    os.fsdecode(b"latin1-\xe9.wav"),
    "caf\u00e9.wav",
    "$(touch pwned)",
]


@pytest.mark.parametrize("name", NAMES)
def test_bash_reads_the_quoted_name_back_byte_for_byte(name: str, tmp_path: Path) -> None:
    """``bash -c "printf %s QUOTED"`` prints the name's exact bytes."""
    out = subprocess.run(
        ["bash", "-c", f"printf %s {quote(name)}"], capture_output=True, check=True, cwd=tmp_path
    )
    assert out.stdout == os.fsencode(name)
    assert not (tmp_path / "pwned").exists()


def test_requeue_command_names_a_non_default_configuration() -> None:
    """``-c CONFIG`` is given unless the configuration is the default file."""
    assert requeue_command("/in/rejected/a b", Path("/etc/nbankd/config.yaml")) == (
        "nbankctl requeue '/in/rejected/a b'"
    )
    assert requeue_command("/in/r/x", Path("/srv/my lab.yaml")) == (
        "nbankctl -c '/srv/my lab.yaml' requeue /in/r/x"
    )
