"""The one file-type classification (nbankd.filekind), on real files of each kind."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd.filekind import FileKind


def _file(p: Path) -> None:
    p.write_bytes(b"x")


def _hardlink(p: Path) -> None:
    p.write_bytes(b"x")
    os.link(p, p.with_name("other-name"))


def _folder(p: Path) -> None:
    p.mkdir()


def _symlink(p: Path) -> None:
    p.with_name("target").write_bytes(b"x")
    p.symlink_to("target")


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


MAKERS: list[tuple[Callable[[Path], None], FileKind, bool]] = [
    (_file, FileKind.FILE, False),
    (_hardlink, FileKind.HARDLINK, True),
    (_folder, FileKind.DIRECTORY, False),
    (_symlink, FileKind.SYMLINK, True),
    (_fifo, FileKind.FIFO, True),
    (_socket, FileKind.SOCKET, True),
]


@pytest.mark.parametrize(("make", "kind", "unsafe"), MAKERS, ids=lambda v: getattr(v, "name", ""))
def test_kind_of_each_file_type(
    tmp_path: Path, make: Callable[[Path], None], kind: FileKind, unsafe: bool
) -> None:
    """Each file type is classified from its lstat, and only files and folders are safe."""
    path = tmp_path / "entry"
    make(path)
    got = FileKind.of(os.lstat(path))
    assert (got, got.unsafe) == (kind, unsafe)


def test_device_file() -> None:
    """A character device (/dev/null) is a device file, never safe to read."""
    got = FileKind.of(os.lstat("/dev/null"))
    assert (got, got.unsafe, got.noun) == (FileKind.DEVICE, True, "device file")


def test_symlink_to_a_file_is_never_followed(tmp_path: Path) -> None:
    """A link to a regular file is classified as the link, not as what it points to."""
    _symlink(tmp_path / "link")
    assert FileKind.of(os.lstat(tmp_path / "link")) is FileKind.SYMLINK


MODES: list[tuple[int, int, FileKind]] = [
    (stat.S_IFREG | 0o644, 1, FileKind.FILE),
    (stat.S_IFREG | 0o644, 2, FileKind.HARDLINK),
    (stat.S_IFDIR | 0o755, 3, FileKind.DIRECTORY),
    (stat.S_IFLNK | 0o777, 1, FileKind.SYMLINK),
    (stat.S_IFIFO | 0o600, 1, FileKind.FIFO),
    (stat.S_IFSOCK | 0o600, 1, FileKind.SOCKET),
    (stat.S_IFCHR | 0o600, 1, FileKind.DEVICE),
    (stat.S_IFBLK | 0o600, 1, FileKind.DEVICE),
    (0o644, 1, FileKind.OTHER),
]


@pytest.mark.parametrize(("mode", "nlink", "kind"), MODES)
def test_of_mode_classifies_a_mode_and_link_count(mode: int, nlink: int, kind: FileKind) -> None:
    """of_mode gives each st_mode (and link count, for regular files) its kind."""
    assert FileKind.of_mode(mode, nlink) is kind


def test_of_agrees_with_of_mode(tmp_path: Path) -> None:
    """of(lstat) is of_mode of the same stat's mode and link count."""
    _hardlink(tmp_path / "f")
    st = os.lstat(tmp_path / "f")
    assert FileKind.of(st) is FileKind.of_mode(st.st_mode, st.st_nlink) is FileKind.HARDLINK
