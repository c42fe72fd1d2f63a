"""fsyncs shared by a round: each file once, failures reported to whoever asked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fixtures.faults import fsync_fails_for
from nbankd.archive import syncs


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
        before = _open_fds()
        syncs.fsync_soon(fd)
        assert synced == [tmp_path.stat().st_ino]
        assert _open_fds() == before
    finally:
        os.close(fd)


def test_every_descriptor_held_is_closed_flushed_or_not(tmp_path: Path) -> None:
    """The duplicates a round holds are closed by flush, and by leaving the round unflushed."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _open_fds()
        with syncs.shared() as later:
            syncs.fsync_soon(fd)
            assert _open_fds() == before + 1
            later.flush()
            assert _open_fds() == before
        with syncs.shared():
            syncs.fsync_soon(fd)
        assert _open_fds() == before
    finally:
        os.close(fd)


def test_a_failed_fsync_is_reported_to_each_owner_that_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder whose fsync fails names the two steps that asked for it, not the third."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    fsync_fails_for(monkeypatch, bad)
    fds = {name: os.open(tmp_path / name, os.O_RDONLY | os.O_DIRECTORY) for name in ("bad", "good")}
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
