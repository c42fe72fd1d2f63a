"""nbankd.deposit.manual_hold: the work folder a manual deposit holds beside its files,
and what its tidy-up removes once the run is over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.deposit import manual, manual_hold
from nbankd.names import WORK_DIR_NAME


def manual_inbox(folder: Path) -> manual.ManualInbox:
    folder.mkdir(exist_ok=True)
    return manual.ManualInbox(
        folder=folder, archive="arch", archive_path=folder.parent / "arch", registry="x"
    )


def test_tidy_removes_this_users_empty_work_and_rejected_folders(tmp_path: Path) -> None:
    """Empty .nbank and nbank-rejected folders of this user are removed."""
    (tmp_path / WORK_DIR_NAME).mkdir()
    (tmp_path / manual.REJECTED_DIR).mkdir()
    manual_hold.tidy(tmp_path)
    assert sorted(os.listdir(tmp_path)) == []


def test_tidy_keeps_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    """A work folder still holding a claimed input stays."""
    (tmp_path / WORK_DIR_NAME).mkdir()
    (tmp_path / WORK_DIR_NAME / "token").write_bytes(b"claimed")
    manual_hold.tidy(tmp_path)
    assert (tmp_path / WORK_DIR_NAME / "token").read_bytes() == b"claimed"


def test_tidy_keeps_another_users_empty_work_folder(tmp_path: Path) -> None:
    """An empty .nbank owned by another user (a daemon's work folder: the folder is
    one of its inboxes) is never removed."""
    work = tmp_path / WORK_DIR_NAME
    work.mkdir()
    os.chown(work, 65534, 65534)
    manual_hold.tidy(tmp_path)
    assert work.is_dir()


def test_tidy_keeps_the_empty_folders_another_run_holds(tmp_path: Path) -> None:
    """The empty work and rejected folders another run prepared (and holds) stay."""
    inbox = manual_inbox(tmp_path / "rig")
    with manual_hold.Holds() as holds:
        holds.prepare(inbox)
        manual_hold.tidy(inbox.folder)
        assert sorted(os.listdir(inbox.folder)) == [WORK_DIR_NAME, manual.REJECTED_DIR]


def test_tidy_removes_the_empty_folders_once_the_last_run_lets_them_go(tmp_path: Path) -> None:
    """Two runs hold one folder; once both let it go, tidy removes its empty folders."""
    inbox = manual_inbox(tmp_path / "rig")
    with manual_hold.Holds() as first, manual_hold.Holds() as second:
        first.prepare(inbox)
        second.prepare(inbox)
        first.release()
        manual_hold.tidy(inbox.folder)
        assert (inbox.folder / WORK_DIR_NAME).is_dir()
    manual_hold.tidy(inbox.folder)
    assert os.listdir(inbox.folder) == []


def test_a_run_prepares_after_a_tidy_holds_the_folders_made_again(tmp_path: Path) -> None:
    """A run that prepares after another run's tidy removed the folders makes them
    again and holds the new ones: its spec names them, and a later tidy keeps them."""
    inbox = manual_inbox(tmp_path / "rig")
    inbox.spec(prepare=True)
    manual_hold.tidy(inbox.folder)
    with manual_hold.Holds() as holds:
        spec = holds.prepare(inbox)
        manual_hold.tidy(inbox.folder)
        st = os.stat(inbox.folder / WORK_DIR_NAME)
        assert spec.work_id == (st.st_dev, st.st_ino)


def test_a_work_folder_replaced_after_it_was_prepared_is_not_held(tmp_path: Path) -> None:
    """Between making the folders and locking them, the work folder was replaced (a
    tidy removed it and another run made a new one): the lock is not taken on the
    stale spec (the run prepares again)."""
    inbox = manual_inbox(tmp_path / "rig")
    stale = inbox.spec(prepare=True)
    os.rename(inbox.folder / WORK_DIR_NAME, tmp_path / "old")  # its inode stays in use
    inbox.spec(prepare=True)
    assert manual_hold._lock(inbox.folder, stale) is None


def test_a_hold_refuses_a_work_folder_swapped_for_a_link(tmp_path: Path) -> None:
    """A work folder that became a link to another folder is never locked through it."""
    inbox = manual_inbox(tmp_path / "rig")
    spec = inbox.spec(prepare=True)
    elsewhere = tmp_path / "elsewhere"
    os.rename(inbox.folder / WORK_DIR_NAME, elsewhere)
    os.symlink(elsewhere, inbox.folder / WORK_DIR_NAME)
    with pytest.raises(OSError):
        manual_hold._lock(inbox.folder, spec)
