"""How ``nbankctl deposit`` chooses to move a file in place (``manual.placement_for``):
proved by placing a file of the folder's work folder into the archive's ``staging/``,
never inferred from a device number (a bind mount shares it: see
tests/ctl/test_deposit_bind_mount.py for that end to end)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env
from nbankd.deposit import manual
from nbankd.names import WORK_DIR_NAME

__all__ = ["env"]


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env) as made:
        yield made


def test_guard_a_folder_on_the_archives_mount_is_moved_in_place_and_the_probe_removed(
    env: Env, files: ManualFiles
) -> None:
    """A closed file on the archive's own mount is journaled ``rename``; no probe is left."""
    inbox, _spec, folder = files
    (folder / "rec.dat").write_bytes(b"recorded")
    items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert refused == [] and [i.placement for i in items] == ["rename"]
    assert os.listdir(folder / WORK_DIR_NAME) == []
    assert os.listdir(env.archive.staging_dir) == []


def test_an_archive_that_cannot_be_opened_means_copy(env: Env, files: ManualFiles) -> None:
    """Where the probe cannot be tried (no archive at the path), the file is copied."""
    _inbox, _spec, folder = files
    assert manual.placement_for(folder, env.root / "no-archive") == "copy"
    assert os.listdir(folder / WORK_DIR_NAME) == []
