"""A folder published in place (``directories: resources`` with ``placement: rename``)
is the input's own tree, as the rig left it: it is hashed where it is (no copy in
staging/), and publishing fsyncs each of its files and folders before the rename, so a
recorded deposit survives a power loss whatever the verify setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nbank.util import hash_directory as nbank_hash_directory

from fixtures.inplace_env import FolderEnv, across_power_loss, flushed_inodes
from nbankd.deposit.lifecycle import State


@pytest.mark.parametrize("verify", [True, False], ids=["verify-on", "verify-off"])
def test_files_of_a_folder_published_in_place_are_flushed_before_the_record(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """Every file of a folder published in place is fsynced (or fdatasynced) before its
    deposit is recorded, whatever the verify setting: it is the input's own inode,
    written by the rig and never flushed by anyone else."""
    seen = flushed_inodes(monkeypatch)
    item, files = folder_env.drop_folder("rec1", verify=verify)
    item = folder_env.until(item, State.RECORDED)
    assert item.state is State.RECORDED, (item.error_code, item.error_message)
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    unflushed = []
    for rel in files:
        st = os.stat(stored / rel)
        if (st.st_dev, st.st_ino) not in seen:
            unflushed.append(rel)
    assert unflushed == [], f"recorded, but never flushed: {unflushed}"


def test_a_folder_placed_by_rename_is_not_copied_into_staging(folder_env: FolderEnv) -> None:
    """Deposited by rename, a folder leaves nothing in staging/ and is stored whole,
    with neurobank's directory hash recorded."""
    item, files = folder_env.drop_folder("rec1")
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert os.listdir(folder_env.archive_root / "staging") == []
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    assert {rel: (stored / rel).read_bytes() for rel in files} == files
    assert item.sha1 == nbank_hash_directory(stored)
    assert item.size == sum(len(d) for d in files.values())


# -- the consequence on ext4: a power loss after the receipt -------------------------------


@pytest.mark.parametrize("verify", [True, False], ids=["verify-on", "verify-off"])
def test_a_recorded_folder_published_in_place_survives_a_power_loss(
    tmp_path: Path, verify: bool
) -> None:
    """A folder published in place (ext4 on a loop device) whose receipt is written keeps
    every byte its receipt names through a power loss (an ext4 shutdown that drops the
    journal's running transaction) right after the record step."""
    run = across_power_loss(tmp_path, verify=verify)
    assert run.deposit["state"] == str(State.RECORDED), run.deposit
    assert [r["id"] for r in run.receipts] == ["rec1"]  # the deposit is recorded as made
    assert run.read_back == run.deposit["sha1"], "recorded, then lost on power loss"
