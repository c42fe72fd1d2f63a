"""The embedded registry's database file: creation, connections, schema and migrations.

The schema version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` holds one
step per version, so a later nbankd upgrades an older file when it opens it.

:func:`read_snapshot` lets a user who may read the file but not create files beside
it (the registry's group, SPEC guarantee 10) read it while no ``-wal`` file exists,
which SQLite's own read-only WAL support needs (https://www.sqlite.org/wal.html,
"Read-Only Databases"); see its docstring for why that read is safe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nbankd import errors, sqlschema

T = TypeVar("T")

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


def check_current(conn: sqlite3.Connection) -> None:
    """For a reader that cannot migrate: the schema must be SCHEMA_VERSION."""
    version = sqlschema.check_version(conn, SCHEMA_VERSION, _newer)
    if version < SCHEMA_VERSION:
        raise errors.RegistryAuthError(
            f"the embedded registry's schema is version {version}, older than this "
            f"nbankd's ({SCHEMA_VERSION}), and this user cannot upgrade it",
            hint="start nbankd (the registry's owner upgrades it when it opens it)",
        )


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


# --- reading without -wal and -shm files (a reader who cannot create them) --------------

# SQLite's locks on a database file (the lock-byte page at 1 GiB, see
# https://www.sqlite.org/fileformat2.html#the_lock_byte_page, laid out by its unix VFS):
# a reader's SHARED lock is a read lock on _SHARED_SIZE bytes from _SHARED_FIRST, taken
# while holding a read lock on _PENDING_BYTE (so that a writer waiting for EXCLUSIVE
# is not starved). A WAL-mode connection holds SHARED as long as it is open.
_PENDING_BYTE = 0x40000000
_SHARED_FIRST = _PENDING_BYTE + 2
_SHARED_SIZE = 510


class Changed(Exception):
    """A writer came while a snapshot was read: its answer may be stale or torn."""


def journaled(path: Path) -> bool:
    """Whether a ``-wal`` or ``-journal`` file is beside the database: then committed
    changes may be outside the database file, and only SQLite may read it."""
    return any(os.path.lexists(f"{path}{suffix}") for suffix in ("-wal", "-journal"))


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _lock_shared(fd: int, timeout: float) -> None:
    """Takes SQLite's SHARED lock on the database file (as its readers do), waiting up to
    ``timeout`` seconds for a writer holding PENDING or EXCLUSIVE."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, _PENDING_BYTE)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, _PENDING_BYTE)
            return
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("database is locked") from err
        time.sleep(0.01)


def read_snapshot(
    path: Path,
    busy_timeout: float,
    read: Callable[[sqlite3.Connection], T],
    setup: Callable[[sqlite3.Connection], None],
) -> tuple[T] | None:
    """``(read(conn),)`` for a connection to the database file as it is; None when a
    ``-wal`` or ``-journal`` file exists (then SQLite's own read-only support applies).

    Only reads: it creates no file and takes only a read lock. The connection is
    ``immutable=1`` (SQLite takes no locks and ignores journals), which is right only
    while nobody changes the file and no committed change lives in a ``-wal``. Both
    hold from the moment SQLite's SHARED lock is held and no ``-wal`` exists: SQLite
    deletes a ``-wal`` only after checkpointing all of it, under an EXCLUSIVE lock,
    which the SHARED lock refuses (so one appearing meanwhile stays); the file changes
    only through a ``-wal`` (a checkpoint) or under EXCLUSIVE (rollback mode, which
    leaves a ``-journal``). So the answer stands if no ``-wal``/``-journal`` exists and
    the file is the same once ``read`` is done; otherwise :class:`Changed` is raised
    (read again). A writer never waits on this reader, except for the EXCLUSIVE lock
    of a last connection's closing checkpoint, which SQLite then skips (keeping its
    ``-wal``), as for any reader. POSIX locks belong to the process: the caller must
    keep its other connections to this file closed meanwhile.
    """
    real = Path(os.path.realpath(path))  # SQLite puts -wal beside the symlink's target
    fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _lock_shared(fd, busy_timeout)
        before = _identity(os.fstat(fd))
        if journaled(real):
            return None
        uri = real.as_uri() + "?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            setup(conn)
            try:
                value = read(conn)
            except sqlite3.DatabaseError:
                if journaled(real) or _identity(os.stat(real)) != before:
                    raise Changed from None  # a torn page, not a damaged file
                raise
            # checked before closing: closing any descriptor of the file drops our lock
            if journaled(real) or _identity(os.stat(real)) != before:
                raise Changed
            return (value,)
        finally:
            conn.close()
    finally:
        os.close(fd)


def connect_read_only(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``): SQLite reads a WAL database so when its
    ``-wal`` and ``-shm`` exist, even if this user cannot write them."""
    uri = Path(os.path.realpath(path)).as_uri() + "?mode=ro"
    conn = sqlite3.connect(
        uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    return conn
