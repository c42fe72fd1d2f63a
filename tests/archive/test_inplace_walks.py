"""Publishing a folder in place walks the input's own tree (its access, then its fsyncs)
after :func:`trees.check_tree` looked at it. A writer of the inbox who kept a
descriptor of the claimed folder (a shell whose working directory is the recording) can
still rename entries inside it: a sub-folder swapped for a symbolic link once the walk
has listed its parent must never lead the walk out of the tree.

Each test makes the writer act at one moment of the walk (the first call of the step
it names, which then goes on for real): a race the writer can win by looping, made
deterministic here."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.layout import Archive


def _make_input(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A claimed folder ``rec1`` (two sub-folders, one file each) in a work folder on the
    archive's filesystem, and a folder outside it holding a file only its owner may
    read (as a daemon's state or credentials would be)."""
    work = tmp_path / "inbox" / ".nbank"
    rec = work / "rec1"
    for sub, data in (("a", b"first"), ("z", b"second")):
        (rec / sub).mkdir(parents=True)
        (rec / sub / "data.bin").write_bytes(data * 1000)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "data.bin"
    secret.write_bytes(b"not part of any deposit")
    os.chmod(secret, 0o600)
    return rec, outside, secret


def _swap_other_subfolder(rec: Path, outside: Path, seen: Path) -> None:
    """The writer's move: the sub-folder of ``rec`` the walk has not reached (not
    ``seen``'s) goes away and a link to ``outside`` takes its name."""
    other = next(p for p in (rec / "a", rec / "z") if p != seen)
    os.rename(other, rec.parent / "moved-away")
    os.symlink(outside, other)


def _swap_once(rec: Path, outside: Path) -> Callable[[int], None]:
    """The writer's move made the first time it is called with the inode of a file of
    ``rec`` (the walk has reached that file's sub-folder, not yet the other)."""
    files = {(rec / sub / "data.bin").stat().st_ino: rec / sub for sub in ("a", "z")}
    done: list[int] = []

    def at(ino: int) -> None:
        if not done and ino in files:
            done.append(ino)
            _swap_other_subfolder(rec, outside, files[ino])

    at.done = done  # type: ignore[attr-defined]
    return at


def _opened_inodes(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, int]]:
    """The (device, inode) of everything ``os.open`` opens from now on (each really
    opened)."""
    opened: set[tuple[int, int]] = set()
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        st = os.fstat(fd)
        opened.add((st.st_dev, st.st_ino))
        return fd

    monkeypatch.setattr(os, "open", spy)
    return opened


def test_fsyncing_a_folder_in_place_never_opens_a_file_outside_it(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_in_place never opens a file outside the folder it publishes, even when a
    sub-folder it has not reached yet is swapped for a link once it fsyncs the first
    file of another."""
    rec, outside, secret = _make_input(tmp_path)
    swap = _swap_once(rec, outside)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        swap(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    opened = _opened_inodes(monkeypatch)
    target = archive.new_resource_path("rec1", rec.name)
    with contextlib.suppress(errors.NbankdError, OSError):  # refusing the tree is fine
        durable.publish_in_place(archive, rec, target, id="rec1")
    assert swap.done, "no file of the folder was fsynced"  # type: ignore[attr-defined]
    st = secret.stat()
    assert (st.st_dev, st.st_ino) not in opened, f"{secret} (outside the folder) was opened"


def test_publishing_a_folder_in_place_never_changes_the_mode_of_a_file_outside_it(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_in_place gives the policy's mode and group to the folder's own files
    only: a file outside it keeps its mode when a sub-folder the walk has not reached
    is swapped for a link to it once the first file of another has its mode."""
    rec, outside, secret = _make_input(tmp_path)
    swap = _swap_once(rec, outside)
    real_chmod, real_fchmod = os.chmod, os.fchmod

    def chmod(path, mode, **kw):  # type: ignore[no-untyped-def]
        real_chmod(path, mode, **kw)
        if not isinstance(path, int):
            swap(os.lstat(path).st_ino)

    def fchmod(fd: int, mode: int) -> None:
        real_fchmod(fd, mode)
        swap(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "fchmod", fchmod)
    target = archive.new_resource_path("rec1", rec.name)
    with contextlib.suppress(errors.NbankdError, OSError):  # refusing the tree is fine
        durable.publish_in_place(archive, rec, target, id="rec1")
    assert swap.done, "no file of the folder was given its mode"  # type: ignore[attr-defined]
    mode = stat.S_IMODE(secret.stat().st_mode)
    assert mode == 0o600, f"{secret} (outside the folder) now has mode {mode:o}"
