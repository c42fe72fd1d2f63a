"""Every command of the real nbank 0.13 has its nbankctl counterpart, named in the
README's "Coming from nbank" table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANK, NBANKCTL

README = Path(__file__).resolve().parents[2] / "README.md"

#: nbank's command words -> nbankctl's
COUNTERPARTS: dict[str, str] = {
    "registry-info": "registry-info",
    "init": "init",
    "deposit": "deposit",
    "locate": "locate",
    "search": "search",
    "info": "info",
    "verify": "verify",
    "modify": "modify",
    "fetch": "fetch",
    "export": "export",
    "copy": "copy",
    "dtype list": "dtype list",
    "dtype add": "dtype add",
    "archive list": "archive list",
    "archive check": "archive check",
    "archive register-tar": "tape register",
    "archive prune": "tape prune",
    "archive import-tar": "tape import",
    "check registry": "check registry",
    "check archive": "check archive",
    "check all": "check all",
    "check tar": "check tar",
}


def _choices(*words: str) -> list[str]:
    """The sub-command words ``nbank WORDS --help`` lists (its ``{a,b,c}`` usage)."""
    out = subprocess.run([NBANK, *words, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    match = re.search(r"\{([a-z,-]+)\}", out.stdout)
    return match.group(1).split(",") if match else []


def nbank_commands() -> list[str]:
    """Every command of the installed nbank, with its sub-commands spelled out."""
    commands = []
    for word in _choices():
        subs = _choices(word)
        commands += [f"{word} {s}" for s in subs] if subs else [word]
    return commands


def test_every_nbank_command_has_a_counterpart() -> None:
    """The installed nbank's command list is exactly the one mapped here."""
    assert sorted(nbank_commands()) == sorted(COUNTERPARTS)


@pytest.mark.parametrize("nbank_words", sorted(COUNTERPARTS))
def test_the_counterpart_exists_and_is_in_the_readme(nbank_words: str) -> None:
    """`nbankctl WORDS --help` works, and the README's table maps the nbank command to it."""
    ours = COUNTERPARTS[nbank_words]
    r = subprocess.run([NBANKCTL, *ours.split(), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    section = README.read_text().split("## Coming from nbank", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `nbank " + nbank_words)]
    assert rows, f"no README row for nbank {nbank_words}"
    assert f"`nbankctl {ours}" in rows[0]
