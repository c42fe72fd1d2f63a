"""The embedded registry's database file: creation, connections, schema and migrations.

The schema version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` holds one
step per version, so a later nbankd upgrades an older file when it opens it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from nbankd import errors, sqlschema

#: the schema version this code writes; older databases are migrated on open
SCHEMA_VERSION = 1
#: owner writes, group reads (SPEC guarantee 8); SQLite gives -wal and -shm the same mode
DB_MODE = 0o640

# --- schema ------------------------------------------------------------------------------

_V1 = (
    """CREATE TABLE datatype (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        content_type TEXT NOT NULL DEFAULT '',
        extension TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE archive (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        scheme TEXT NOT NULL,
        root TEXT NOT NULL,
        accessibility INTEGER NOT NULL DEFAULT 0,
        UNIQUE (scheme, root))""",
    """CREATE TABLE resource (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        sha1 TEXT UNIQUE,
        dtype_id INTEGER NOT NULL REFERENCES datatype (id),
        created_on TEXT NOT NULL,
        created_by TEXT NOT NULL,
        metadata TEXT,
        experimenter TEXT,
        animal TEXT)""",
    "CREATE INDEX resource_experimenter ON resource (experimenter)",
    "CREATE INDEX resource_animal ON resource (animal)",
    "CREATE INDEX resource_created_on ON resource (created_on)",
    """CREATE TABLE location (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        resource_id INTEGER NOT NULL REFERENCES resource (id) ON DELETE CASCADE,
        archive_id INTEGER NOT NULL REFERENCES archive (id) ON DELETE CASCADE,
        key TEXT,
        UNIQUE (resource_id, archive_id))""",
    "CREATE INDEX location_archive ON location (archive_id)",
    """CREATE UNIQUE INDEX location_archive_key ON location (archive_id, key)
        WHERE key IS NOT NULL""",
)

#: MIGRATIONS[n] upgrades a database from version n to n + 1
MIGRATIONS: tuple[Sequence[str], ...] = (_V1,)


def migrate(conn: sqlite3.Connection) -> int:
    """Brings the schema up to SCHEMA_VERSION in one write transaction; returns the old version.

    An up-to-date database is only read (no write lock), so readers and a busy
    database open fine. ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    return sqlschema.migrate(conn, MIGRATIONS, newer=_newer)


def _newer(version: int) -> errors.RegistryError:
    return errors.RegistryError(
        f"the embedded registry's schema is version {version}, newer than this "
        f"nbankd understands ({SCHEMA_VERSION})",
        hint="upgrade nbankd",
    )


def create_file(path: Path) -> bool:
    """Creates an empty database file mode 0640 whatever the umask; True if it was created.

    An existing file is left as it is (its mode is never loosened).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, DB_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, DB_MODE)  # the umask may have removed group read
    finally:
        os.close(fd)
    return True


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), waiting on locks."""
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout,
        isolation_level=None,
        check_same_thread=False,  # used by one thread only, but closed by close()
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")  # a commit survives a crash of the host
    return conn


def prepare(conn: sqlite3.Connection) -> None:
    """Puts a database in WAL mode and migrates its schema to SCHEMA_VERSION."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
