"""The audit cache: one SQLite file under ``state_dir/audits/``.

``entries`` keeps, per archive and resource, the stat (size, mtime, inode, ctime)
and SHA-1 of the last read, when, and by which run (see :mod:`nbankd.audit.plan`);
``runs`` keeps each audit run's start, whether it was full, and whether it
finished. Results of reads are committed in batches while a run goes on, so a run
that is interrupted (stop, crash, ``kill -9``) resumes where it stopped: the next
start finds the unfinished run and keeps its id, and everything that run read
counts as done.

The schema is versioned (``PRAGMA user_version``). A cache of an older version is
rebuilt (its entries are dropped, so the next audit reads every resource once; its
runs are kept); a cache of a newer nbankd is refused. Every SQLite failure becomes
:class:`AuditCacheError` naming the file, what was being done, and what to do.
:func:`open_or_reset` moves a damaged file aside (``cache.sqlite3.bad-<time>``) and
starts a new one: a cache only saves work, it never holds anything that cannot be
re-read.

Loading an archive's entries is one query; storing a batch is one transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors, sqlschema
from nbankd.archive.fsops import fsync_dir
from nbankd.audit.model import CacheEntry
from nbankd.names import is_utf8
from nbankd.timefmt import compact_stamp

CACHE_NAME = "cache.sqlite3"
SCHEMA_VERSION = 2
_ENTRIES = """CREATE TABLE IF NOT EXISTS entries (
        archive TEXT NOT NULL,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        sha1 TEXT NOT NULL,
        verified_at REAL NOT NULL,
        run_id TEXT NOT NULL,
        PRIMARY KEY (archive, name)) WITHOUT ROWID"""
_RUNS = """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        started REAL NOT NULL,
        full INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        finished REAL,
        report TEXT)"""
#: MIGRATIONS[n] takes a cache from version n to n + 1: an older cache's entries lack the
#: ctime and run id, so the last step drops them (the next audit re-reads every file)
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    *(() for _ in range(SCHEMA_VERSION - 1)),
    ("DROP TABLE IF EXISTS entries", _ENTRIES, _RUNS),
)
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


class AuditCacheError(errors.NbankdError):
    """The audit cache cannot be read or written. ``corrupt``: the file is damaged
    (it may be moved aside and rebuilt)."""

    code = "audit-cache"

    def __init__(self, message: str, *, hint: str = "", corrupt: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.corrupt = corrupt


def _hint(err: sqlite3.Error) -> tuple[str, bool]:
    """(what to do, whether the file is damaged) for a SQLite error."""
    name = getattr(err, "sqlite_errorname", "") or ""
    text = str(err).lower()
    if name in _CORRUPT or "malformed" in text or "not a database" in text:
        return "the file is damaged: delete it; the next audit then re-reads every resource", True
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return (
            "the daemon's user must be able to write the file and its folder: fix their "
            "owner and mode, or delete it; the next audit then re-reads every resource",
            False,
        )
    if name == "SQLITE_FULL" or "disk is full" in text:
        return "free space on the filesystem of state_dir", False
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in text:
        return "another process (an audit script?) holds the cache; it is retried later", False
    return "check the file and its folder; deleting it only makes the next audit slower", False


def cache_error(path: Path, doing: str, err: sqlite3.Error | OSError) -> AuditCacheError:
    """An :class:`AuditCacheError` naming the file, the operation and what to do."""
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        hint = "the daemon's user must be able to create and write the file and its folder"
        return AuditCacheError(f"audit cache {path}: {reason} while {doing}", hint=hint)
    hint, corrupt = _hint(err)
    return AuditCacheError(f"audit cache {path}: {err} while {doing}", hint=hint, corrupt=corrupt)


@dataclass(frozen=True)
class RunRecord:
    id: str
    started: float
    full: bool
    trigger: str
    finished: float | None = None
    report: str | None = None


class AuditCache:
    """Thread-safe access to the cache file (one connection, one lock).

    ``check`` runs SQLite's ``quick_check`` at open, so a damaged file is found now
    rather than in the middle of an audit. ``timeout``: seconds to wait for a lock
    another process holds.
    """

    def __init__(self, path: Path, *, check: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(self.path):
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640))
        except OSError as err:
            raise cache_error(self.path, "creating it", err) from err
        try:
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise cache_error(self.path, "opening it", err) from err
        try:
            self._prepare(check)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self, check: bool) -> None:
        with self._locked("opening it"):
            db = self._db
            version = sqlschema.check_version(db, SCHEMA_VERSION, self._newer)
            if check:
                verdict = db.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    raise AuditCacheError(
                        f"audit cache {self.path} is damaged: {verdict}",
                        hint="delete it; the next audit then re-reads every resource",
                        corrupt=True,
                    )
            if version == SCHEMA_VERSION:
                return  # nothing to write: a cache that cannot be written still opens
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            sqlschema.migrate(db, MIGRATIONS, newer=self._newer)

    def _newer(self, version: int) -> AuditCacheError:
        return AuditCacheError(
            f"audit cache {self.path} was written by a newer nbankd"
            f" (schema {version}, this one knows {SCHEMA_VERSION})",
            hint="upgrade nbankd, or delete the file; the next audit then re-reads every resource",
        )

    @contextlib.contextmanager
    def _locked(self, doing: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite errors become AuditCacheError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as err:
                raise cache_error(self.path, doing, err) from err

    def _write(self, doing: str, sql: str, rows: list[tuple[object, ...]]) -> None:
        """``sql`` for every row, in one transaction."""
        with self._locked(doing) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, rows)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- entries --------------------------------------------------------------------

    def load(self, archive: str) -> dict[str, CacheEntry]:
        """Every cached entry of ``archive``, by resource name (one query)."""
        with self._locked(f"loading the entries of {archive}") as db:
            rows = db.execute(
                "SELECT name, size, mtime_ns, inode, ctime_ns, sha1, verified_at, run_id"
                " FROM entries WHERE archive = ?",
                (archive,),
            ).fetchall()
        return {r[0]: CacheEntry(*r) for r in rows}

    def store(self, archive: str, entries: Iterable[CacheEntry]) -> int:
        """Inserts or replaces entries in one transaction; returns how many. A name that
        is not UTF-8 text (a stray file's undecodable bytes) is not cached: read again by
        every audit, as SQLite cannot hold it as text."""
        rows: list[tuple[object, ...]] = [(archive, *e) for e in entries if is_utf8(e.name)]
        if rows:
            self._write(
                "storing what an audit read",
                "INSERT OR REPLACE INTO entries (archive, name, size, mtime_ns, inode,"
                " ctime_ns, sha1, verified_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def forget(self, archive: str, names: Iterable[str]) -> int:
        """Drops the entries of resources no longer stored; returns how many."""
        rows: list[tuple[object, ...]] = [(archive, n) for n in names if is_utf8(n)]
        if rows:
            self._write(
                "forgetting resources no longer stored",
                "DELETE FROM entries WHERE archive = ? AND name = ?",
                rows,
            )
        return len(rows)

    # -- runs -----------------------------------------------------------------------

    def begin_run(self, run: RunRecord) -> None:
        with self._locked("recording the start of an audit") as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (id, started, full, trigger, finished, report)"
                " VALUES (?, ?, ?, ?, NULL, NULL)",
                (run.id, run.started, int(run.full), run.trigger),
            )

    def finish_run(self, run_id: str, finished: float, report: str | None) -> None:
        with self._locked("recording the end of an audit") as db:
            db.execute(
                "UPDATE runs SET finished = ?, report = ? WHERE id = ?", (finished, report, run_id)
            )

    def _runs(self, where: str) -> list[RunRecord]:
        """The run begun last that matches ``where``: by the order the runs were recorded
        in (rowid), not their start times, which a clock step can put out of order."""
        with self._locked("reading past audits") as db:
            rows = db.execute(
                "SELECT id, started, full, trigger, finished, report FROM runs"
                f" {where} ORDER BY rowid DESC LIMIT 1"
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
        with self._locked("closing an interrupted audit") as db:
            db.execute("UPDATE runs SET finished = ? WHERE finished IS NULL", (now,))


def move_aside(path: Path, now: float | None = None) -> Path:
    """Renames a damaged cache (and its ``-wal``/``-shm``) to ``<name>.bad-<time>``."""
    stamp = compact_stamp(time.time() if now is None else now)
    bad = path.with_name(f"{path.name}.bad-{stamp}")
    os.rename(path, bad)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{bad}{suffix}")
    fsync_dir(path.parent)
    return bad


def open_or_reset(path: Path) -> tuple[AuditCache, Path | None]:
    """Opens (and checks) the cache; a damaged one is moved aside and a new one made.

    Returns (cache, where the damaged file went, or None). Raises AuditCacheError
    when the cache cannot be used otherwise (newer schema, permissions, disk).
    """
    try:
        return AuditCache(path, check=True), None
    except AuditCacheError as err:
        if not err.corrupt:
            raise
        try:
            bad = move_aside(path)
        except OSError as move_err:
            raise cache_error(path, "moving the damaged file aside", move_err) from err
    return AuditCache(path, check=True), bad


__all__ = [
    "CACHE_NAME",
    "SCHEMA_VERSION",
    "AuditCache",
    "AuditCacheError",
    "RunRecord",
    "cache_error",
    "move_aside",
    "open_or_reset",
]
