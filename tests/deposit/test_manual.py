"""nbankd.deposit.manual: what a manual deposit leaves behind in the files' folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.items import held_rejection
from nbankd.deposit import manual
from nbankd.deposit.journal import Journal
from nbankd.names import WORK_DIR_NAME


def test_tidy_removes_this_users_empty_work_and_rejected_folders(tmp_path: Path) -> None:
    """Empty .nbank and nbank-rejected folders of this user are removed."""
    (tmp_path / WORK_DIR_NAME).mkdir()
    (tmp_path / manual.REJECTED_DIR).mkdir()
    manual.tidy(tmp_path)
    assert sorted(os.listdir(tmp_path)) == []


def test_tidy_keeps_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    """A work folder still holding a claimed input stays."""
    (tmp_path / WORK_DIR_NAME).mkdir()
    (tmp_path / WORK_DIR_NAME / "token").write_bytes(b"claimed")
    manual.tidy(tmp_path)
    assert (tmp_path / WORK_DIR_NAME / "token").read_bytes() == b"claimed"


def test_tidy_keeps_another_users_empty_work_folder(tmp_path: Path) -> None:
    """An empty .nbank owned by another user (a daemon's work folder: the folder is
    one of its inboxes) is never removed."""
    work = tmp_path / WORK_DIR_NAME
    work.mkdir()
    os.chown(work, 65534, 65534)
    manual.tidy(tmp_path)
    assert work.is_dir()


def test_a_hand_back_that_another_thread_did_first_says_the_file_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """return_rejected whose rename finds the held file gone (a worker and a status
    request handing it back at once; here the move happens just before) answers its
    place, not an error."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        item, held = held_rejection(journal, tmp_path / "rig", "rec.wav")
    finally:
        journal.close()
    place = tmp_path / "rig" / "rec.wav"
    real = manual.move_noreplace_at

    def beaten(src_dir: int, src: bytes, dst_dir: int, dst: bytes) -> None:
        real(src_dir, src, dst_dir, dst)  # the other thread's hand-back
        real(src_dir, src, dst_dir, dst)  # ours: the source is gone

    monkeypatch.setattr(manual, "move_noreplace_at", beaten)
    assert manual.return_rejected(item) == place
    assert place.read_bytes() == b"refused bytes" and not held.exists()
