"""A walk's open folders: each closed after its last sub-folder, all at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.heldfolders import HeldFolders


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_a_folder_is_closed_once_its_last_sub_folder_is_opened(tmp_path: Path) -> None:
    """A folder with two sub-folders to open stays open after the first, not the second."""
    with HeldFolders() as held:
        top = held.hold(_open_dir(tmp_path))
        held.below(top)
        held.below(top)
        held.listed(top)
        assert _is_open(top.fd)
        held.opened_from(top)
        assert _is_open(top.fd)
        held.opened_from(top)
        assert not _is_open(top.fd)


def test_a_folder_without_sub_folders_is_closed_once_listed(tmp_path: Path) -> None:
    """A listed folder with nothing to open below it is closed at once."""
    with HeldFolders() as held:
        leaf = held.hold(_open_dir(tmp_path))
        held.listed(leaf)
        assert not _is_open(leaf.fd)


def test_every_folder_still_held_is_closed_when_the_walk_fails(tmp_path: Path) -> None:
    """A walk ended by an error closes what it still holds."""
    (tmp_path / "a").mkdir()
    fds = []
    with pytest.raises(RuntimeError), HeldFolders() as held:
        for path in (tmp_path, tmp_path / "a"):
            folder = held.hold(_open_dir(path))
            held.below(folder)
            fds.append(folder.fd)
        raise RuntimeError("stopped half way")
    assert not any(_is_open(fd) for fd in fds)
