"""Folders deposited in place (``directories: resources``, ``placement: rename``) whose
item the previous release journaled and this version finishes.

The previous release staged such a folder as a copy in ``staging/`` (journaling its
``staged_identity``) and published the input's own tree without flushing it; its
verify step then ``fdatasync``ed every file before reading it back. This version
hashes the folder in place, fsyncs the tree before publishing it, and reads its own
published copy back without a flush (``synced=True``). The previous release's steps
are this version's with the parts it lacked or had more: a copy made by
``stage_copy_tree`` (its stage step), and the tree's fsyncs left out (its publish).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.inplace_env import FolderEnv, across_power_loss, flushed_inodes
from nbankd.archive import durable, opening
from nbankd.deposit.identity import staged_id
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step, advance
from nbankd.names import WORK_DIR_NAME


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _work(env: FolderEnv, item: Item) -> Path:
    return env.inbox / WORK_DIR_NAME / item.token


def stage_as_previous_release(env: FolderEnv, item: Item) -> Item:
    """The item at STAGED as the previous release journaled it: its folder copied into
    staging/ under this process's staged name, that copy's identity journaled."""
    item = env.until(item, State.STAGED)
    assert item.state is State.STAGED, (item.error_code, item.error_message)
    archive = opening.open_archive(env.archive_root)
    staged = durable.stage_copy_tree(
        archive, _work(env, item), env.steps._new_staged_name(archive, item)
    )
    assert (staged.sha1, staged.size) == (item.sha1, item.size)
    return env.journal.save(item.changed(staged_identity=staged_id(staged.path)))


@contextlib.contextmanager
def files_never_flushed(root: Path) -> Iterator[None]:
    """Within it, an fsync or fdatasync of a regular file of the tree ``root`` does
    nothing (every other one goes on): as the previous release, which never flushed a
    folder it published in place."""
    inodes = {os.lstat(os.path.join(d, n)).st_ino for d, _, names in os.walk(root) for n in names}
    saved = os.fsync, os.fdatasync

    def skipping(real):  # type: ignore[no-untyped-def]
        def call(fd: int) -> None:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) and st.st_ino in inodes):
                real(fd)

        return call

    os.fsync, os.fdatasync = skipping(saved[0]), skipping(saved[1])
    try:
        yield
    finally:
        os.fsync, os.fdatasync = saved


def publish_as_previous_release(env: FolderEnv, item: Item) -> Item:
    """Runs the publish step as the previous release did (the tree renamed into
    resources/ without flushing its files) and saves PUBLISHED."""
    item = env.until(item, State.REGISTERED)
    assert item.state is State.REGISTERED, (item.error_code, item.error_message)
    with files_never_flushed(_work(env, item)):
        item, outcome = env.steps.run(item, Step.PUBLISH)
    assert outcome.kind == "ok", outcome
    item = env.journal.save(item.with_progress(advance(item.progress, Step.PUBLISH, outcome, 0.0)))
    assert item.state is State.PUBLISHED
    return item


@pytest.mark.parametrize("verify", [True, False], ids=["verify-on", "verify-off"])
def test_a_folder_the_previous_release_published_is_flushed_before_this_version_records_it(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """Every file of a folder the previous release published in place (journaled at
    PUBLISHED, never flushed) is fsynced or fdatasynced before this version records
    the deposit."""
    item, files = folder_env.drop_folder("rec1", verify=verify)
    item = publish_as_previous_release(folder_env, stage_as_previous_release(folder_env, item))
    seen = flushed_inodes(monkeypatch)  # this version, from the verify step on
    item = folder_env.until(item, State.RECORDED)
    assert item.state is State.RECORDED, (item.error_code, item.error_message)
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    unflushed = [rel for rel in files if _inode(stored / rel) not in seen]
    assert unflushed == [], f"recorded, but never flushed: {unflushed}"


def test_a_folder_the_previous_release_staged_is_deposited_exactly_once(
    folder_env: FolderEnv,
) -> None:
    """An item the previous release journaled at STAGED (its copy in staging/) is
    deposited once by this version: DONE, one receipt, one registry record, the folder
    stored whole and gone from the work folder."""
    item, files = folder_env.drop_folder("rec1")
    item = stage_as_previous_release(folder_env, item)
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    assert {rel: (stored / rel).read_bytes() for rel in files} == files
    receipts = [
        json.loads(line)
        for log in (folder_env.steps.receipts_dir).rglob("*.jsonl")
        for line in log.read_text().splitlines()
    ]
    assert [(r["id"], r["outcome"]) for r in receipts] == [("rec1", "deposited")]
    assert [r.name for r in folder_env.registry.search()] == ["rec1"]
    assert not os.path.lexists(_work(folder_env, item))


def test_a_repeated_stage_step_removes_the_copy_an_interrupted_older_stage_left(
    folder_env: FolderEnv,
) -> None:
    """A folder placed by rename whose stage step the previous release began (its copy
    written to staging/, STAGED never journaled) leaves nothing of that copy in
    staging/ once this version has deposited it (the previous release's own retry
    removed it before copying again)."""
    item, _files = folder_env.drop_folder("rec1")
    item = folder_env.until(item, State.CLAIMED)
    assert item.state is State.CLAIMED, (item.error_code, item.error_message)
    archive = opening.open_archive(folder_env.archive_root)
    durable.stage_copy_tree(
        archive, _work(folder_env, item), folder_env.steps._new_staged_name(archive, item)
    )
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert os.listdir(folder_env.archive_root / "staging") == []


def test_publishing_a_folder_in_place_shows_life_while_it_fsyncs_the_files(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publish step of a folder placed by rename beats the worker's heartbeat
    between fsyncing the folder's first file and its last, as the stage step did while
    it copied and fsynced them one by one (a tree of many files takes minutes)."""
    item, files = folder_env.drop_folder("rec1")
    item = folder_env.until(item, State.REGISTERED)
    assert item.state is State.REGISTERED, (item.error_code, item.error_message)
    work = _work(folder_env, item)
    inodes = {os.stat(work / rel).st_ino for rel in files}
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino in inodes:
            events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder_env.steps.set_beat(lambda: events.append("beat"))
    try:
        item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    finally:
        folder_env.steps.set_beat(None)
    assert outcome.kind == "ok", outcome
    first, last = events.index("fsync"), len(events) - 1 - events[::-1].index("fsync")
    assert events.count("fsync") == len(files)
    assert "beat" in events[first:last], f"no beat while fsyncing the files: {events}"


# -- the consequence on ext4: a power loss after the receipt -------------------------------


def _as_previous_release(env: FolderEnv, item: Item) -> Item:
    """The item staged and published by the previous release (for across_power_loss)."""
    return publish_as_previous_release(env, stage_as_previous_release(env, item))


def test_a_folder_the_previous_release_published_survives_a_power_loss_once_recorded(
    tmp_path: Path,
) -> None:
    """A folder the previous release published in place (verify: true, journaled at
    PUBLISHED) that this version verifies and records keeps every byte its receipt
    names through a power loss (ext4 shutdown dropping the running journal
    transaction) right after the record step."""
    run = across_power_loss(
        tmp_path, verify=True, before="deposit.test_inplace_upgrade:_as_previous_release"
    )
    assert run.deposit["state"] == str(State.RECORDED), run.deposit
    assert run.read_back == run.deposit["sha1"], "recorded, then lost on power loss"
