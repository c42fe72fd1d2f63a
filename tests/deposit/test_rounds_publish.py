"""Rounds publishing staged files: faults in their shared stub fsync and the names' drop."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from fixtures.faults import fsync_fails_for
from fixtures.steps_env import Env
from nbankd.archive import durable
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.rounds import run_round


def _registered(env: Env, n: int) -> list[Item]:
    """``n`` inputs driven alone up to REGISTERED: their next step is PUBLISH."""
    items = [env.drop(f"rec{i}.bin", os.urandom(3000 + i)) for i in range(n)]
    return [env.until(item, State.REGISTERED) for item in items]


def _staged(env: Env, item: Item) -> Path:
    return env.archive.staging_dir / env.steps.staged_name(item)


def _saved(env: Env, item: Item) -> State:
    got = env.journal.get(item.id)
    assert got is not None
    return got.state


def test_a_bug_in_one_items_after_syncs_action_leaves_the_others_saved(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-OSError in one item's deferred drop fails that item only; the others are saved."""
    items = _registered(env, 3)
    flawed = _staged(env, items[1])
    drop = durable._drop_staged

    def drop_staged(source: Path) -> None:
        if source == flawed:
            raise RuntimeError("a bug")
        drop(source)

    monkeypatch.setattr(durable, "_drop_staged", drop_staged)
    moved = run_round(env.steps, items, now=float("inf"))
    assert isinstance(moved[1].error, RuntimeError)
    assert [_saved(env, i) for i in items] == [
        State.PUBLISHED,
        State.REGISTERED,
        State.PUBLISHED,
    ]


def test_a_publish_whose_stub_fsync_fails_keeps_its_staged_name_until_published_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed stub fsync keeps the staged name and the step undone; the next round drops it."""
    [item] = _registered(env, 1)
    staged = _staged(env, item)
    target = env.steps._target(env.archive, item)
    with monkeypatch.context() as faults:
        target.parent.mkdir(exist_ok=True)
        fsync_fails_for(faults, target.parent)
        [moved] = run_round(env.steps, [item], now=float("inf"))
    assert moved.outcome is not None and moved.outcome.kind == "transient"
    assert "fsync after the publish step" in moved.outcome.message
    assert _saved(env, item) is State.REGISTERED
    assert staged.exists() and target.exists() and target.stat().st_nlink == 2
    [again] = run_round(env.steps, [moved.item], now=float("inf"))
    assert again.item.state is State.PUBLISHED
    assert not staged.exists() and target.stat().st_nlink == 1
    assert env.stored() == [str(target.relative_to(env.archive.resources_dir))]


def test_a_drop_that_fails_fails_the_publish_step_which_is_saved_as_not_done(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop refused in the flush saves the publish as failed, naming the drop; it runs again."""
    [item] = _registered(env, 1)
    staged = _staged(env, item)
    real_unlink = os.unlink

    def unlink(path: str | Path, **kw: object) -> None:
        if Path(path) == staged:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_unlink(path, **kw)  # type: ignore[arg-type]

    with monkeypatch.context() as faults:
        faults.setattr(os, "unlink", unlink)
        [moved] = run_round(env.steps, [item], now=float("inf"))
    assert moved.outcome is not None and moved.outcome.kind == "transient"
    assert moved.outcome.message.startswith("[Errno 13] after the publish step: dropping")
    assert _saved(env, item) is State.REGISTERED
    [again] = run_round(env.steps, [moved.item], now=float("inf"))
    assert _saved(env, item) is State.PUBLISHED and again.step is Step.PUBLISH
    assert not staged.exists()


def test_a_publish_saved_after_its_name_was_dropped_but_not_committed_is_published_again(
    env: Env,
) -> None:
    """Staged name dropped, commit lost: publishing again finds the stored copy; one file."""
    [item] = _registered(env, 1)
    staged = _staged(env, item)
    with pytest.MonkeyPatch.context() as faults:
        faults.setattr(env.journal, "save_many", _journal_gone)
        [lost] = run_round(env.steps, [item], now=float("inf"))
    assert lost.error is not None and not staged.exists()
    assert _saved(env, item) is State.REGISTERED
    done = env.until(item, State.DONE)
    assert done.state is State.DONE
    assert len(env.stored()) == 1


def _journal_gone(*_args: object, **_kw: object) -> None:
    raise sqlite3.OperationalError("disk I/O error")


def test_a_rename_deposit_of_a_file_at_its_stored_mode_fsyncs_its_data_before_linking_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """placement: rename fsyncs the input's own inode before linking it, whatever its mode."""
    item = env.drop("rec9.bin", os.urandom(5000), placement="rename", verify=False)
    path = env.inbox / "rec9.bin"  # its bytes dirty in the page cache
    os.chmod(path, 0o444)  # the stored mode already (read-only resources, umask 002)
    st = os.lstat(path)
    synced: list[str] = []
    real_fsync, real_fdatasync, real_link = os.fsync, os.fdatasync, os.link

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == st.st_ino:
            synced.append("sync")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        if os.fstat(fd).st_ino == st.st_ino:
            synced.append("sync")
        real_fdatasync(fd)

    def link(src: str | Path, dst: str | Path, **kw: object) -> None:
        if Path(dst).parent.parent == env.archive.resources_dir:
            synced.append("link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "link", link)
    done = env.until(item, State.DONE)
    assert done.state is State.DONE and done.placement == "rename"
    assert "link" in synced
    assert "sync" in synced and synced.index("sync") < synced.index("link"), synced
