"""The journal writes only the columns a save changed, and never loses a field by it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.daemon import wait_for
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import State


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.sqlite")
    yield j
    j.close()


def _add(j: Journal, n: int = 1) -> Item:
    return j.add(
        token=f"{n:032x}",
        inbox="/srv/inbox/rig3",
        relpath=f"rec{n}.wav".encode(),
        kind="file",
        archive="birdsong",
        archive_path="/home/data/birdsong",
        placement="copy",
        verify=True,
        created=100.0,
        updated=100.0,
    )


def _wal_size(j: Journal) -> int:
    return Path(f"{j.path}-wal").stat().st_size


def test_fields_changed_and_changed_back_read_back_as_saved(journal: Journal) -> None:
    """A field set, then set back to its first value, is stored as last saved."""
    item = _add(journal)
    named = journal.save(replace(item, state=State.CLAIMED, name="rec1", error_code="x"))
    back = journal.save(replace(named, state=State.STAGED, name=None, error_code=None))
    assert journal.get(item.id) == back


def test_a_state_change_writes_less_than_the_whole_row(journal: Journal) -> None:
    """A save that changes the state and time appends fewer WAL bytes than the item's
    first save, which writes every column and every index entry."""
    item = _add(journal)
    start = _wal_size(journal)
    claimed = journal.save(replace(item, state=State.CLAIMED, updated=101.0))
    whole = _wal_size(journal) - start
    journal.save(replace(claimed, state=State.STAGED, updated=102.0))
    changed = _wal_size(journal) - start - whole
    assert 0 < changed < whole


def test_after_a_failed_commit_the_next_save_stores_every_field(
    journal: Journal, tmp_path: Path
) -> None:
    """A commit that fails leaves nothing assumed: the item's next save stores all of it."""
    item = _add(journal)
    saved = journal.save(replace(item, state=State.CLAIMED, name="first"))
    guard = sqlite3.connect(journal.path, isolation_level=None)
    guard.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON items WHEN NEW.error_code = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    guard.close()
    with pytest.raises(sqlite3.Error, match="refused by the test"):
        journal.save(replace(saved, state=State.STAGED, name="second", error_code="boom"))
    assert journal.get(item.id) == saved
    final = replace(saved, state=State.STAGED, name="second", error_code=None)
    journal.save(final)
    assert journal.get(item.id) == final


def test_two_saves_of_one_item_in_one_commit_leave_the_later(journal: Journal) -> None:
    """Saves of one item queued behind the same commit are applied in order."""
    item = journal.save(replace(_add(journal), state=State.CLAIMED, updated=101.0))
    lead = _add(journal, 2)
    other = sqlite3.connect(journal.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the first commit back while the others queue
    first = threading.Thread(target=journal.save, args=(replace(lead, state=State.CLAIMED),))
    first.start()
    wait_for(lambda: journal.stats()["saves"] == 2, 30, "a leader")
    early = replace(item, state=State.CLAIMED, name="early", sha1="a" * 40)
    late = replace(item, state=State.STAGED, sha1="a" * 40, size=7)  # name as before early
    t1 = threading.Thread(target=journal.save, args=(early,))
    t1.start()
    wait_for(lambda: journal.stats()["queued"] == 1, 30, "the first save of the item queued")
    t2 = threading.Thread(target=journal.save, args=(late,))
    t2.start()
    wait_for(lambda: journal.stats()["queued"] == 2, 30, "both saves of the item queued")
    other.execute("COMMIT")
    other.close()
    for t in (first, t1, t2):
        t.join()
    assert journal.stats()["commits"] == 3  # the first save, the leader's, the two queued
    assert journal.get(item.id) == late


def test_save_many_writes_every_item_in_one_commit(journal: Journal) -> None:
    """Three items saved together: each reads back as saved, from one commit."""
    items = [_add(journal, n) for n in (1, 2, 3)]
    before = journal.stats()
    saved = [replace(i, state=State.CLAIMED, updated=200.0 + i.id) for i in items]
    journal.save_many(saved, durable=False)
    after = journal.stats()
    assert [journal.get(i.id) for i in items] == saved
    assert (after["saves"] - before["saves"], after["commits"] - before["commits"]) == (3, 1)


def test_save_many_refused_saves_none_of_them(journal: Journal) -> None:
    """One row the database refuses: the whole batch is rolled back, none saved."""
    items = [_add(journal, n) for n in (1, 2, 3)]
    guard = sqlite3.connect(journal.path, isolation_level=None)
    guard.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON items WHEN NEW.error_code = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    guard.close()
    batch = [replace(i, state=State.CLAIMED) for i in items]
    batch[2] = replace(batch[2], error_code="boom")
    with pytest.raises(sqlite3.Error, match="refused by the test"):
        journal.save_many(batch, durable=True)
    assert [journal.get(i.id) for i in items] == items


def test_a_refused_save_sharing_a_commit_fails_alone(journal: Journal) -> None:
    """Two threads' saves queued behind one commit, one row refused: the other is saved."""
    lead, good, bad = (_add(journal, n) for n in (1, 2, 3))
    guard = sqlite3.connect(journal.path, isolation_level=None)
    guard.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON items WHEN NEW.error_code = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    guard.execute("BEGIN IMMEDIATE")  # holds the leader's commit back while the others queue
    errors: dict[str, BaseException] = {}

    def save(tag: str, item: Item) -> None:
        try:
            journal.save(item)
        except sqlite3.Error as err:
            errors[tag] = err

    threads = [threading.Thread(target=save, args=("lead", replace(lead, state=State.CLAIMED)))]
    threads[0].start()
    wait_for(lambda: journal.stats()["saves"] == 1, 30, "a leader")
    for tag, item in (("good", replace(good, state=State.CLAIMED)),
                      ("bad", replace(bad, state=State.CLAIMED, error_code="boom"))):  # fmt: skip
        threads.append(threading.Thread(target=save, args=(tag, item)))
        threads[-1].start()
    wait_for(lambda: journal.stats()["queued"] == 2, 30, "both saves queued behind the leader")
    guard.execute("COMMIT")
    guard.close()
    for t in threads:
        t.join()
    assert list(errors) == ["bad"]
    assert journal.get(good.id).state is State.CLAIMED  # type: ignore[union-attr]
    assert journal.get(bad.id) == bad


def test_an_error_message_quoting_undecodable_bytes_is_saved(journal: Journal) -> None:
    """A message naming a file whose name is not UTF-8 is stored, escaped, not refused."""
    item = _add(journal)
    message = "bad\udcff.bin vanished before it was claimed"
    journal.save(replace(item, error_code="gone", error_message=message))
    stored = journal.get(item.id)
    assert (
        stored is not None
        and stored.error_message == "bad\\udcff.bin vanished before it was claimed"
    )
