"""The embedded registry's connection handling: one SQLite connection per thread
(opened again after a fork), write transactions under ``BEGIN IMMEDIATE``, and
SQLite's errors turned into the registry's typed errors (see :mod:`.embedded`).

A user who may read the file but not write beside it (the registry's group, while
nbankd is stopped and SQLite's ``-wal`` and ``-shm`` files are gone) cannot open it
as SQLite normally does: the registry then opens read-only, each read going through
:func:`~.embedded_schema.read_snapshot` (or a ``mode=ro`` connection once a ``-wal``
exists), and every write is refused as read-only for this user.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from nbankd import errors
from nbankd.registry import embedded_rules as rules
from nbankd.registry import embedded_schema as schema
from nbankd.registry.embedded_json import register_functions

T = TypeVar("T")

#: one read at a time for read-only registries in this process: SQLite's and our POSIX
#: locks on a file belong to the process, so one connection closing drops another's
_READ_ONLY_READS = threading.Lock()
#: snapshot reads tried before giving up on a registry that keeps changing
_SNAPSHOT_TRIES = 20


@dataclass
class _Batch:
    """A thread's batch of writes under way (:meth:`EmbeddedDatabase.batch`)."""

    conn: sqlite3.Connection | None = None  # set by the first write, which begins it
    lost: str | None = None  # why SQLite undid the batch's transaction, if it did
    #: why the batch could not take the write lock (another process held it for the
    #: whole busy timeout): its later writes fail at once, never waiting that long again
    busy: str | None = None


class EmbeddedDatabase:
    """The SQLite file under an :class:`~nbankd.registry.embedded.EmbeddedRegistry`."""

    def __init__(
        self, db_path: str | os.PathLike[str], url: str | None = None, *, busy_timeout: float = 30.0
    ) -> None:
        self.db_path = Path(os.path.abspath(db_path))
        base = url if url is not None else self.db_path.as_uri()
        self.url: str = base if base.endswith("/") else base + "/"
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, sqlite3.Connection]] = []  # (pid, connection)
        self._closed = False
        self._read_only = False  # this user cannot write it: see the module docstring
        self._user = rules.os_user()
        schema.create_file(self.db_path)
        try:
            with self._guard():
                schema.prepare(self._conn())
        except errors.RegistryAuthError:
            self.release_thread()
            self._read_only = True
            self._read(schema.check_current)

    @property
    def read_only(self) -> bool:
        """True when this user can read the registry but not change it."""
        return self._read_only

    # --- connections and transactions ---------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's read-write connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if self._closed:
            raise errors.RegistryError(f"the embedded registry {self.db_path} is closed")
        if self._read_only:
            raise errors.RegistryAuthError(
                f"the embedded registry {self.db_path} is read-only for this user",
                hint="changes need the registry's owner (nbankd's service user)",
            )
        with self._guard():
            conn = schema.connect(self.db_path, self.busy_timeout)
        register_functions(conn)
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append((os.getpid(), conn))
        return conn

    def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """What ``read`` (queries only) answers on a connection; in read-only mode it
        may run more than once, on a connection of its own."""
        if not self._read_only:
            with self._guard():
                return read(self._conn())
        if self._closed:
            raise errors.RegistryError(f"the embedded registry {self.db_path} is closed")
        with _READ_ONLY_READS, self._guard():
            for _ in range(_SNAPSHOT_TRIES):
                try:
                    answer = schema.read_snapshot(
                        self.db_path, self.busy_timeout, read, register_functions
                    )
                except schema.Changed:
                    continue  # a writer came: read again (through its -wal, if it stays)
                except OSError as err:
                    raise errors.RegistryUnavailable(
                        f"the embedded registry {self.db_path} cannot be read: {err.strerror}"
                    ) from err
                return answer[0] if answer is not None else self._read_journaled(read)
        raise errors.RegistryUnavailable(
            f"the embedded registry {self.db_path} kept changing while it was read",
            hint="try again",
        )

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only query, on a connection of its own, closed after
        (a thread that asks once, an audit's listing, leaves nothing open); a user who
        may only read the registry reads it as every read of theirs does."""

        def rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, args).fetchall()

        if self._read_only:
            return self._read(rows)
        with self._guard():
            conn = schema.connect(self.db_path, self.busy_timeout)
            try:
                conn.execute("PRAGMA query_only = 1")
                return rows(conn)
            finally:
                conn.close()

    def _read_journaled(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """``read`` on a ``mode=ro`` connection, for a read-only user while a -wal exists."""
        conn = schema.connect_read_only(self.db_path, self.busy_timeout)
        try:
            register_functions(conn)
            return read(conn)
        except sqlite3.OperationalError as err:
            text = str(err)
            if "readonly" not in text and "read-only" not in text:
                raise
            raise errors.RegistryAuthError(
                f"the embedded registry {self.db_path} cannot be read by this user now: "
                f"SQLite needs its -shm file, which only the registry's owner can create "
                f"({text})",
                hint="start nbankd, or run the command as nbankd's service user, once",
            ) from err
        finally:
            conn.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turns SQLite's operational errors into registry errors."""
        try:
            yield
        except sqlite3.OperationalError as err:
            text = str(err)
            if "readonly" in text or "read-only" in text:
                raise errors.RegistryAuthError(
                    f"the embedded registry {self.db_path} is read-only for this user: {text}",
                    hint="changes need the registry's owner (nbankd's service user)",
                ) from err
            raise errors.RegistryUnavailable(
                f"the embedded registry {self.db_path} is unavailable: {text}"
            ) from err
        except sqlite3.DatabaseError as err:
            raise errors.RegistryError(f"the embedded registry {self.db_path}: {err}") from err

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes this thread makes inside are committed together at its end: one
        transaction (and one fsync) for many. Each write is a savepoint of it, so a
        refused write undoes only itself. Raises the registry's errors when the batch
        cannot be committed; none of its writes happened then. The write lock is held
        from the first write to the end: keep the body to the writes. Nested, it is
        part of the outer batch."""
        if getattr(self._local, "batch", None) is not None:
            yield
            return
        state = _Batch()
        self._local.batch = state
        try:
            yield
        except BaseException:
            self._local.batch = None
            if state.conn is not None and state.conn.in_transaction:
                with self._guard():
                    state.conn.execute("ROLLBACK")
            raise
        self._local.batch = None
        if state.lost is None and state.conn is not None and not state.conn.in_transaction:
            # SQLite undid the transaction on a failing read (IOERR, FULL, NOMEM roll
            # back even a read-only statement's transaction), and no write came after
            state.lost = "SQLite rolled the transaction back"
        if state.lost is not None:
            if state.conn is not None and state.conn.in_transaction:
                with self._guard():
                    state.conn.execute("ROLLBACK")
            raise errors.RegistryUnavailable(
                f"the embedded registry {self.db_path} undid a batch of writes: {state.lost}"
            )
        if state.conn is not None and state.conn.in_transaction:
            with self._guard():
                try:
                    state.conn.execute("COMMIT")
                except BaseException:
                    if state.conn.in_transaction:
                        state.conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def _batched(self, state: _Batch) -> Iterator[sqlite3.Connection]:
        """One write of a batch: a savepoint in the batch's transaction."""
        if state.lost is not None:  # its earlier writes are gone: this one may not stand
            raise errors.RegistryUnavailable(
                f"the embedded registry {self.db_path} undid a batch of writes: {state.lost}"
            )
        if state.busy is not None:
            raise errors.RegistryUnavailable(
                f"the embedded registry {self.db_path} is unavailable: {state.busy} (another "
                f"process held its write lock for {self.busy_timeout:g} s)"
            )
        conn = self._conn()
        with self._guard():
            if state.conn is None:
                try:  # should it fail otherwise, the next write tries again
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as err:
                    if conn.in_transaction or "locked" not in str(err):
                        raise
                    # waited the whole busy timeout: the batch's other writes would each
                    # wait as long (a round of 64 registrations, half an hour)
                    state.busy = str(err)
                    raise
                state.conn = conn
            elif not conn.in_transaction:  # SQLite rolled the whole batch back (a full disk)
                state.lost = "SQLite rolled the transaction back"
                raise errors.RegistryUnavailable(
                    f"the embedded registry {self.db_path} undid a batch of writes: {state.lost}"
                )
            conn.execute("SAVEPOINT nbankd_write")
            try:
                yield conn
                conn.execute("RELEASE nbankd_write")
            except BaseException as err:
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO nbankd_write")
                    conn.execute("RELEASE nbankd_write")
                else:
                    state.lost = f"SQLite rolled the transaction back: {err}"
                raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        state: _Batch | None = getattr(self._local, "batch", None)
        if state is not None:
            with self._batched(state) as conn:
                yield conn
            return
        conn = self._conn()
        with self._guard():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already
                    conn.execute("ROLLBACK")
                raise

    def release_thread(self) -> None:
        """Closes the calling thread's connection, if it has one (a thread that is about
        to end: its connection would otherwise stay open until :meth:`close`)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            self._connections = [(o, c) for o, c in self._connections if c is not conn]
        conn.close()

    def close(self) -> None:
        """Closes the connections this object opened in this process (a forked child
        leaves its parent's alone)."""
        pid = os.getpid()
        with self._lock:
            self._closed = True
            mine = [conn for owner, conn in self._connections if owner == pid]
            self._connections = []
        for conn in mine:
            conn.close()
        self._local.conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def exists(conn: sqlite3.Connection, sql: str, *params: Any) -> bool:
    return conn.execute(sql, params).fetchone() is not None


__all__ = ["EmbeddedDatabase", "exists"]
