"""The one schema-migration helper of nbankd's databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from nbankd.sqlschema import migrate, schema_version

STEPS = (("CREATE TABLE a (x INTEGER)",), ("ALTER TABLE a ADD COLUMN y INTEGER",))


class Newer(Exception):
    pass


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_every_missing_step_runs_once(tmp_path: Path) -> None:
    """A new database gets every step; a second open changes nothing."""
    db = _db(tmp_path / "a.sqlite3")
    assert migrate(db, STEPS, newer=Newer) == 0
    assert schema_version(db) == 2
    assert migrate(db, STEPS, newer=Newer) == 2
    db.execute("INSERT INTO a (x, y) VALUES (1, 2)")


def test_a_failing_step_leaves_the_old_version(tmp_path: Path) -> None:
    """All or nothing: a step that fails rolls back the steps before it."""
    db = _db(tmp_path / "a.sqlite3")
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, (*STEPS, ("ALTER TABLE nowhere ADD COLUMN z",)), newer=Newer)
    assert schema_version(db) == 0
    assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'a'").fetchall()


def test_a_newer_database_raises_the_callers_error(tmp_path: Path) -> None:
    """A database written by newer code is refused with the caller's own error."""
    db = _db(tmp_path / "a.sqlite3")
    db.execute("PRAGMA user_version = 7")
    with pytest.raises(Newer):
        migrate(db, STEPS, newer=Newer)
