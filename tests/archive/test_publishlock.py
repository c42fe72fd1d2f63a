"""Publishing many files under one hold of their stub folders' locks (publishlock.held)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.archive import durable, publishlock
from nbankd.archive.layout import Archive


def _staged(archive: Archive, src: Path, token: str) -> Path:
    return durable.stage_copy(archive, src, f".nbankd-{token}").path


def _stub(archive: Archive, id: str) -> Path:
    stub = archive.stored_file(id, f"{id}.wav").parent
    stub.mkdir(exist_ok=True)
    return stub


def _locked_elsewhere(stub: Path) -> bool:
    """Another open file description cannot take the stub folder's flock now."""
    fd = os.open(stub, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_held_stub_folder_stays_locked_for_the_whole_batch(
    archive: Archive, src_file: Path
) -> None:
    """Inside held, the stub folder's flock is held between publishes, and released after."""
    stub = _stub(archive, "rec01")
    with publishlock.held([stub]):
        durable.publish(archive, _staged(archive, src_file, "t1"), stub / "rec01.wav")
        assert _locked_elsewhere(stub)
    assert not _locked_elsewhere(stub)


def test_a_name_linked_in_the_batch_counts_for_the_next_publish(
    archive: Archive, src_file: Path, tmp_path: Path
) -> None:
    """Two stored names for one identifier in one batch: the second is refused, as it
    would be outside a batch."""
    stub = _stub(archive, "rec01")
    other = tmp_path / "rec01.dat"
    other.write_bytes(b"other bytes")
    with publishlock.held([stub]):
        durable.publish(archive, _staged(archive, src_file, "t1"), stub / "rec01.wav")
        with pytest.raises(errors.StoredUnderOtherName) as caught:
            durable.publish(archive, _staged(archive, other, "t2"), stub / "rec01.dat")
    assert caught.value.stored == str(stub / "rec01.wav")
    assert sorted(os.listdir(stub)) == ["rec01.wav"]


def test_a_name_removed_during_the_batch_no_longer_counts(
    archive: Archive, src_file: Path, tmp_path: Path
) -> None:
    """A stored name listed when the batch began and removed since (a bad copy discarded)
    does not keep its identifier from being published under another name."""
    stub = _stub(archive, "rec01")
    (stub / "rec01.old").write_bytes(b"a bad copy")
    with publishlock.held([stub]):
        (stub / "rec01.old").unlink()
        published = durable.publish(archive, _staged(archive, src_file, "t1"), stub / "rec01.wav")
    assert published.created and sorted(os.listdir(stub)) == ["rec01.wav"]


def test_a_stub_folder_another_process_holds_is_not_waited_for_in_a_batch(
    archive: Archive, src_file: Path
) -> None:
    """A stub folder made after the batch began and locked by another process: the
    publish fails transient (waiting with other folders held could deadlock) and
    leaves the staged copy for the retry."""
    held_stub = _stub(archive, "aa01")
    stub = archive.stored_file("rec01", "rec01.wav").parent
    staged = _staged(archive, src_file, "t1")
    with publishlock.held([held_stub, stub]):  # rec's stub does not exist yet
        stub.mkdir()
        fd = os.open(stub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pytest.raises(errors.ArchiveUnavailable):
                durable.publish(archive, staged, stub / "rec01.wav")
        finally:
            os.close(fd)
    assert staged.exists() and os.listdir(stub) == []


def test_held_is_not_reentrant(archive: Archive) -> None:
    """A batch inside a batch is a bug: refused, and the outer one still holds its lock."""
    stub = _stub(archive, "rec01")
    with publishlock.held([stub]):
        with pytest.raises(RuntimeError), publishlock.held([stub]):
            pass
        assert _locked_elsewhere(stub)
