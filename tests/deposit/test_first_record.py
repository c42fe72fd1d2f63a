"""The record step reads the receipts log's tail only when a receipt of the item may
already be there: never for the first record of an item this process journaled, always
for an item recovered from an earlier process or recorded again."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from fixtures.steps_env import Env
from nbankd.deposit import journal as journal_mod
from nbankd.deposit import receipts
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.receipts import read_receipts


def _tail_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the token of every look into a receipts log's tail."""
    seen: list[str] = []
    real = receipts._already_logged

    def spy(path: Path, token: str, *, from_storage: bool = False) -> bool:
        seen.append(token)
        return real(path, token, from_storage=from_storage)

    monkeypatch.setattr(receipts, "_already_logged", spy)
    return seen


def _tokens(env: Env) -> list[str]:
    return [r["token"] for r in read_receipts(env.root / "receipts")]


def test_first_record_of_an_item_journaled_here_does_not_read_the_log(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item this journal inserted is recorded without reading the log, once."""
    item = env.until(env.drop("a.dat", os.urandom(100)), State.VERIFIED)
    seen = _tail_reads(monkeypatch)
    item = env.step(item, Step.RECORD)
    assert item.state is State.RECORDED
    assert seen == []
    assert _tokens(env) == [item.token]


def test_a_record_repeated_in_the_same_process_finds_its_receipt(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record step run again (its save lost) reads the log and writes no second line."""
    verified = env.until(env.drop("a.dat", os.urandom(100)), State.VERIFIED)
    env.step(verified, Step.RECORD)
    seen = _tail_reads(monkeypatch)
    again = env.step(verified, Step.RECORD)  # as if the first save had not happened
    assert again.state is State.RECORDED
    assert seen == [verified.token]
    assert _tokens(env) == [verified.token]


def test_an_item_of_an_earlier_process_reads_the_log(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item recovered from the journal by another Journal (a restart) reads the log
    and its receipt, written before the crash, is not written twice."""
    verified = env.until(env.drop("a.dat", os.urandom(100)), State.VERIFIED)
    env.step(verified, Step.RECORD)  # the receipt is written; say the save was lost
    env.steps.journal = Journal(env.journal.path)  # the next process's journal
    seen = _tail_reads(monkeypatch)
    again = env.step(verified, Step.RECORD)
    assert again.state is State.RECORDED
    assert seen == [verified.token]
    assert _tokens(env) == [verified.token]


def test_first_record_is_true_once_per_inserted_item(tmp_path: Path) -> None:
    """first_record answers True for an inserted item once, then False."""
    journal = Journal(tmp_path / "j.sqlite3")
    [item] = journal.add_many([_row("a")])
    assert journal.first_record(item) is True
    assert journal.first_record(item) is False


def test_first_record_is_false_for_an_item_another_journal_inserted(tmp_path: Path) -> None:
    """An item this journal did not insert (an earlier process's) is never 'first'."""
    [item] = Journal(tmp_path / "j.sqlite3").add_many([_row("a")])
    assert Journal(tmp_path / "j.sqlite3").first_record(item) is False


def test_items_past_the_bound_are_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond UNRECORDED_LIMIT items waiting, new ones are not 'first' (read the log)."""
    monkeypatch.setattr(journal_mod, "UNRECORDED_LIMIT", 2)
    journal = Journal(tmp_path / "j.sqlite3")
    items = journal.add_many([_row(t) for t in "abc"])
    assert [journal.first_record(i) for i in items] == [True, True, False]


def test_a_final_item_is_forgotten(env: Env) -> None:
    """An item saved in a final state (a rejection) leaves the remembered set."""
    item = env.drop("a.dat", b"x")
    env.journal.save(item.changed(state=State.REJECTED))
    assert env.journal.first_record(item) is False


def _row(token: str) -> dict[str, object]:
    return {
        "token": token,
        "inbox": "/in",
        "relpath": b"f",
        "kind": "file",
        "archive": "a",
        "archive_path": "/a",
        "placement": "copy",
        "verify": 1,
        "created": 0.0,
        "updated": 0.0,
    }


def test_a_record_step_short_of_descriptors_is_told_as_the_open_file_limit(env: Env) -> None:
    """A receipt that cannot be written because the process has no descriptor left is
    the open-file limit (what to raise), not a receipts folder to make writable."""
    item = env.until(env.drop("a.dat", os.urandom(100)), State.VERIFIED)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with pytest.raises(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        _, outcome = env.steps.run(item, Step.RECORD)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (outcome.kind, outcome.code) == ("transient", "open-file-limit"), outcome
    assert _tokens(env) == []
