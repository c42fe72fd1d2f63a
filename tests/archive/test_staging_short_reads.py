"""A staged copy is never made of part of a file: reads that end before its size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd import hashing
from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.hashing import SourceReadError


def test_a_folder_member_read_short_fails_the_copy_and_leaves_nothing(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One member's reads end halfway (its size unchanged): the tree copy raises a
    source read error naming it, and staging/ is left empty."""
    src = tmp_path / "inbox" / "sess01"
    (src / "sub").mkdir(parents=True)
    (src / "a.dat").write_bytes(os.urandom(4000))
    (src / "sub" / "b.dat").write_bytes(os.urandom(80_000))
    real = hashing.read_into
    done: dict[int, int] = {}

    def ends_early(source: object, view: memoryview) -> int:
        fd = source if isinstance(source, int) else -1
        if fd >= 0 and os.fstat(fd).st_size == 80_000:  # b.dat only
            if done.get(fd, 0) >= 40_000:
                return 0
            n = real(source, view[: 40_000 - done.get(fd, 0)])  # type: ignore[arg-type]
            done[fd] = done.get(fd, 0) + n
            return n
        return real(source, view)  # type: ignore[arg-type]

    monkeypatch.setattr(hashing, "read_into", ends_early)
    with pytest.raises(SourceReadError, match=r"b\.dat' ended after 40000 of its 80000 bytes"):
        durable.stage_copy_tree(archive, src, ".nbankd-short")
    assert list(archive.staging_dir.iterdir()) == []
