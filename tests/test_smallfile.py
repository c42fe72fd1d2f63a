"""The one reader of small files a person names (configuration, credentials, tokens)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.smallfile import SmallFileError, open_regular, read_regular


def test_a_regular_file_is_read_whole_with_its_stat(tmp_path: Path) -> None:
    """A regular file's bytes come back with the fstat of the descriptor read."""
    path = tmp_path / "f"
    path.write_bytes(b"user:secret\n")
    raw, st = read_regular(path, 100)
    assert raw == b"user:secret\n" and st.st_ino == path.stat().st_ino


def test_a_link_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    """A path that is a link to a regular file reads the file (a managed /etc link)."""
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_regular(tmp_path / "link", 10)[0] == b"x"


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    """A FIFO nothing writes is refused as a FIFO at once (an open would block)."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SmallFileError) as info:
        read_regular(tmp_path / "fifo", 10)
    assert (info.value.reason, info.value.noun) == ("not-regular", "a FIFO")


@pytest.mark.parametrize(("path", "noun"), [("/dev/zero", "a device file"), ("/", "a folder")])
def test_devices_and_folders_are_refused(path: str, noun: str) -> None:
    """A device (which never ends) or a folder is named for what it is."""
    with pytest.raises(SmallFileError) as info:
        open_regular(Path(path))
    assert (info.value.reason, info.value.noun) == ("not-regular", noun)


def test_a_file_past_the_limit_is_too_large_and_read_no_further(tmp_path: Path) -> None:
    """A file one byte past the limit is refused as too large."""
    (tmp_path / "big").write_bytes(b"a" * 101)
    with pytest.raises(SmallFileError) as info:
        read_regular(tmp_path / "big", 100)
    assert info.value.reason == "too-large"
    assert read_regular(tmp_path / "big", 101)[0] == b"a" * 101


def test_a_missing_file_says_missing(tmp_path: Path) -> None:
    """A path naming nothing is ``missing``, not a generic read error."""
    with pytest.raises(SmallFileError) as info:
        read_regular(tmp_path / "absent", 10)
    assert info.value.reason == "missing"


def test_a_link_is_refused_when_links_are_not_followed(tmp_path: Path) -> None:
    """``follow=False``: a link to a regular file is refused as a link, never read."""
    (tmp_path / "secret").write_bytes(b"not to be read")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(SmallFileError) as info:
        read_regular(tmp_path / "link", 100, follow=False)
    assert (info.value.reason, info.value.noun) == ("not-regular", "a symbolic link")
    assert read_regular(tmp_path / "link", 100)[0] == b"not to be read"
