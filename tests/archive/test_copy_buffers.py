"""Files are copied and hashed through a buffer their size (a block at most): every
size copies exactly, and a small file costs no block-sized buffer."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.archive.staging import OVERLAP_FROM
from nbankd.hashing import BLOCK_SIZE, SMALL_BUFFER, sha1_file


@pytest.mark.parametrize(
    "size",
    [0, 1, 4096, SMALL_BUFFER - 1, SMALL_BUFFER, SMALL_BUFFER + 1, BLOCK_SIZE, BLOCK_SIZE + 1],
)
def test_a_file_of_any_size_below_the_overlap_is_staged_whole(
    archive: Archive, tmp_path: Path, size: int
) -> None:
    """A file of each size around the buffer's bounds is staged byte for byte, its
    SHA-1 and size those of its bytes."""
    assert size < OVERLAP_FROM
    data = os.urandom(size)
    src = tmp_path / "in.dat"
    src.write_bytes(data)
    staged = durable.stage_copy(archive, src, ".nbankd-size")
    assert staged.path.read_bytes() == data
    assert (staged.sha1, staged.size) == (hashlib.sha1(data).hexdigest(), size)


def test_staging_a_small_file_allocates_no_block(archive: Archive, tmp_path: Path) -> None:
    """Staging a 4 KiB file allocates at most a quarter of a copy block at its peak."""
    src = tmp_path / "in.dat"
    src.write_bytes(os.urandom(4096))
    durable.stage_copy(archive, src, ".nbankd-warm")  # imports and first-use caches
    tracemalloc.start()
    try:
        durable.stage_copy(archive, src, ".nbankd-small")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BLOCK_SIZE // 4, peak


def test_hashing_a_small_file_allocates_no_block(tmp_path: Path) -> None:
    """Hashing a 4 KiB file allocates at most a quarter of a copy block at its peak,
    and gives its SHA-1."""
    src = tmp_path / "in.dat"
    data = os.urandom(4096)
    src.write_bytes(data)
    tracemalloc.start()
    try:
        sha1 = sha1_file(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sha1 == hashlib.sha1(data).hexdigest()
    assert peak < BLOCK_SIZE // 4, peak
