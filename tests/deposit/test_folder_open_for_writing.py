"""A folder input one of whose files a program still holds open for writing is not
finished: however it would be stored (copied, in place, zipped), it goes back to the
inbox whole, and nothing of it is staged."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_zip_directories import drop_folder, staging_leftovers, use_zip

from fixtures.inplace_env import FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import State, Step

FILES = {"a.dat": b"a" * 5000, "sub/b.dat": b"b" * 7000}


@pytest.mark.parametrize("placement", ["copy", "rename"])
def test_a_folder_with_a_file_open_for_writing_goes_back(tmp_path: Path, placement: str) -> None:
    """Copied or deposited in place, the folder waits for its open file: put back with
    code open-for-writing, every file as it was, nothing left in staging/."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state", placement=placement)
    try:
        item, files = env.drop_folder("session3", files=FILES)
        item = env.until(item, State.CLAIMED)
        work = env.inbox / ".nbank" / item.token
        with open(work / "sub" / "b.dat", "ab"):  # the program still recording into it
            item = env.until(item, State.RETURNING)
        assert item.error_code == "open-for-writing"
        assert "still open for writing" in (item.error_message or "")
        staging = env.archive_root / "staging"
        assert list(staging.iterdir()) == []
        item = env.until(item, State.RETURNED)
        for rel, data in files.items():
            assert (env.inbox / "session3" / rel).read_bytes() == data
    finally:
        env.journal.close()
        env.registry.close()


def test_a_zipped_folder_with_a_file_open_for_writing_goes_back(env: Env) -> None:
    """``directories: zip``: no zip is made of a folder one of whose files is still open
    for writing; it goes back whole."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec9", FILES), State.CLAIMED)
    work = env.inbox / ".nbank" / item.token
    with open(work / "a.dat", "r+b"):
        item = env.step(item, Step.STAGE)
    assert (item.state, item.error_code) == (State.RETURNING, "open-for-writing")
    assert staging_leftovers(env.archive.staging_dir) == []
    item = env.step(item, Step.PUT_BACK)
    assert (env.inbox / "rec9" / "a.dat").read_bytes() == FILES["a.dat"]
