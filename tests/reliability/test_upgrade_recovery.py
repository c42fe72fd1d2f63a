"""An upgrade in the middle of deposits: the previous release dies at every crash
point, and this release finishes what it left, every input exactly once.

The previous release is the last commit whose journal has schema 3 (before the
identifier rules of the hostile round added schema 4). Its code is taken from the
repository's own history (``git archive``) and run from the same virtual
environment; it is killed at each point of the deposit life cycle on the crash-point
suite's mixed batch, then this release starts on its state directory (migrating the
journal, recovering the items in flight at that step) and every invariant of the
crash-point suite is checked, including a second recovery that changes nothing.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.daemon import DaemonHarness
from nbankd.deposit.journal import SCHEMA_VERSION
from reliability import figures
from reliability import test_crashpoints as crashpoints

PREVIOUS_RELEASE = "3c4625e"  # journal schema 3, code under src/
PREVIOUS_SCHEMA = 3
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The previous release's packages, extracted from this repository's history."""
    where = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "src"],
        capture_output=True,
    )
    assert archive.returncode == 0, (
        f"git archive {PREVIOUS_RELEASE} failed ({archive.stderr.decode(errors='replace')}): "
        "this test needs the repository's history (a clone without --depth)"
    )
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    yield where / "src"


def _journal_schema(h: DaemonHarness) -> int:
    with sqlite3.connect(h.state_dir / "journal.sqlite3") as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_this_release_migrates_the_previous_journal() -> None:
    """The previous release's journal schema is one this release migrates from."""
    assert PREVIOUS_SCHEMA < SCHEMA_VERSION


@pytest.mark.parametrize("point", crashpoints.ENUMERATED)
def test_upgrade_after_a_crash_at_point(
    daemon_factory: Callable[..., DaemonHarness], previous_release: Path, point: str
) -> None:
    """Killed at this point running the previous release, the state is finished by
    this release with every input exactly once."""
    h = daemon_factory()

    def written_by_the_previous_release(h: DaemonHarness) -> None:
        assert _journal_schema(h) == PREVIOUS_SCHEMA

    result = crashpoints.crash_and_recover(
        h,
        point,
        crashing_env={"PYTHONPATH": str(previous_release)},
        after_crash=written_by_the_previous_release,
        # the previous release named a duplicate it rejected itself "sha1-taken"
        dup_codes=("duplicate", "sha1-taken"),
    )
    assert _journal_schema(h) == SCHEMA_VERSION
    figures.record("upgrade-recovery", point, result)
