"""With ``placement: rename`` the input itself becomes the stored copy: publishing
checks that it still has the content that was hashed and registered, so ``resources/``
never holds bytes other than the record's, with or without ``verify``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.inplace_env import FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import State, Step


def _work(inbox: Path, token: str) -> Path:
    return inbox / ".nbank" / token


@pytest.mark.parametrize("verify", [False, True])
def test_a_file_written_after_its_registration_is_not_published(env: Env, verify: bool) -> None:
    """Bytes appended between registration and publishing keep the input out of
    ``resources/``; it waits in the work folder, whole, with the reason."""
    first, more = os.urandom(30_000), os.urandom(3_000)
    item = env.until(
        env.drop("inplace.dat", first, placement="rename", verify=verify), State.REGISTERED
    )
    work = _work(env.inbox, item.token)
    with open(work, "ab") as writer:
        writer.write(more)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    assert "changed after it was registered as inplace" in (item.error_message or "")
    assert env.stored() == []
    assert work.read_bytes() == first + more


def test_a_mode_change_alone_does_not_hold_publishing(env: Env) -> None:
    """A publish tried again after an earlier attempt set the stored mode (ctime moved,
    content the same) goes through: only device, inode, size and mtime are compared."""
    data = os.urandom(20_000)
    item = env.until(env.drop("moded.dat", data, placement="rename"), State.REGISTERED)
    os.chmod(_work(env.inbox, item.token), 0o640)
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data


def test_a_folder_that_gained_a_file_after_its_registration_is_not_published(
    tmp_path: Path,
) -> None:
    """A folder deposited in place that gained a file after registration stays in the
    work folder, whole, and nothing is stored for it."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state")
    try:
        item, files = env.drop_folder("session2", verify=False)
        item = env.until(item, State.REGISTERED)
        work = _work(env.inbox, item.token)
        (work / "sub" / "late.dat").write_bytes(b"written after registration")
        item, outcome = env.steps.run(item, Step.PUBLISH)
        assert (outcome.kind, outcome.code) == ("changed", "changed")
        assert not any((env.archive_root / "resources").rglob("*.dat"))
        for rel, data in files.items():
            assert (work / rel).read_bytes() == data
    finally:
        env.journal.close()
        env.registry.close()
