"""fsyncs shared by a round: each file once, failures reported to whoever asked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from archive_helpers import record_calls

from fixtures.faults import fsync_fails_for
from nbankd.archive import syncs


def _open_fds(folder: Path) -> int:
    """How many of this process's descriptors are open on ``folder`` (descriptors that
    other threads or the garbage collector close meanwhile are not counted)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == str(folder)
        except FileNotFoundError:  # closed since the listing
            continue
    return count


def _bad_and_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two folders, ``bad`` (every fsync of it fails with EIO) and ``good``."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    fsync_fails_for(monkeypatch, bad)
    return bad, good


def test_one_folder_asked_for_twice_is_held_once(tmp_path: Path) -> None:
    """Two fsync_soon calls on one folder (two descriptors) inside a round hold one file."""
    a = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    b = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with syncs.shared() as later:
            syncs.fsync_soon(a)
            syncs.fsync_soon(b)
            assert len(later) == 1
            assert later.flush() == {}
            assert len(later) == 0
    finally:
        os.close(a)
        os.close(b)


def test_outside_a_round_the_fsync_happens_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without shared(), fsync_soon fsyncs the folder before it returns and keeps nothing."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _open_fds(tmp_path)
        syncs.fsync_soon(fd)
        assert synced == [tmp_path.stat().st_ino]
        assert _open_fds(tmp_path) == before
    finally:
        os.close(fd)


def test_every_descriptor_held_is_closed_flushed_or_not(tmp_path: Path) -> None:
    """The duplicates a round holds are closed by flush, and by leaving the round unflushed."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _open_fds(tmp_path)
        with syncs.shared() as later:
            syncs.fsync_soon(fd)
            assert _open_fds(tmp_path) == before + 1
            later.flush()
            assert _open_fds(tmp_path) == before
        with syncs.shared():
            syncs.fsync_soon(fd)
        assert _open_fds(tmp_path) == before
    finally:
        os.close(fd)


def test_a_failed_fsync_is_reported_to_each_owner_that_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder whose fsync fails names the two steps that asked for it, not the third."""
    folders = dict(zip(("bad", "good"), _bad_and_good(tmp_path, monkeypatch), strict=True))
    fds = {name: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for name, path in folders.items()}
    try:
        with syncs.shared() as later:
            for owner, name in ((1, "bad"), (2, "good"), (3, "bad")):
                later.owner = owner
                syncs.fsync_soon(fds[name])
            failed = later.flush()
    finally:
        for fd in fds.values():
            os.close(fd)
    assert sorted(failed) == [1, 3]
    assert all(err.errno == errno.EIO for err in failed.values())


def test_a_file_that_cannot_be_fsynced_is_ignored_as_by_fsync_fd() -> None:
    """EINVAL (here a pipe; some filesystems answer it for folders) is not a failure."""
    r, w = os.pipe()
    try:
        with syncs.shared() as later:
            syncs.fsync_soon(r)
            assert later.flush() == {}
        syncs.fsync_soon(w)
    finally:
        os.close(r)
        os.close(w)


def test_an_action_inside_a_round_runs_after_the_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """after_syncs inside a round waits for the flush, whose fsyncs run before it."""
    events: list[str] = []
    record_calls(monkeypatch, events)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with syncs.shared() as later:
            syncs.fsync_soon(fd)
            syncs.after_syncs(lambda: events.append("action"))
            assert events == []
            assert later.flush() == {}
    finally:
        os.close(fd)
    assert events == [f"fsync {tmp_path.stat().st_ino}", "action"]


def test_outside_a_round_an_action_runs_at_once() -> None:
    """Without shared(), after_syncs runs the action before it returns."""
    ran: list[str] = []
    syncs.after_syncs(lambda: ran.append("action"))
    assert ran == ["action"]


def test_the_fsyncs_an_action_asks_for_are_flushed_in_the_same_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder an action asks to fsync is synced before flush returns, after the action."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    events: list[str] = []
    record_calls(monkeypatch, events)

    def action() -> None:
        events.append("action")
        syncs.fsync_dir_soon(second)

    with syncs.shared() as later:
        syncs.fsync_dir_soon(first)
        syncs.after_syncs(action)
        assert later.flush() == {}
        assert len(later) == 0
    assert events == [f"fsync {first.stat().st_ino}", "action", f"fsync {second.stat().st_ino}"]


def test_an_action_of_a_step_whose_fsync_failed_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner whose fsync failed keeps its action undone; another owner's runs."""
    bad, good = _bad_and_good(tmp_path, monkeypatch)
    ran: list[int] = []
    with syncs.shared() as later:
        for owner, folder in ((1, bad), (2, good)):
            later.owner = owner
            syncs.fsync_dir_soon(folder)
            syncs.after_syncs(lambda owner=owner: ran.append(owner))
        failed = later.flush()
    assert sorted(failed) == [1]
    assert ran == [2]


def test_a_failed_action_fails_only_its_own_step_and_says_it_was_no_fsync() -> None:
    """An action's OSError is reported for its owner as AfterSyncsFailed, with its text."""

    def refused() -> None:
        raise OSError(errno.EACCES, "dropping 'x' once published: Permission denied")

    with syncs.shared() as later:
        later.owner = 1
        syncs.after_syncs(refused)
        later.owner = 2
        syncs.after_syncs(lambda: None)
        failed = later.flush()
    assert list(failed) == [1]
    assert isinstance(failed[1], syncs.AfterSyncsFailed)
    assert failed[1].errno == errno.EACCES
    assert failed[1].strerror == "dropping 'x' once published: Permission denied"


def test_a_round_left_unflushed_runs_no_action() -> None:
    """Leaving shared() without a flush (the round failed) drops the actions unrun."""
    ran: list[str] = []
    with syncs.shared():
        syncs.after_syncs(lambda: ran.append("action"))
    assert ran == []
