"""Files held open for writing, as /proc/PID/fdinfo shows them (the fallback where
leases cannot tell): real processes holding real files."""

from __future__ import annotations

import os
from pathlib import Path

from fixtures.holders import held_open
from nbankd.watch import fdinfo


def _key(path: Path) -> fdinfo.FileKey:
    fd = os.open(path, os.O_RDONLY)
    try:
        key = fdinfo.key_of(fd)
    finally:
        os.close(fd)
    assert key is not None
    return key


def test_a_file_another_process_holds_for_writing_is_seen(tmp_path: Path) -> None:
    """A file another process holds open for appending is among those open for
    writing; once it closes it no longer is."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"x")
    with held_open(rec, "ab"):
        assert _key(rec) in fdinfo.open_for_writing()
    assert _key(rec) not in fdinfo.open_for_writing()


def test_a_file_held_only_for_reading_is_not_seen(tmp_path: Path) -> None:
    """A reader alone (another process, read-only) does not count as a writer."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"x")
    with held_open(rec, "rb"):
        assert _key(rec) not in fdinfo.open_for_writing()


def test_this_process_own_descriptors_are_left_out(tmp_path: Path) -> None:
    """The asking process's own writable descriptors are not reported (it never writes
    an input)."""
    rec = tmp_path / "rec.dat"
    with open(rec, "ab"):
        assert _key(rec) not in fdinfo.open_for_writing()


def test_two_files_with_the_same_inode_number_on_two_mounts_differ(tmp_path: Path) -> None:
    """The key carries the mount: a file under /proc (another mount) never matches one
    in the test's folder."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"x")
    assert _key(rec)[0] != _key(Path("/proc/self/status"))[0]
