"""An upgrade in the middle of deposits: a previous release dies at every crash
point, and this release finishes what it left, every input exactly once.

The previous releases are the last commit of each journal schema (3: before the
identifier rules of the hostile round; 4: before the zip and metadata-reader intent;
5: the last landed release). Their code is taken from the repository's own history
(``git archive``) and run from the same virtual environment; each is killed at each
point of the deposit life cycle on the crash-point suite's mixed batch, then this
release starts on its state directory (migrating the journal, recovering the items
in flight at that step) and every invariant of the crash-point suite is checked,
including a second recovery that changes nothing.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.daemon import DaemonHarness
from nbankd.deposit.journal import SCHEMA_VERSION
from reliability import figures
from reliability import test_crashpoints as crashpoints

#: commit -> (its journal schema, the folder holding its nbankd package)
RELEASES = {
    "3c4625e": (3, "src"),  # the hostile round's start; packages under src/
    "c538826": (4, "nbankd"),  # before directories: zip and file_metadata
    "3943df0": (5, "nbankd"),  # the last release that landed
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=sorted(RELEASES, key=lambda c: RELEASES[c][0]))
def previous_release(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, int]]:
    """A previous release's packages, extracted from this repository's history, and
    its journal schema."""
    commit = request.param
    schema, folder = RELEASES[commit]
    where = tmp_path_factory.mktemp(f"release-{commit}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, folder], capture_output=True
    )
    assert archive.returncode == 0, (
        f"git archive {commit} failed ({archive.stderr.decode(errors='replace')}): "
        "this test needs the repository's history (a clone without --depth)"
    )
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    yield (where / "src" if folder == "src" else where), schema


def _journal_schema(h: DaemonHarness) -> int:
    with sqlite3.connect(h.state_dir / "journal.sqlite3") as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


@pytest.mark.parametrize("commit", sorted(RELEASES))
def test_each_previous_release_writes_the_schema_the_table_says(commit: str) -> None:
    """The release's own journal.py (from history) declares the schema RELEASES names,
    one this release reads (the same, or one it migrates from)."""
    schema, folder = RELEASES[commit]
    source = f"{commit}:{'src/' if folder == 'src' else ''}nbankd/deposit/journal.py"
    text = subprocess.run(
        ["git", "-C", str(REPO), "show", source], capture_output=True, text=True, check=True
    ).stdout
    declared = re.search(r"^SCHEMA_VERSION = (\d+)$", text, re.MULTILINE)
    assert declared is not None and int(declared.group(1)) == schema
    assert schema <= SCHEMA_VERSION


#: the crash points the previous releases have (this release added after-round-fsyncs)
PREVIOUS_POINTS = tuple(p for p in crashpoints.ENUMERATED if p != "after-round-fsyncs")


@pytest.mark.parametrize("point", PREVIOUS_POINTS)
def test_upgrade_after_a_crash_at_point(
    daemon_factory: Callable[..., DaemonHarness], previous_release: tuple[Path, int], point: str
) -> None:
    """Killed at this point running the previous release, the state is finished by
    this release with every input exactly once."""
    h = daemon_factory()
    packages, schema = previous_release

    def written_by_the_previous_release(h: DaemonHarness) -> None:
        assert _journal_schema(h) == schema

    result = crashpoints.crash_and_recover(
        h,
        point,
        crashing_env={"PYTHONPATH": str(packages)},
        after_crash=written_by_the_previous_release,
        # the previous release named a duplicate it rejected itself "sha1-taken"
        dup_codes=("duplicate", "sha1-taken"),
    )
    assert _journal_schema(h) == SCHEMA_VERSION
    figures.record("upgrade-recovery", f"{point} (schema {schema})", result)
