"""publish checks its target against the layout's filing rule (layout.stored_file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbankd.archive import durable
from nbankd.archive.layout import Archive


def _staged(archive: Archive, src_file: Path, token: str) -> Path:
    return durable.stage_copy(archive, src_file, f".nbankd-{token}").path


def test_a_one_character_identifier_is_published_where_the_layout_files_it(
    archive: Archive, src_file: Path
) -> None:
    """Identifier "a" goes to the layout's stored_file, resources/a/a.wav."""
    target = archive.stored_file("a", "a.wav")
    assert target == archive.resources_dir / "a" / "a.wav"
    published = durable.publish(archive, _staged(archive, src_file, "t1"), target, id="a")
    assert published.path == target and target.read_bytes() == src_file.read_bytes()


@pytest.mark.parametrize(
    ("stub", "name"),
    [
        ("a.", "a.wav"),  # nbank 0.13's other stub: read, never filed into
        ("ab", "a.wav"),  # another identifier's stub
        ("a", "b.wav"),  # the right stub, another identifier's name
    ],
)
def test_a_target_the_layout_would_not_file_the_identifier_at_is_refused(
    archive: Archive, src_file: Path, stub: str, name: str
) -> None:
    """A target outside the identifier's stub folder, or not named by it, is refused
    before anything moves."""
    staged = _staged(archive, src_file, "t2")
    with pytest.raises(ValueError, match="is not a resource path of a"):
        durable.publish(archive, staged, archive.resources_dir / stub / name, id="a")
    assert staged.exists()
