"""The release step removes a deposited input only if it is still the input that was
claimed: one a writer changed after its copy was made goes back to the inbox whole."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from fixtures.inplace_env import FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import State, Step


def _work(env_inbox: Path, token: str) -> Path:
    return env_inbox / ".nbank" / token


def test_a_file_written_after_its_record_goes_back_to_the_inbox_whole(env: Env) -> None:
    """Bytes appended to a claimed file after its copy was recorded are never removed:
    release puts the whole file back in the inbox; the archive keeps the claimed bytes."""
    first, more = os.urandom(40_000), os.urandom(5_000)
    item = env.until(env.drop("late.dat", first), State.RECORDED)
    with open(_work(env.inbox, item.token), "ab") as writer:  # a writer kept it open
        writer.write(more)
    item = env.step(item, Step.RELEASE)
    assert item.state is State.RETURNING
    assert "changed after" in (item.error_message or "")
    item = env.step(item, Step.PUT_BACK)
    assert item.state is State.RETURNED
    assert (env.inbox / "late.dat").read_bytes() == first + more
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == first


def test_a_file_touched_after_its_record_is_kept(env: Env) -> None:
    """A claimed file whose mtime alone changed after its record (same size) is not
    removed either: size, mtime and ctime are all the claim's identity."""
    data = os.urandom(30_000)
    item = env.until(env.drop("touched.dat", data), State.RECORDED)
    work = _work(env.inbox, item.token)
    with open(work, "r+b") as writer:  # rewritten in place: same size
        writer.write(bytes(b ^ 0xFF for b in data[:10]))
    item = env.step(item, Step.RELEASE)
    assert item.state is State.RETURNING
    assert work.exists()


def test_an_unchanged_file_is_removed_at_release(env: Env) -> None:
    """The claimed file as claimed is removed once recorded (the deposit's end)."""
    item = env.until(env.drop("plain.dat", os.urandom(20_000)), State.RECORDED)
    work = _work(env.inbox, item.token)
    assert work.exists()
    item = env.step(item, Step.RELEASE)
    assert item.state is State.DONE
    assert not work.exists()


def test_an_item_of_an_older_journal_without_identity_is_released(env: Env) -> None:
    """An item journaled without a claim identity (nothing to compare) is released as
    before, never held for ever."""
    item = env.until(env.drop("old.dat", os.urandom(10_000)), State.RECORDED)
    item = env.journal.save(replace(item, identity=None))
    item = env.step(item, Step.RELEASE)
    assert item.state is State.DONE


def test_a_folder_changed_after_its_record_goes_back_to_the_inbox(tmp_path: Path) -> None:
    """A folder copied into the archive (``placement: copy``) that gained a file after
    its record is put back whole, never removed."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    try:
        item, files = env.drop_folder("session1")
        item = env.until(item, State.RECORDED)
        late = _work(env.inbox, item.token) / "sub" / "late.dat"
        late.write_bytes(b"written after the record")
        item = env.until(item, State.RETURNING)
        assert (item.error_code, item.progress.registered) == ("changed", True)
        item = env.until(item, State.RETURNED)
        assert item.state is State.RETURNED
        back = env.inbox / "session1"
        for rel, data in files.items():
            assert (back / rel).read_bytes() == data
        assert (back / "sub" / "late.dat").read_bytes() == b"written after the record"
        [receipt_file] = (tmp_path / "state" / "receipts").iterdir()
        [receipt] = [json.loads(line) for line in receipt_file.read_text().splitlines()]
        assert receipt["outcome"] == "deposited"  # the copy as claimed is in the archive
    finally:
        env.journal.close()
        env.registry.close()
