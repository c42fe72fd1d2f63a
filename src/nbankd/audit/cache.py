"""The audit cache: one SQLite file under ``state_dir/audits/``.

``entries`` keeps, per archive and resource, the stat and SHA-1 of the last read
(see :mod:`nbankd.audit.plan`); ``runs`` keeps each audit run's start, whether it
was full, and whether it finished. Results of reads are committed in batches while
a run goes on, so a run that is interrupted (stop, crash, ``kill -9``) resumes
where it stopped: the next start finds the unfinished run and keeps its start
time, and everything read since then counts as done.

Loading an archive's entries is one query; storing a batch is one transaction.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.audit.model import CacheEntry

CACHE_NAME = "cache.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        archive TEXT NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        sha1 TEXT NOT NULL,
        verified_at REAL NOT NULL,
        PRIMARY KEY (archive, name)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        started REAL NOT NULL,
        full INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        finished REAL,
        report TEXT)""",
)


@dataclass(frozen=True)
class RunRecord:
    id: str
    started: float
    full: bool
    trigger: str
    finished: float | None = None
    report: str | None = None


class AuditCache:
    """Thread-safe access to the cache file (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        os.close(fd)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise errors.NbankdError(
                    f"audit cache {self.path} was written by a newer nbankd",
                    hint="upgrade nbankd, or delete the file (the next audit re-reads all)",
                )
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise errors.NbankdError(
                f"audit cache {self.path} cannot be used: {err}",
                hint="delete the file; the next audit re-reads every resource",
            ) from err

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- entries --------------------------------------------------------------------

    def load(self, archive: str) -> dict[str, CacheEntry]:
        """Every cached entry of ``archive``, by resource name (one query)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, size, mtime_ns, inode, sha1, verified_at FROM entries"
                " WHERE archive = ?",
                (archive,),
            ).fetchall()
        return {r[0]: CacheEntry(*r) for r in rows}

    def store(self, archive: str, entries: Iterable[CacheEntry]) -> int:
        """Inserts or replaces entries in one transaction; returns how many."""
        rows = [
            (archive, e.name, e.size, e.mtime_ns, e.inode, e.sha1, e.verified_at) for e in entries
        ]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", rows
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def forget(self, archive: str, names: Iterable[str]) -> int:
        """Drops the entries of resources no longer stored; returns how many."""
        rows = [(archive, n) for n in names]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM entries WHERE archive = ? AND name = ?", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    # -- runs -----------------------------------------------------------------------

    def begin_run(self, run: RunRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO runs (id, started, full, trigger, finished, report)"
                " VALUES (?, ?, ?, ?, NULL, NULL)",
                (run.id, run.started, int(run.full), run.trigger),
            )

    def finish_run(self, run_id: str, finished: float, report: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET finished = ?, report = ? WHERE id = ?", (finished, report, run_id)
            )

    def _runs(self, where: str) -> list[RunRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, started, full, trigger, finished, report FROM runs"
                f" {where} ORDER BY started DESC LIMIT 1"
            ).fetchall()
        return [RunRecord(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]

    def unfinished_run(self) -> RunRecord | None:
        """The latest run that never finished (interrupted), if any."""
        runs = self._runs("WHERE finished IS NULL")
        return runs[0] if runs else None

    def last_run(self) -> RunRecord | None:
        """The latest run, finished or not."""
        runs = self._runs("")
        return runs[0] if runs else None

    def last_finished(self) -> RunRecord | None:
        runs = self._runs("WHERE finished IS NOT NULL")
        return runs[0] if runs else None

    def abandon_unfinished(self, now: float) -> None:
        """Marks every unfinished run as finished without a report (superseded)."""
        with self._lock:
            self._db.execute("UPDATE runs SET finished = ? WHERE finished IS NULL", (now,))


__all__ = ["CACHE_NAME", "AuditCache", "RunRecord"]
