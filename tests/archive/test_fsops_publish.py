"""Publishing a file written beside its target (fsops.publish_temp, link_noreplace):
the one way small state files, fetched copies and zipped folders are put in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.archive.fsops import link_noreplace, publish_temp


def _temp(folder: Path, data: bytes = b"new") -> Path:
    tmp = folder / ".target.partial"
    tmp.write_bytes(data)
    return tmp


def test_publish_without_replacing_links_and_drops_the_temporary_name(tmp_path: Path) -> None:
    """Without replace, a free target gets the data and the temporary name goes."""
    tmp = _temp(tmp_path)
    publish_temp(tmp, tmp_path / "target", replace=False)
    assert (tmp_path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_publish_without_replacing_never_overwrites(tmp_path: Path) -> None:
    """Without replace, an existing target is kept and FileExistsError raised; the
    temporary file is left for the caller to remove."""
    (tmp_path / "target").write_bytes(b"old")
    tmp = _temp(tmp_path)
    with pytest.raises(FileExistsError):
        publish_temp(tmp, tmp_path / "target", replace=False)
    assert (tmp_path / "target").read_bytes() == b"old" and tmp.read_bytes() == b"new"


def test_publish_with_replace_renames_over_the_target(tmp_path: Path) -> None:
    """With replace, the target is swapped for the new file in one rename."""
    (tmp_path / "target").write_bytes(b"old")
    tmp = _temp(tmp_path)
    publish_temp(tmp, tmp_path / "target", replace=True)
    assert (tmp_path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["target"]


@pytest.mark.parametrize("replace", [False, True])
def test_publish_in_an_open_folder_uses_names_relative_to_it(tmp_path: Path, replace: bool) -> None:
    """With dir_fd, both names are resolved in that open folder, not the working one."""
    _temp(tmp_path)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        publish_temp(".target.partial", "target", replace=replace, dir_fd=dfd)
        (tmp_path / "other").write_bytes(b"x")
        with pytest.raises(FileExistsError):
            publish_temp("other", "target", replace=False, dir_fd=dfd)
    finally:
        os.close(dfd)
    assert (tmp_path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["other", "target"]


def test_link_noreplace_gives_a_second_name(tmp_path: Path) -> None:
    """link_noreplace leaves the file under both names (one inode), and refuses a
    name that is taken."""
    src = _temp(tmp_path)
    link_noreplace(src, tmp_path / "target")
    assert os.path.samefile(src, tmp_path / "target")
    with pytest.raises(FileExistsError):
        link_noreplace(src, tmp_path / "target")
