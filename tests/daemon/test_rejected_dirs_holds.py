"""rejected_dirs.holds_rejection: a bounded walk, from descriptors, for a NAME.reason."""

from __future__ import annotations

import os
from pathlib import Path

from nbankd.daemon import rejected_dirs


def test_a_reason_file_anywhere_in_the_folder_is_a_rejection(tmp_path: Path) -> None:
    (tmp_path / "old" / "a" / "b").mkdir(parents=True)
    (tmp_path / "old" / "data.dat").write_bytes(b"x")
    assert not rejected_dirs.holds_rejection(tmp_path, "old")
    (tmp_path / "old" / "a" / "b" / "x.dat.reason").write_text("{}")
    assert rejected_dirs.holds_rejection(tmp_path, "old")


def test_a_nested_rejected_folder_left_to_itself_and_links_not_followed(tmp_path: Path) -> None:
    (tmp_path / "old" / "new").mkdir(parents=True)
    (tmp_path / "old" / "new" / "x.reason").write_text("{}")
    assert not rejected_dirs.holds_rejection(tmp_path, "old", skip=["old/new"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.reason").write_text("{}")
    os.symlink(tmp_path / "elsewhere", tmp_path / "old" / "link")
    assert not rejected_dirs.holds_rejection(tmp_path, "old", skip=["old/new"])
    os.symlink(tmp_path / "elsewhere", tmp_path / "linked")
    assert not rejected_dirs.holds_rejection(tmp_path, "linked")
    assert not rejected_dirs.holds_rejection(tmp_path, "missing")


def test_past_the_bound_it_counts_as_holding_one(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "old").mkdir()
    for i in range(5):
        (tmp_path / "old" / f"f{i}").write_bytes(b"")
    monkeypatch.setattr(rejected_dirs, "WALK_ENTRIES", 3)
    assert rejected_dirs.holds_rejection(tmp_path, "old")


def test_nested_names_only_inboxes_strictly_inside() -> None:
    assert rejected_dirs.nested(Path("/in"), "/in/rigA") == "rigA"
    assert rejected_dirs.nested(Path("/in"), "/in") is None
    assert rejected_dirs.nested(Path("/in"), "/other/rigA") is None
    assert rejected_dirs.nested(Path("/in"), "/in2/rigA") is None
