"""nbankd.deposit.manual: what a manual deposit leaves behind in the files' folder."""

from __future__ import annotations

import os
from pathlib import Path

from nbankd.deposit import manual
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
