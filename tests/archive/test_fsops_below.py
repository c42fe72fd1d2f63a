"""open_below and remove_ours_at: acting below a trusted root from descriptors, never
through a link (what a repair of an archive relies on)."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePath

import pytest

from nbankd.archive.fsops import open_below, remove_ours_at


def test_open_below_opens_a_folder_below_the_root(tmp_path: Path) -> None:
    """A chain of real folders opens to the last one."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    fd = open_below(tmp_path, PurePath("a/b"))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a" / "b"))
    finally:
        os.close(fd)


@pytest.mark.parametrize("link_at", ["a", "a/b"])
def test_open_below_never_follows_a_link_on_the_way(tmp_path: Path, link_at: str) -> None:
    """A folder of the chain that is a link raises OSError instead of leading elsewhere."""
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    if link_at == "a":
        (root / "a").rmdir()
        (root / "a").symlink_to(outside)
    else:
        (root / "a" / "b").symlink_to(outside / "b")
    with pytest.raises(OSError) as err:
        os.close(open_below(root, PurePath("a/b")))
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_open_below_refuses_a_path_leaving_the_root(tmp_path: Path) -> None:
    """'..' and absolute paths are not paths below a folder."""
    for rel in ("../x", "/etc"):
        with pytest.raises(ValueError):
            open_below(tmp_path, PurePath(rel))


def test_remove_ours_at_removes_a_read_only_tree(tmp_path: Path) -> None:
    """A tree whose folders were made read-only is removed whole."""
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"x")
    for d in (tree / "sub", tree):
        d.chmod(0o555)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_ours_at(fd, "t")
    finally:
        os.close(fd)
    assert not tree.exists()


def test_remove_ours_at_removes_a_link_not_what_it_points_to(tmp_path: Path) -> None:
    """An entry that is a link, or a link inside a removed tree, is removed as a link:
    the folder it points to keeps its files and modes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    outside.chmod(0o555)
    work = tmp_path / "work"
    (work / "tree").mkdir(parents=True)
    (work / "tree" / "in").symlink_to(outside)
    (work / "link").symlink_to(outside)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_ours_at(fd, "link")
        remove_ours_at(fd, "tree")
        remove_ours_at(fd, "missing")  # nothing there: fine
    finally:
        os.close(fd)
    assert os.listdir(work) == []
    assert (outside / "keep").read_bytes() == b"keep"
    assert (outside.stat().st_mode & 0o777) == 0o555
