"""The embedded registry's connection handling: one SQLite connection per thread
(opened again after a fork), write transactions under ``BEGIN IMMEDIATE``, and
SQLite's errors turned into the registry's typed errors (see :mod:`.embedded`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nbankd import errors
from nbankd.registry import embedded_rules as rules
from nbankd.registry import embedded_schema as schema
from nbankd.registry.embedded_json import register_functions


@dataclass
class _Batch:
    """A thread's batch of writes under way (:meth:`EmbeddedDatabase.batch`)."""

    conn: sqlite3.Connection | None = None  # set by the first write, which begins it
    lost: str | None = None  # why SQLite undid the batch's transaction, if it did


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
        self._user = rules.os_user()
        schema.create_file(self.db_path)
        with self._guard():
            schema.prepare(self._conn())

    # --- connections and transactions ---------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if self._closed:
            raise errors.RegistryError(f"the embedded registry {self.db_path} is closed")
        with self._guard():
            conn = schema.connect(self.db_path, self.busy_timeout)
        register_functions(conn)
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append((os.getpid(), conn))
        return conn

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
        conn = self._conn()
        with self._guard():
            if state.conn is None:
                conn.execute("BEGIN IMMEDIATE")  # should it fail, the next write tries again
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
