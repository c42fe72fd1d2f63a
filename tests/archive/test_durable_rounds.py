"""Publishing staged files in a round: the stub folder fsynced once, staged names after it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from archive_helpers import record_calls

from nbankd.archive import durable, syncs
from nbankd.archive.layout import Archive


def _staged(archive: Archive, tmp_path: Path, name: str) -> Path:
    src = tmp_path / f"{name}.dat"
    src.write_bytes(name.encode() * 100)
    return durable.stage_copy(archive, src, f".nbankd-{name}").path


def test_a_staged_file_has_its_stored_mode_before_it_is_published(
    archive: Archive, tmp_path: Path
) -> None:
    """stage_copy gives the copy the mode a stored file has (0444 for read-only resources)."""
    staged = _staged(archive, tmp_path, "aa1")
    assert stat.S_IMODE(staged.stat().st_mode) == 0o444


def test_publishes_in_a_round_share_one_stub_fsync_and_drop_staged_names_after_it(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two staged files published in one round: no fsync until the flush, the stub folder
    fsynced once there, and only then their staged names removed."""
    staged = [_staged(archive, tmp_path, n) for n in ("aa1", "aa2")]
    stub = archive.resources_dir / "aa"
    events: list[str] = []
    with syncs.shared() as later:
        durable.publish(archive, staged[0], archive.resource_path("aa1", ".dat"), id="aa1")
        durable.publish(archive, staged[1], archive.resource_path("aa2", ".dat"), id="aa2")
        assert all(p.exists() for p in staged)  # still there until the flush
        record_calls(monkeypatch, events)
        assert later.flush() == {}
    ino = stub.stat().st_ino
    assert events.count(f"fsync {ino}") == 1
    first_unlink = min(i for i, e in enumerate(events) if e.startswith("unlink"))
    assert events.index(f"fsync {ino}") < first_unlink
    assert not any(p.exists() for p in staged)
    assert sorted(os.listdir(stub)) == ["aa1.dat", "aa2.dat"]


def test_a_staged_file_publishes_without_an_fsync_of_its_own(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its mode given at staging, the staged inode is not fsynced again by publishing."""
    staged = _staged(archive, tmp_path, "aa1")
    ino = staged.stat().st_ino
    events: list[str] = []
    record_calls(monkeypatch, events)
    durable.publish(archive, staged, archive.resource_path("aa1", ".dat"), id="aa1")
    assert f"fsync {ino}" not in events
    assert "link aa1.dat" in events


def test_a_staged_file_without_its_mode_is_fsynced_before_its_link(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy staged without the stored mode (an older nbankd's) gets it, durably, first."""
    staged = _staged(archive, tmp_path, "aa1")
    os.chmod(staged, 0o600)
    ino = staged.stat().st_ino
    events: list[str] = []
    record_calls(monkeypatch, events)
    published = durable.publish(archive, staged, archive.resource_path("aa1", ".dat"), id="aa1")
    assert events.index(f"fsync {ino}") < events.index("link aa1.dat")
    assert stat.S_IMODE(published.path.stat().st_mode) == 0o444


def test_a_round_that_never_flushed_leaves_a_second_link_published_again_as_ours(
    archive: Archive, tmp_path: Path
) -> None:
    """Linked in a round that ended unflushed, the staged name stays; publishing again
    finds its own link (created False, ours) and drops the staged name."""
    staged = _staged(archive, tmp_path, "aa1")
    target = archive.resource_path("aa1", ".dat")
    with syncs.shared():
        durable.publish(archive, staged, target, id="aa1")
    assert staged.exists() and target.exists()
    again = durable.publish(archive, staged, target, id="aa1")
    assert (again.created, again.ours) == (False, True)
    assert not staged.exists()
    assert target.read_bytes() == b"aa1" * 100
