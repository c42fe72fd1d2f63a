"""The deposit journal: one SQLite database under ``state_dir``.

Every item's state is committed here before the next step relies on it (WAL,
``synchronous=FULL``: a durable commit is on disk when :meth:`Journal.save`
returns). The states of :data:`~nbankd.deposit.lifecycle.DURABLE` (before a step
that moves or removes the input, and REGISTERED) are saved durably; the others
(``durable=False``) are committed without an fsync and reach the disk with the
next durable commit.

**Group commit.** Workers saving at the same moment share one transaction and so
one fsync: the first to arrive while no commit runs becomes the *leader*, takes
every save queued so far and commits them together; the others wait until a
commit that holds their save is on disk (or raise that commit's error). A save
alone is committed at once, never held back to wait for company. Items a scan
finds ready together are journaled in one transaction (:meth:`Journal.add_many`).

**Changed columns only.** A save writes the columns that differ from what this
journal last wrote for the item (worked out by the leader, in commit order, against
the row as committed), so a step that changes the state and a time does not rewrite
the item's name, paths and their index entries: a third of the bytes per commit. An
item not saved before by this process is written whole.
The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` holds
the steps from each version to the next (:mod:`~nbankd.deposit.journal_schema`), run in
one transaction at open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors, seams, sqlschema
from nbankd.deposit.item import (
    FINAL_VALUES,
    STATE_FIELD,
    Item,
    item_of_row,
    row_of,
    update_statement,
)
from nbankd.deposit.journal_schema import MIGRATIONS, SCHEMA_VERSION
from nbankd.deposit.lifecycle import FINAL, State

log = structlog.get_logger("nbankd.journal")

#: seconds the check of the journal's pages at open may take (PRAGMA quick_check:
#: about 0.1 s for 100 000 items, 50 MB, from the page cache); a check not done by then
#: is cut short, logged, and the journal used as before
CHECK_SECONDS = 10.0

#: items inserted and not yet recorded that :meth:`Journal.first_record` remembers
UNRECORDED_LIMIT = 16384


class JournalError(errors.NbankdError):
    """The journal cannot be used (e.g. written by a newer nbankd)."""

    code = "journal"
    exit_code = errors.EXIT_USAGE


class JournalUnavailable(JournalError):
    """The journal's filesystem refuses it (full, read-only, I/O errors): not damage."""

    code = "journal-unavailable"
    exit_code = errors.EXIT_UNREACHABLE


def _damaged(err: sqlite3.DatabaseError) -> bool:
    """Whether SQLite found the journal's file itself bad (not a database, corrupt),
    rather than its filesystem failing to give or take it."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    return not isinstance(err, sqlite3.OperationalError)


#: the journal's mode, and its -wal and -shm files' (SQLite gives them the database's):
#: private to nbankd's user. Whoever can open the -shm, even only to read it, can take a
#: shared lock on its write-lock byte, and every commit then waits (then fails) for as
#: long as they hold it: no deposit moves. Root (backups: ``sqlite3 .backup``) still
#: reads it.
PRIVATE_MODE = 0o600
#: SQLite's files beside the journal, which hold its latest commits and their index
COMPANIONS = ("-wal", "-shm")


def _make_private(path: Path, fd: int | None = None) -> None:
    """Gives ``path`` (or the file open as ``fd``) :data:`PRIVATE_MODE` if it exists and
    has another mode; raises JournalError when it cannot be changed."""
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
        if stat.S_IMODE(st.st_mode) != PRIVATE_MODE:
            if fd is not None:
                os.fchmod(fd, PRIVATE_MODE)
            else:
                os.chmod(path, PRIVATE_MODE)
    except FileNotFoundError:
        return
    except OSError as err:
        raise JournalError(
            f"the journal's file {path} cannot be made private to nbankd's user (mode "
            f"{PRIVATE_MODE:04o}): {err.strerror}; whoever may read it can stop every "
            "deposit by locking it, so nbankd did not start",
            hint=f"give {path} to nbankd's user (uid {os.geteuid()}; the journal and its "
            "-wal and -shm files are its alone) and start nbankd again",
        ) from err


def _space_left(path: Path) -> str:
    """ ", the filesystem holding it is full" when it has (almost) no room left."""
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return ""
    free = fs.f_bavail * fs.f_frsize
    return f" (the filesystem holding it is full: {free:,} bytes free)" if free < 1 << 20 else ""


class Journal:
    """Thread-safe access to the journal: one connection and its lock for writing,
    short transactions in commit order; another connection and lock for reading.

    Reads never wait for a write, this process's or another's (an admin's ``sqlite3``
    shell holding the write lock while the writer waits up to 30 s for it): in WAL
    mode a reader sees the last commit while a transaction is under way, so
    ``nbankctl status`` keeps answering. A read sees every commit that returned before
    it began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        try:
            _make_private(path, fd)  # before SQLite creates -wal and -shm with its mode
        finally:
            os.close(fd)
        for suffix in COMPANIONS:  # left by an earlier run (or release) with another mode
            _make_private(Path(f"{path}{suffix}"))
        self._lock = threading.Lock()  # the writing connection (self._db)
        self._read_lock = threading.Lock()  # the reading connection (self._reader)
        self._reader: sqlite3.Connection | None = None
        # group commit (see the module docstring): saves queued, the ticket of the last
        # one on disk, whether a leader is committing, and errors for the followers
        self._group = threading.Condition()
        self._tickets = 0
        self._saves = 0  # items saved (a ticket may hold several)
        self._queued: list[tuple[int, list[tuple[Any, ...]], bool]] = []  # ticket, rows, durable
        self._committed = 0
        self._committing = False
        self._failed: dict[int, BaseException] = {}
        self._commits = 0  # transactions that held saves
        self._written: dict[int, tuple[Any, ...]] = {}  # item id -> row last committed
        # ids of the items this journal inserted that have not come to record yet
        # (:meth:`first_record`); bounded: one past the bound is simply not in it
        self._unrecorded: set[int] = set()
        self._synced = 0  # of which waited for the disk
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._check_pages()
            self._migrate()
            self._db.execute("SELECT count(*) FROM items").fetchone()
            for suffix in COMPANIONS:  # made by SQLite as the journal's mode: checked
                _make_private(Path(f"{path}{suffix}"))
            self._reader = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._reader.row_factory = sqlite3.Row
            self._reader.execute("PRAGMA query_only=1")
            self._reader.execute("SELECT count(*) FROM items").fetchone()
        except JournalError:
            self._close_connections()
            raise
        except sqlite3.DatabaseError as err:
            self._close_connections()
            if not _damaged(err):  # the disk, not the journal: never advise moving it aside
                raise JournalUnavailable(
                    f"the journal {path} cannot be opened: {err}{_space_left(path)}; nbankd "
                    "stops here rather than guess which deposits are in flight",
                    hint="free space on (or fix) the filesystem holding state_dir and start "
                    "nbankd again; the journal itself was not found damaged: keep it",
                ) from err
            raise JournalError(
                f"the journal {path} cannot be read: {err}; nbankd stops here rather than "
                "guess which deposits are in flight",
                hint="restore state_dir from its backup; if there is none, move the journal "
                "aside (with its -wal and -shm files) and start again: inputs it had claimed "
                "stay in each inbox's .nbank/ folder and nbankctl status names them",
            ) from err

    def _check_pages(self) -> None:
        """Raises JournalError when a page of the journal is damaged (PRAGMA
        quick_check: every b-tree page read and checked, not the indexes against their
        tables), before anything is read from it or migrated in it; a check that takes
        longer than CHECK_SECONDS is cut short (logged), the journal opened as before."""
        checking = [True]  # the timer never interrupts a statement after the check
        guard = threading.Lock()

        def cut_short() -> None:
            with guard:
                if checking[0]:
                    self._db.interrupt()

        timer = threading.Timer(CHECK_SECONDS, cut_short)
        timer.daemon = True
        started = time.monotonic()
        timer.start()
        try:
            rows = self._db.execute("PRAGMA quick_check(3)").fetchall()
        except sqlite3.OperationalError as err:
            if getattr(err, "sqlite_errorname", "") != "SQLITE_INTERRUPT":
                raise
            log.warning(
                "the check of the journal's pages was cut short",
                journal=str(self.path),
                seconds=round(time.monotonic() - started, 1),
            )
            return
        finally:
            with guard:
                checking[0] = False
            timer.cancel()
        problems = [str(r[0]) for r in rows if r[0] != "ok"]
        if problems:
            found = "; ".join(p[:200] for p in problems)
            raise JournalError(
                f"the journal {self.path} is damaged ({found}); nbankd stops here rather "
                "than guess which deposits are in flight",
                hint="restore state_dir from its backup; if there is none, move the journal "
                "aside (with its -wal and -shm files) and start again: inputs it had claimed "
                "stay in each inbox's .nbank/ folder and nbankctl status names them",
            )

    def _migrate(self) -> None:
        with self._lock:
            sqlschema.migrate(
                self._db, [MIGRATIONS[v] for v in range(SCHEMA_VERSION)], newer=self._newer
            )

    def _newer(self, version: int) -> JournalError:
        return JournalError(
            f"journal {self.path} has schema version {version}, newer than this "
            f"nbankd understands ({SCHEMA_VERSION}); upgrade nbankd"
        )

    @property
    def schema_version(self) -> int:
        return int(self._rows("PRAGMA user_version")[0][0])

    def _close_connections(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._db.close()

    def close(self) -> None:
        with self._read_lock, self._lock:
            self._close_connections()

    # -- writing ------------------------------------------------------------------

    def add(self, **values: Any) -> Item:
        """Inserts a new item (state CLAIMING unless given) and returns it, durably."""
        return self.add_many([values])[0]

    def add_many(self, rows: Sequence[dict[str, Any]]) -> list[Item]:
        """Inserts new items (state CLAIMING unless given) in one transaction and
        returns them once it is durable: all of them or, on an error, none."""
        items = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for values in rows:
                    values = dict(values)
                    values["state"] = str(values.get("state", State.CLAIMING))
                    cols = ", ".join(values)
                    marks = ", ".join("?" for _ in values)
                    cur = self._db.execute(
                        f"INSERT INTO items ({cols}) VALUES ({marks}) RETURNING *",
                        tuple(values.values()),
                    )
                    items.append(item_of_row(cur.fetchone()))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            room = max(0, UNRECORDED_LIMIT - len(self._unrecorded))
            self._unrecorded.update(item.id for item in items[:room])
        seams.reached("after-journal-add")
        return items

    def first_record(self, item: Item) -> bool:
        """True the first time it is asked of an item this journal inserted (in this
        process): then no record step has run for it yet, so no receipt can hold its
        token (tokens are new at insert, and only this process, holding the state
        directory's lock, writes receipts for its items). False otherwise: an item
        recovered from an earlier process, asked again (a record step repeated after
        its save failed), or past the bound of items remembered."""
        with self._lock:
            if item.id in self._unrecorded:
                self._unrecorded.remove(item.id)
                return True
            return False

    def _rollback(self) -> None:
        """Ends a failed transaction, if SQLite has not ended it already (a failed
        COMMIT may roll back by itself); a failing ROLLBACK never hides the error that
        caused it."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def save(self, item: Item, *, durable: bool = True) -> Item:
        """Writes every field of ``item`` back (sharing the commit with the saves of
        other threads waiting at the same moment); returns it. ``durable``: on disk
        when this returns; else committed (every reader sees it) and on disk with the
        next durable commit or checkpoint, so a power loss may undo it."""
        self.save_many([item], durable=durable)
        return item

    def save_many(self, items: Sequence[Item], *, durable: bool) -> None:
        """Writes ``items`` back in one transaction (with whatever other threads queued
        at the same moment): all of them or, on an error, none. ``durable`` as for
        :meth:`save`; a batch of which one item must be on disk waits for the disk."""
        if not items:
            return
        rows = [row_of(item) for item in items]
        with self._group:
            self._tickets += 1
            self._saves += len(rows)
            ticket = self._tickets
            self._queued.append((ticket, rows, durable))
            while True:
                if ticket in self._failed:
                    raise self._failed.pop(ticket)
                if self._committed >= ticket:
                    return
                if not self._committing:
                    break
                self._group.wait()
            self._committing = True
            batch, self._queued = self._queued, []
        failures: dict[int, BaseException] = {}
        sync = any(d for _, _, d in batch)
        try:
            try:
                self._commit([row for _, rows, _ in batch for row in rows], sync=sync)
            except sqlite3.OperationalError as err:  # the journal itself: every save fails
                failures = {t: err for t, _, _ in batch}
            except Exception as err:  # a row refused: each save alone, only its own fails
                failures = {batch[0][0]: err} if len(batch) == 1 else self._commit_alone(batch)
        except BaseException as err:  # whatever happens, the waiters are told
            failures = {t: err for t, _, _ in batch}
        with self._group:
            self._committing = False
            if len(failures) < len(batch):
                self._commits += 1
                self._synced += sync
            self._committed = max(self._committed, batch[-1][0])
            self._failed.update((t, e) for t, e in failures.items() if t != ticket)
            self._group.notify_all()
        if ticket in failures:
            raise failures[ticket]

    def _commit_alone(
        self, batch: list[tuple[int, list[tuple[Any, ...]], bool]]
    ) -> dict[int, BaseException]:
        """Commits each save of a batch the database refused as a whole on its own;
        returns the saves refused again, with their errors."""
        failed: dict[int, BaseException] = {}
        for t, rows, durable in batch:
            try:
                self._commit(rows, sync=durable)
            except Exception as err:
                failed[t] = err
        return failed

    def _commit(self, rows: list[tuple[Any, ...]], *, sync: bool) -> None:
        """One transaction writing ``rows`` (the group's leader, in commit order), each
        as the columns that differ from the row last committed for its item."""
        with self._lock:
            if not sync:  # no fsync at this commit (WAL: the next FULL one covers it)
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                written: dict[int, tuple[Any, ...]] = {}
                try:
                    for row in rows:
                        item_id = row[-1]
                        old = written.get(item_id) or self._written.get(item_id)
                        self._db.execute(*update_statement(old, row))
                        written[item_id] = row
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()  # keeps the error that ended the commit
                    for row in rows:  # what the rows hold now is not known
                        self._written.pop(row[-1], None)
                    raise
                for item_id, row in written.items():
                    if row[STATE_FIELD] in FINAL_VALUES:  # never saved again
                        self._written.pop(item_id, None)
                        self._unrecorded.discard(item_id)
                    else:
                        self._written[item_id] = row
            finally:
                if not sync and not self._db.in_transaction:
                    self._db.execute("PRAGMA synchronous=FULL")

    def stats(self) -> dict[str, int]:
        """Group commit at this instant: ``saves`` so far, the ``commits`` that held
        them (fewer when saves shared one), how many of those were ``synced`` (waited
        for the disk), and saves ``queued`` behind a commit."""
        with self._group:
            return {
                "saves": self._saves,
                "commits": self._commits,
                "synced": self._synced,
                "queued": sum(len(rows) for _, rows, _ in self._queued),
            }

    # -- reading ------------------------------------------------------------------

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one read, on the reading connection (never waiting for a write
        of this process: see the class's text)."""
        assert self._reader is not None
        with self._read_lock:
            return self._reader.execute(sql, tuple(args)).fetchall()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Item]:
        return [item_of_row(r) for r in self._rows(sql, args)]

    def get(self, item_id: int) -> Item | None:
        items = self._query("SELECT * FROM items WHERE id = ?", (item_id,))
        return items[0] if items else None

    def unfinished(self) -> list[Item]:
        finals = ", ".join(f"'{s}'" for s in FINAL)
        return self._query(f"SELECT * FROM items WHERE state NOT IN ({finals}) ORDER BY id")

    def in_state(self, state: State, *, inbox_prefix: str = "") -> list[Item]:
        """Every item in ``state`` whose inbox key starts with ``inbox_prefix``."""
        return self._query(
            "SELECT * FROM items WHERE state = ? AND substr(inbox, 1, ?) = ? ORDER BY id",
            (str(state), len(inbox_prefix), inbox_prefix),
        )

    def active_for(self, inbox: str, relpath: bytes) -> Item | None:
        """The in-flight item for this inbox path, if any."""
        finals = ", ".join(f"'{s}'" for s in FINAL)
        items = self._query(
            f"SELECT * FROM items WHERE inbox = ? AND relpath = ? AND state NOT IN ({finals})",
            (inbox, relpath),
        )
        return items[0] if items else None

    def active_relpaths(self, inbox: str) -> set[bytes]:
        """The relative paths of every in-flight item of this inbox (one query)."""
        finals = ", ".join(f"'{s}'" for s in FINAL)
        rows = self._rows(
            f"SELECT relpath FROM items WHERE inbox = ? AND state NOT IN ({finals})", (inbox,)
        )
        return {bytes(r[0]) for r in rows}

    def latest_for(self, inbox: str, relpath: bytes) -> Item | None:
        items = self._query(
            "SELECT * FROM items WHERE inbox = ? AND relpath = ? ORDER BY id DESC LIMIT 1",
            (inbox, relpath),
        )
        return items[0] if items else None

    def identities_since(
        self, state: State, since: float, holding: str
    ) -> list[tuple[str | None, str | None, int | None, str]]:
        """(name, sha1, size, identity) of each item in the final ``state`` that finished
        at ``since`` or later and whose identity holds the text ``holding``: only those
        columns, filtered by SQLite (a journal of many such items is not loaded)."""
        pattern = "%" + holding.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return [
            (r["name"], r["sha1"], r["size"], r["identity"])
            for r in self._rows(
                "SELECT name, sha1, size, identity FROM items WHERE finished >= ? AND "
                "state = ? AND identity LIKE ? ESCAPE '\\' ORDER BY id",
                (since, str(state), pattern),
            )
        ]

    def find_rejected(self, inbox: str, rejected_relpath: bytes) -> Item | None:
        items = self._query(
            "SELECT * FROM items WHERE inbox = ? AND rejected_relpath = ? AND state = ?"
            " ORDER BY id DESC LIMIT 1",
            (inbox, rejected_relpath, str(State.REJECTED)),
        )
        return items[0] if items else None

    def history(
        self,
        *,
        inbox: str | None = None,
        since: float | None = None,
        name: str | None = None,
        states: Sequence[State] = (State.DONE,),
        limit: int = 100,
    ) -> list[Item]:
        """Finished items, newest first."""
        where = [f"state IN ({', '.join('?' for _ in states)})"]
        args: list[Any] = [str(s) for s in states]
        if inbox is not None:
            where.append("inbox = ?")
            args.append(inbox)
        if since is not None:
            where.append("finished >= ?")
            args.append(since)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        args.append(limit)
        return self._query(
            f"SELECT * FROM items WHERE {' AND '.join(where)} ORDER BY finished DESC, id DESC"
            " LIMIT ?",
            args,
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """{(inbox, state): count} over every item ever journaled."""
        rows = self._rows("SELECT inbox, state, count(*) FROM items GROUP BY inbox, state")
        return {(r[0], r[1]): r[2] for r in rows}

    def deposited_names(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` this daemon deposited (an item done under that name)."""
        return self._batched("SELECT name FROM items WHERE state = 'done' AND name IN", names)

    def known_tokens(self, tokens: Iterable[str]) -> set[str]:
        """Which of ``tokens`` name an item of this journal (in any state)."""
        return self._batched("SELECT token FROM items WHERE token IN", tokens)

    def _batched(self, select: str, values: Iterable[str]) -> set[str]:
        """The first column of ``select (?, ?, ...)`` over ``values``, 500 at a time."""
        wanted = list(values)
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            batch = wanted[i : i + 500]
            marks = ", ".join("?" for _ in batch)
            rows = self._rows(f"{select} ({marks})", batch)
            found.update(r[0] for r in rows)
        return found

    def in_flight_names(self) -> set[str]:
        """Identifiers of items that may be between registry and archive (for audits)."""
        finals = ", ".join(f"'{s}'" for s in FINAL)
        rows = self._rows(
            f"SELECT name FROM items WHERE name IS NOT NULL AND state NOT IN ({finals})"
        )
        return {r[0] for r in rows}

    def iter_all(self) -> Iterator[Item]:
        yield from self._query("SELECT * FROM items ORDER BY id")


__all__ = ["SCHEMA_VERSION", "Item", "Journal", "JournalError"]
