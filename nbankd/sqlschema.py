"""Versioned SQLite schemas: the one way nbankd's databases (the journal, the
embedded registry, the audit cache) check and upgrade theirs.

The version lives in ``PRAGMA user_version``. ``migrations[n]`` holds the statements
that take a database from version ``n`` to ``n + 1``; the current version is
``len(migrations)``. :func:`migrate` runs every missing step in one write
transaction (all or nothing), after checking the version again inside it (another
process may have migrated meanwhile); an up-to-date database is only read, so it
opens while another process writes. A database newer than the code raises the
caller's own error, naming its file and what to do.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, current: int, newer: Callable[[int], Exception]) -> int:
    """The database's version; ``newer(version)`` is raised for one above ``current``."""
    version = schema_version(conn)
    if version > current:
        raise newer(version)
    return version


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Sequence[str]],
    *,
    newer: Callable[[int], Exception],
) -> int:
    """Brings ``conn`` (autocommit mode: ``isolation_level=None``) to version
    ``len(migrations)``; returns the version it had."""
    current = len(migrations)
    version = check_version(conn, current, newer)
    if version == current:
        return version
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = check_version(conn, current, newer)  # migrated meanwhile?
        for step in range(version, current):
            for statement in migrations[step]:
                conn.execute(statement)
        if version != current:
            conn.execute(f"PRAGMA user_version = {current}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version


__all__ = ["check_version", "migrate", "schema_version"]
