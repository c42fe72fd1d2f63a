"""SHA-1 of files, neurobank's directory hash, and hash-while-copy."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
from archive_helpers import make_tree
from nbank.util import hash_directory as nbank_hash_directory

from nbankd.hashing import (
    DestinationWriteError,
    SourceReadError,
    copy_hashing,
    directory_hash,
    sha1_file,
)


def test_sha1_file_matches_hashlib(src_file: Path) -> None:
    """sha1_file is the SHA-1 of the file's bytes."""
    assert sha1_file(src_file) == hashlib.sha1(src_file.read_bytes()).hexdigest()


def test_sha1_of_empty_file(tmp_path: Path) -> None:
    """An empty file hashes to SHA-1 of nothing."""
    (tmp_path / "e").write_bytes(b"")
    assert sha1_file(tmp_path / "e") == hashlib.sha1(b"").hexdigest()


def test_directory_hash_matches_neurobank_for_nested_tree(tmp_path: Path) -> None:
    """directory_hash equals nbank.util.hash_directory, including its sort order."""
    root = make_tree(tmp_path / "tree")
    assert directory_hash(root) == nbank_hash_directory(root)


def test_directory_hash_of_empty_tree_matches_neurobank(tmp_path: Path) -> None:
    """A tree of empty folders hashes like neurobank's (folders contribute nothing)."""
    (tmp_path / "t" / "a" / "b").mkdir(parents=True)
    assert directory_hash(tmp_path / "t") == nbank_hash_directory(tmp_path / "t")


def test_directory_hash_treats_links_like_neurobank(tmp_path: Path) -> None:
    """Links to files count as the file and links to folders are not entered, as in nbank."""
    root = make_tree(tmp_path / "tree")
    outside = make_tree(tmp_path / "outside")
    (root / "file-link").symlink_to(outside / "a.b")
    (root / "dir-link").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nope")
    assert directory_hash(root) == nbank_hash_directory(root)


def test_copy_hashing_reads_a_pipe_once_and_matches_sha1_file(
    src_file: Path, tmp_path: Path
) -> None:
    """Copying from a pipe (readable only once) yields sha1_file's hash and identical bytes."""
    rfd, wfd = os.pipe()

    def feed() -> None:
        with open(wfd, "wb") as w, open(src_file, "rb") as r:
            w.write(r.read())

    writer = threading.Thread(target=feed)
    writer.start()
    dest = tmp_path / "copy"
    with open(rfd, "rb", buffering=0) as src, open(dest, "wb") as dst:
        result = copy_hashing(src, dst)
    writer.join()
    assert result.sha1 == sha1_file(src_file)
    assert result.size == src_file.stat().st_size
    assert dest.read_bytes() == src_file.read_bytes()


def test_copy_hashing_reports_progress_and_throttle(src_file: Path) -> None:
    """progress sees running totals ending at the size; throttle sees every block."""
    totals: list[int] = []
    blocks: list[int] = []
    with open(src_file, "rb") as src:
        result = copy_hashing(
            src, io.BytesIO(), block_size=1 << 20, progress=totals.append, throttle=blocks.append
        )
    assert totals == sorted(totals) and totals[-1] == result.size
    assert sum(blocks) == result.size and len(blocks) == 3


def test_copy_hashing_between_descriptors(src_file: Path, tmp_path: Path) -> None:
    """Raw file descriptors work on both sides."""
    sfd = os.open(src_file, os.O_RDONLY)
    dfd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        result = copy_hashing(sfd, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert (tmp_path / "out").read_bytes() == src_file.read_bytes()
    assert result.sha1 == sha1_file(src_file)


def test_closed_source_raises_source_read_error(src_file: Path) -> None:
    """A source that cannot be read raises SourceReadError, not a destination error."""
    src = open(src_file, "rb")  # noqa: SIM115
    src.close()
    with pytest.raises(SourceReadError):
        copy_hashing(src, io.BytesIO())


def test_unwritable_destination_raises_destination_write_error(
    src_file: Path, tmp_path: Path
) -> None:
    """A destination opened read-only raises DestinationWriteError with its errno."""
    (tmp_path / "ro").write_bytes(b"")
    dfd = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        with open(src_file, "rb") as src, pytest.raises(DestinationWriteError) as info:
            copy_hashing(src, dfd)
    finally:
        os.close(dfd)
    assert info.value.errno is not None
