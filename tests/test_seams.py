"""The registry of test seams: every name is listed and checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbankd import seams

ROOT = Path(__file__).resolve().parents[1]


def _named_in_code(pattern: str) -> set[str]:
    found: set[str] = set()
    for package in ("nbankd", "nbankctl"):
        for path in (ROOT / package).rglob("*.py"):
            found |= set(re.findall(pattern, path.read_text()))
    return found


def test_every_point_reached_in_the_code_is_listed() -> None:
    """Each crash point and audit pause named in the code is in the registry, and
    each deposit point of the registry is reached somewhere (literal names or the
    constants the migration code names them by)."""
    literal = _named_in_code(r'seams\.reached\("([^"]+)"\)')
    constants = _named_in_code(r'^[A-Z_]+ = "((?:migrate|switch)-[a-z-]+)"')
    assert literal | constants <= set(seams.DEPOSIT_POINTS + seams.OTHER_POINTS)
    assert set(seams.DEPOSIT_POINTS) <= literal
    assert _named_in_code(r'seams\.audit_pause\("([^"]+)"\)') == set(seams.AUDIT_POINTS)


def test_reaching_an_unlisted_point_is_an_error() -> None:
    """A point the registry does not list raises instead of doing nothing."""
    with pytest.raises(ValueError, match="not a crash point"):
        seams.reached("after-nothing")
    with pytest.raises(ValueError, match="not an audit pause point"):
        seams.audit_pause("nowhere")


@pytest.mark.parametrize("var", ["NBANKD_CRASH_AT", "NBANKD_PAUSE_AT", "NBANKD_AUDIT_PAUSE_AT"])
def test_a_variable_naming_an_unknown_point_stops_the_import(var: str) -> None:
    """A typo in a seam variable fails loudly (a test would else pass vacuously)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    proc = subprocess.run(
        [sys.executable, "-c", "import nbankd.seams"],
        env={**env, var: "after-claimm"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"{var}='after-claimm' names no test seam" in proc.stderr


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("NBANKD_WATCH_DEAF", "yes", "is neither 1 (deaf) nor 0"),
        ("NBANKD_WEDGE_AFTER", "soon", "is not a number of seconds above 0"),
        ("NBANKD_WEDGE_AFTER", "0", "is not a number of seconds above 0"),
        ("NBANKD_READER_UNCONFINED", "yes", "is neither 1 (unconfined) nor 0"),
    ],
)
def test_a_value_seam_holding_a_value_it_does_not_take_stops_the_import(
    var: str, value: str, message: str
) -> None:
    """A value seam set to something it cannot mean fails loudly, like a point's typo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    proc = subprocess.run(
        [sys.executable, "-c", "import nbankd.seams"],
        env={**env, var: value},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"{var}={value!r} {message}" in proc.stderr


def test_value_seams_read_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """watch_deaf is on only for 1, and wedge_after falls back to the given default."""
    assert seams.watch_deaf({seams.WATCH_DEAF: "1"}) is True
    assert seams.watch_deaf({seams.WATCH_DEAF: "0"}) is False
    assert seams.watch_deaf({}) is False
    monkeypatch.delenv(seams.WEDGE_AFTER, raising=False)
    assert seams.wedge_after(900.0) == 900.0
    monkeypatch.setenv(seams.WEDGE_AFTER, "1.5")
    assert seams.wedge_after(900.0) == 1.5


def test_every_nbankd_variable_in_the_code_is_a_registered_seam_or_the_config() -> None:
    """Each NBANKD_ environment variable the code spells is a seam listed in the
    registry, or $NBANKD_CONFIG, where the configuration is found."""
    from nbankd.config.model import CONFIG_ENV

    registered = {
        seams.CRASH_AT,
        seams.HANG_AT,
        seams.RAISE_AT,
        seams.PAUSE_AT,
        seams.PAUSE_UNTIL,
        seams.AUDIT_PAUSE_AT,
        seams.AUDIT_PAUSE_UNTIL,
        seams.WATCH_DEAF,
        seams.WEDGE_AFTER,
        seams.READER_UNCONFINED,
    }
    assert _named_in_code(r'"(NBANKD_[A-Z_]+)"') <= registered | {CONFIG_ENV}
