"""The deposit journal: durable SQLite rows, one per input."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import wait_for
from nbankd.deposit.journal import SCHEMA_VERSION, Item, Journal, JournalError
from nbankd.deposit.lifecycle import FINAL, IN_FLIGHT, Progress, State

INBOX = "/srv/inbox/rig3"
OTHER_INBOX = "/srv/inbox/rig4"
WEIRD_RELPATH = b"bird\xff/re c\n1\xfe.wav"  # invalid UTF-8, space and newline


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.sqlite")
    yield j
    j.close()


_counter = iter(range(1, 1_000_000))


def _add(j: Journal, **values: Any) -> Item:
    n = next(_counter)
    row: dict[str, Any] = {
        "token": f"{n:032x}",
        "inbox": INBOX,
        "relpath": f"rec{n}.wav".encode(),
        "kind": "file",
        "archive": "birdsong",
        "archive_path": "/home/data/birdsong",
        "placement": "copy",
        "verify": True,
        "created": 100.0,
        "updated": 100.0,
    }
    row.update(values)
    return j.add(**row)


def _finish(j: Journal, item: Item, when: float, **values: Any) -> Item:
    return j.save(replace(item, state=State.DONE, finished=when, updated=when, **values))


# -- rows ----------------------------------------------------------------------------


def test_add_returns_a_claiming_item_with_defaults(journal: Journal) -> None:
    """A new item starts CLAIMING with no attempts, no wait and no error."""
    item = _add(journal)
    assert item.id > 0
    assert (item.state, item.attempts, item.not_before, item.error_code) == (
        State.CLAIMING,
        0,
        0.0,
        None,
    )
    assert item.verify is True


def test_add_then_get_round_trips(journal: Journal) -> None:
    """get() returns exactly the item add() returned."""
    item = _add(journal, relpath=WEIRD_RELPATH, verify=False)
    assert journal.get(item.id) == item


def test_get_unknown_id_is_none(journal: Journal) -> None:
    """get() of an id that was never added is None."""
    assert journal.get(12345) is None


def test_save_round_trips_every_field(journal: Journal) -> None:
    """Every field saved, including raw byte paths, reads back identical."""
    item = _add(journal, relpath=WEIRD_RELPATH)
    full = replace(
        item,
        state=State.REJECTED,
        attempts=3,
        not_before=123.5,
        error_code="invalid-name",
        error_message="bad name\nsecond line",
        sidecar_relpath=WEIRD_RELPATH + b".nbank.yaml",
        marker_relpath=WEIRD_RELPATH + b".done",
        identity='{"dev": 1, "ino": 2}',
        name="rec1",
        dtype="vocalization-wav",
        metadata_json='{"bird": "b1"}',
        target_name="rec1.wav",
        sha1="a" * 40,
        size=2**40,
        url="https://host/neurobank/resources/rec1/",
        rejected_relpath=b"bird\xff/re c\n1\xfe~1.wav",
        reason_json='{"code": "invalid-name"}',
        updated=200.0,
        finished=201.0,
        verify=False,
    )
    journal.save(full)
    got = journal.get(item.id)
    assert got == full
    assert got is not None and got.relpath == WEIRD_RELPATH
    assert isinstance(got.relpath, bytes)


def test_relpath_str_decodes_with_surrogates(journal: Journal) -> None:
    """relpath_str is the file system's decoding of the raw bytes (reversible)."""
    item = _add(journal, relpath=WEIRD_RELPATH)
    assert os.fsencode(item.relpath_str) == WEIRD_RELPATH


def test_progress_round_trips_through_item(journal: Journal) -> None:
    """with_progress() then progress gives back the same Progress."""
    p = Progress(State.CHECKED, attempts=2, not_before=55.0, error_code="x", error_message="y")
    assert _add(journal).with_progress(p).progress == p


def test_to_json_is_json_safe(journal: Journal) -> None:
    """to_json decodes byte paths and parses embedded JSON fields."""
    item = journal.save(
        replace(_add(journal, relpath=b"a\xff.wav"), metadata_json='{"b": 1}', identity=None)
    )
    out = item.to_json()
    assert out["relpath"] == "a\\xff.wav"
    assert out["metadata"] == {"b": 1}
    assert out["state"] == "claiming"


def test_token_bytes_decodes_hex(journal: Journal) -> None:
    """token_bytes is the 16 random bytes the hex token stands for."""
    item = _add(journal, token="00" * 15 + "ff")
    assert item.token_bytes == b"\x00" * 15 + b"\xff"


def test_duplicate_token_is_refused(journal: Journal) -> None:
    """Two items can never share a token."""
    _add(journal, token="ab" * 16)
    with pytest.raises(sqlite3.IntegrityError):
        _add(journal, token="ab" * 16)


# -- queries -------------------------------------------------------------------------


def test_unfinished_excludes_final_states(journal: Journal) -> None:
    """unfinished() lists exactly the in-flight items, in insertion order."""
    by_state = {s: journal.save(replace(_add(journal), state=s)) for s in State}
    got = journal.unfinished()
    assert {i.state for i in got} == set(IN_FLIGHT)
    assert [i.id for i in got] == sorted(by_state[s].id for s in IN_FLIGHT)


@pytest.mark.parametrize("state", sorted(FINAL))
def test_active_for_ignores_final_items(journal: Journal, state: State) -> None:
    """A finished item for a path is not active."""
    journal.save(replace(_add(journal, relpath=WEIRD_RELPATH), state=state))
    assert journal.active_for(INBOX, WEIRD_RELPATH) is None


@pytest.mark.parametrize("state", sorted(IN_FLIGHT))
def test_active_for_finds_in_flight_item(journal: Journal, state: State) -> None:
    """An in-flight item is found by its inbox and exact raw path."""
    journal.save(replace(_add(journal, relpath=b"old.wav"), state=State.DONE))
    item = journal.save(replace(_add(journal, relpath=WEIRD_RELPATH), state=state))
    assert journal.active_for(INBOX, WEIRD_RELPATH) == item


@pytest.mark.parametrize(
    ("inbox", "relpath"),
    [(OTHER_INBOX, WEIRD_RELPATH), (INBOX, b"bird\xff/re c\n1\xfe.WAV"), (INBOX, b"bird")],
)
def test_active_for_matches_inbox_and_path_exactly(
    journal: Journal, inbox: str, relpath: bytes
) -> None:
    """Another inbox or a different path (even by case) does not match."""
    _add(journal, relpath=WEIRD_RELPATH)
    assert journal.active_for(inbox, relpath) is None


def test_latest_for_returns_newest_of_any_state(journal: Journal) -> None:
    """latest_for() is the most recent item for a path, finished or not."""
    _add(journal, relpath=b"r.wav")
    newest = journal.save(replace(_add(journal, relpath=b"r.wav"), state=State.REJECTED))
    assert journal.latest_for(INBOX, b"r.wav") == newest


def test_find_rejected_by_rejected_path(journal: Journal) -> None:
    """find_rejected() finds a REJECTED item by where it now lies in rejected/."""
    item = journal.save(
        replace(_add(journal), state=State.REJECTED, rejected_relpath=b"sub/rec~1.wav")
    )
    assert journal.find_rejected(INBOX, b"sub/rec~1.wav") == item
    assert journal.find_rejected(OTHER_INBOX, b"sub/rec~1.wav") is None


def test_history_is_newest_first(journal: Journal) -> None:
    """history() lists finished deposits by finish time, newest first."""
    a = _finish(journal, _add(journal), 10.0)
    b = _finish(journal, _add(journal), 30.0)
    c = _finish(journal, _add(journal), 20.0)
    assert [i.id for i in journal.history()] == [b.id, c.id, a.id]


def test_history_ties_break_by_newest_id(journal: Journal) -> None:
    """Deposits finished at the same instant list the later one first."""
    a = _finish(journal, _add(journal), 10.0)
    b = _finish(journal, _add(journal), 10.0)
    assert [i.id for i in journal.history()] == [b.id, a.id]


def test_history_defaults_to_done_only(journal: Journal) -> None:
    """In-flight and rejected items are not deposits and are left out by default."""
    done = _finish(journal, _add(journal), 10.0)
    _add(journal)
    journal.save(replace(_add(journal), state=State.REJECTED, finished=11.0))
    assert [i.id for i in journal.history()] == [done.id]


def test_history_states_filter(journal: Journal) -> None:
    """Asking for REJECTED lists rejected items only."""
    _finish(journal, _add(journal), 10.0)
    rej = journal.save(replace(_add(journal), state=State.REJECTED, finished=11.0))
    assert [i.id for i in journal.history(states=(State.REJECTED,))] == [rej.id]


def test_history_inbox_filter(journal: Journal) -> None:
    """history(inbox=...) keeps only that inbox's deposits."""
    _finish(journal, _add(journal), 10.0)
    other = _finish(journal, _add(journal, inbox=OTHER_INBOX), 11.0)
    assert [i.id for i in journal.history(inbox=OTHER_INBOX)] == [other.id]


def test_history_since_filter(journal: Journal) -> None:
    """history(since=t) keeps deposits finished at or after t."""
    _finish(journal, _add(journal), 10.0)
    at = _finish(journal, _add(journal), 20.0)
    after = _finish(journal, _add(journal), 30.0)
    assert [i.id for i in journal.history(since=20.0)] == [after.id, at.id]


def test_history_name_filter(journal: Journal) -> None:
    """history(name=...) finds the deposit of one identifier."""
    _finish(journal, _add(journal), 10.0, name="rec1")
    two = _finish(journal, _add(journal), 11.0, name="rec2")
    assert [i.id for i in journal.history(name="rec2")] == [two.id]


def test_history_limit(journal: Journal) -> None:
    """history(limit=n) returns the n newest."""
    items = [_finish(journal, _add(journal), float(t)) for t in range(5)]
    assert [i.id for i in journal.history(limit=2)] == [items[4].id, items[3].id]


def test_counts_by_inbox_and_state(journal: Journal) -> None:
    """counts() tallies every item by (inbox, state)."""
    _add(journal)
    _add(journal)
    _finish(journal, _add(journal), 1.0)
    _add(journal, inbox=OTHER_INBOX)
    assert journal.counts() == {
        (INBOX, "claiming"): 2,
        (INBOX, "done"): 1,
        (OTHER_INBOX, "claiming"): 1,
    }


def test_in_flight_names(journal: Journal) -> None:
    """in_flight_names() gives identifiers of named, unfinished items only."""
    journal.save(replace(_add(journal), name="busy", state=State.REGISTERED))
    _finish(journal, _add(journal), 1.0, name="finished")
    _add(journal)
    assert journal.in_flight_names() == {"busy"}


def test_iter_all_in_id_order(journal: Journal) -> None:
    """iter_all() yields every item once, oldest first."""
    ids = [_add(journal).id for _ in range(3)]
    assert [i.id for i in journal.iter_all()] == ids


# -- the file ------------------------------------------------------------------------


def test_schema_version_after_open(journal: Journal) -> None:
    """A fresh journal is at SCHEMA_VERSION, in the object and in the file."""
    assert journal.schema_version == SCHEMA_VERSION
    with sqlite3.connect(journal.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopen_keeps_rows(tmp_path: Path) -> None:
    """Reopening an existing journal keeps its rows and its version."""
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    item = j.save(replace(_add(j, relpath=WEIRD_RELPATH), state=State.STAGED))
    j.close()
    j2 = Journal(path)
    try:
        assert j2.get(item.id) == item
        assert j2.schema_version == SCHEMA_VERSION
        assert [i.id for i in j2.unfinished()] == [item.id]
    finally:
        j2.close()


def test_newer_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A journal written by a newer nbankd is refused, with its path in the message."""
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match=str(path)):
        Journal(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_journal_mode_is_wal(journal: Journal) -> None:
    """The journal file is in WAL mode (seen by any connection)."""
    db = sqlite3.connect(journal.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_synchronous_is_full(journal: Journal) -> None:
    """The journal's connection commits with synchronous=FULL (2)."""
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_creates_missing_parent_folder(tmp_path: Path) -> None:
    """Opening a journal under a missing state folder creates the folder."""
    j = Journal(tmp_path / "a" / "b" / "journal.sqlite")
    j.close()
    assert (tmp_path / "a" / "b" / "journal.sqlite").is_file()


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022])
def test_file_mode_is_0600_on_creation(tmp_path: Path, umask: int) -> None:
    """A new journal (and its -wal and -shm) is owner read-write, nothing for the group or
    others, whatever the umask: a reader of the -shm could lock every commit out."""
    old = os.umask(umask)
    try:
        j = Journal(tmp_path / "journal.sqlite")
        _add(j)
    finally:
        os.umask(old)
    try:
        for p in tmp_path.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    finally:
        j.close()


def test_a_group_readable_journal_is_made_private_at_open(tmp_path: Path) -> None:
    """A journal left 0640 by an earlier release (or a restore), with its -wal and -shm,
    is made 0600 at open, all three, and its items are kept."""
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    item = _add(j)
    copies = {}
    for suffix in ("", "-wal", "-shm"):  # as a crash leaves them, group-readable
        copies[suffix] = Path(f"{path}{suffix}").read_bytes()
    j.close()
    for suffix, data in copies.items():
        Path(f"{path}{suffix}").write_bytes(data)
        os.chmod(f"{path}{suffix}", 0o640)
    j = Journal(path)
    try:
        assert j.get(item.id) == item
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600, suffix
    finally:
        j.close()


def test_concurrent_saves_lose_nothing(journal: Journal) -> None:
    """Two threads saving different items at once both see all their writes persisted."""
    per_thread = 150
    groups = [[_add(journal) for _ in range(per_thread)] for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(items: list[Item], state: State) -> None:
        try:
            barrier.wait()
            for n, item in enumerate(items):
                journal.save(replace(item, state=state, attempts=n))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [
        threading.Thread(target=work, args=(groups[0], State.STAGED)),
        threading.Thread(target=work, args=(groups[1], State.CHECKED)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for items, state in zip(groups, (State.STAGED, State.CHECKED), strict=True):
        for n, item in enumerate(items):
            got = journal.get(item.id)
            assert got is not None and (got.state, got.attempts) == (state, n)


def test_concurrent_adds_lose_nothing(journal: Journal) -> None:
    """Two threads adding items at once get distinct ids and every row is stored."""
    barrier = threading.Barrier(2)
    ids: list[list[int]] = [[], []]

    def work(k: int) -> None:
        barrier.wait()
        for _ in range(100):
            ids[k].append(_add(journal).id)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = ids[0] + ids[1]
    assert len(set(all_ids)) == 200
    assert {i.id for i in journal.iter_all()} == set(all_ids)


def test_a_version_1_journal_is_migrated_with_its_items(tmp_path: Path) -> None:
    """A journal of an earlier schema (version 1) opens at the current version with
    its in-flight items intact; the scan and staged identities are empty for them."""
    from nbankd.deposit.journal import MIGRATIONS

    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version=1")
        db.execute(
            "INSERT INTO items (token, inbox, relpath, kind, state, archive, archive_path, "
            "placement, verify, created, updated) VALUES ('ab', '/in', x'612e776176', 'file', "
            "'staged', 'arch', '/arch', 'copy', 1, 1.0, 1.0)"
        )
    journal = Journal(path)
    [item] = journal.unfinished()
    assert journal.schema_version == SCHEMA_VERSION == 7
    assert (item.token, item.relpath, item.state, item.seen_identity) == (
        "ab",
        b"a.wav",
        State.STAGED,
        None,
    )
    assert item.staged_identity is None
    assert (item.auto_id, item.already, item.zipped, item.file_metadata) == (
        False,
        False,
        False,
        None,
    )
    assert item.restages == 0


def test_the_count_of_bad_read_backs_is_saved_and_read_back(tmp_path: Path) -> None:
    """An item's bad read-backs in a row (``restages``) survive a save and a reopen."""
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    item = j.save(replace(_add(j), state=State.CLAIMED, restages=3))
    j.close()
    j2 = Journal(path)
    try:
        assert j2.get(item.id).restages == 3
        assert j2.get(item.id).progress.restages == 3
    finally:
        j2.close()


# --- group commit ------------------------------------------------------------------


def test_saves_waiting_behind_a_commit_share_the_next_one(journal: Journal) -> None:
    """Saves that arrive while a commit runs are made durable together by one commit."""
    items = [_add(journal) for _ in range(5)]
    other = sqlite3.connect(journal.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the first save's commit waits for this lock
    done: list[Item] = []

    def save(item: Item) -> None:
        done.append(journal.save(replace(item, state=State.CLAIMED)))

    first = threading.Thread(target=save, args=(items[0],))
    first.start()
    wait_for(lambda: journal.stats()["saves"] == 1, 30, "a leader")
    rest = [threading.Thread(target=save, args=(item,)) for item in items[1:]]
    for t in rest:
        t.start()
    wait_for(lambda: journal.stats()["queued"] == 4, 30, "four saves queued behind the commit")
    other.execute("COMMIT")
    other.close()
    for t in [first, *rest]:
        t.join()
    assert journal.stats() == {"saves": 5, "commits": 2, "synced": 2, "queued": 0}
    assert {i.id for i in done} == {i.id for i in items}
    assert all(journal.get(i.id).state is State.CLAIMED for i in items)  # type: ignore[union-attr]


def test_a_save_alone_is_committed_at_once(journal: Journal) -> None:
    """A single save is durable when it returns, in a commit of its own."""
    item = _add(journal)
    journal.save(replace(item, state=State.STAGED))
    assert journal.stats() == {"saves": 1, "commits": 1, "synced": 1, "queued": 0}
    reopened = Journal(journal.path)
    try:
        assert reopened.get(item.id).state is State.STAGED  # type: ignore[union-attr]
    finally:
        reopened.close()


def test_items_found_together_are_journaled_in_one_transaction(journal: Journal) -> None:
    """add_many inserts every row or, when one is refused, none of them."""
    base = {
        "inbox": INBOX,
        "kind": "file",
        "archive": "a",
        "archive_path": "/a",
        "placement": "copy",
        "verify": 1,
        "created": 0.0,
        "updated": 0.0,
    }
    good = [{**base, "token": f"ok{n}", "relpath": f"f{n}".encode()} for n in range(3)]
    assert [i.relpath for i in journal.add_many(good)] == [b"f0", b"f1", b"f2"]
    clash = [{**base, "token": "new", "relpath": b"g"}, {**base, "token": "ok1", "relpath": b"h"}]
    with pytest.raises(sqlite3.IntegrityError):
        journal.add_many(clash)
    assert journal.active_relpaths(INBOX) == {b"f0", b"f1", b"f2"}


def _damage_items_root(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'items'").fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_a_damaged_page_is_refused_at_open_naming_the_journal(tmp_path: Path) -> None:
    """A journal whose items table has a damaged page (its header sound) is refused at
    open with JournalError saying it is damaged, not left to fail at the first read."""
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    for _ in range(3):
        _add(j)
    j.close()
    _damage_items_root(path)
    with pytest.raises(JournalError, match="damaged") as raised:
        Journal(path)
    assert str(path) in str(raised.value)


def test_a_check_of_the_pages_cut_short_opens_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check at open is bounded in time: one cut short opens the journal as before."""
    import nbankd.deposit.journal as journal_mod

    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    item = _add(j)
    j.close()
    monkeypatch.setattr(journal_mod, "CHECK_SECONDS", 0.0)
    j = Journal(path)
    try:
        assert j.get(item.id) == item
    finally:
        j.close()


def test_reads_answer_while_a_write_waits_for_another_process_lock(tmp_path: Path) -> None:
    """Another process holding the journal's write lock (an admin's sqlite3 shell in
    BEGIN IMMEDIATE): a write waits for it (SQLite's busy wait), and reads from other
    threads answer at once meanwhile, then see the write once it is committed."""
    import time

    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    first = _add(j)
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    added: list[Item] = []
    writer = threading.Thread(target=lambda: added.append(_add(j)))
    try:
        writer.start()
        deadline = time.monotonic() + 30
        while not j._lock.locked():  # the writer holds the journal's write lock
            assert writer.is_alive() and time.monotonic() < deadline
            time.sleep(0.005)  # polling for that event, not standing in for it
        assert writer.is_alive()
        started = time.monotonic()
        assert [i.id for i in j.unfinished()] == [first.id]
        assert sum(j.counts().values()) == 1
        assert j.known_tokens([first.token]) == {first.token}
        assert time.monotonic() - started < 2
    finally:
        shell.execute("ROLLBACK")
        shell.close()
        writer.join(timeout=30)
    try:
        assert [i.id for i in j.unfinished()] == [first.id, added[0].id]
    finally:
        j.close()


# -- marked identities -----------------------------------------------------------------


def test_identities_since_gives_only_recent_items_in_the_state_whose_identity_holds_the_text(
    journal: Journal,
) -> None:
    """identities_since: (name, sha1, size, identity) of the items in the state, finished
    since the time, whose identity holds the text (its _ and % taken as themselves)."""

    def returned(when: float, identity: str, name: str) -> None:
        item = _add(journal)
        journal.save(
            replace(
                item,
                state=State.RETURNED,
                finished=when,
                updated=when,
                identity=identity,
                name=name,
                sha1="ab" * 20,
                size=7,
            )
        )

    returned(500.0, '{"ino": 1, "damaged_copy": {"of": "a"}}', "kept")
    returned(100.0, '{"ino": 2, "damaged_copy": {"of": "b"}}', "too-old")
    returned(500.0, '{"ino": 3, "damagedXcopy": {"of": "c"}}', "other-text")
    done = _add(journal)
    _finish(journal, done, 500.0, identity='{"damaged_copy": {}}', name="done")
    got = journal.identities_since(State.RETURNED, 400.0, '"damaged_copy"')
    assert got == [("kept", "ab" * 20, 7, '{"ino": 1, "damaged_copy": {"of": "a"}}')]
