"""Publishing an input in place: its own data is fsynced before its link, whatever its mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from archive_helpers import record_calls

from nbankd.archive import durable
from nbankd.archive.access import target_mode
from nbankd.archive.layout import Archive


def test_an_input_published_in_place_with_its_stored_mode_is_fsynced_before_its_link(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_in_place fsyncs the input before its link even when its mode is already right."""
    src = tmp_path / "work" / "rec02.wav"
    src.parent.mkdir()
    src.write_bytes(os.urandom(100_000))  # dirty in the page cache, never fsynced
    target = archive.new_resource_path("inpl02", src.name)
    os.chmod(src, target_mode(archive, target, is_dir=False))  # e.g. 0444: already right
    ino = src.stat().st_ino
    events: list[str] = []
    record_calls(monkeypatch, events)
    published = durable.publish_in_place(archive, src, target)
    assert stat.S_IMODE(published.path.stat().st_mode) == target_mode(archive, target, is_dir=False)
    assert f"fsync {ino}" in events, "the input's data was never fsynced"
    assert events.index(f"fsync {ino}") < events.index(f"link {target.name}")
