"""Files held open for writing, as /proc shows them (the fallback where leases cannot
tell, and nbankctl's check before it hands files to a daemon): real processes
holding real files."""

from __future__ import annotations

import os
from pathlib import Path

from fixtures.holders import held_open
from nbankd.watch import fdinfo


def _key(path: Path) -> fdinfo.FileKey:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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


def test_a_file_in_a_folder_is_found_held(tmp_path: Path) -> None:
    """held() walks a folder (links not followed) and names the file found open for
    writing; a folder without one gives None."""
    session = tmp_path / "session"
    (session / "a").mkdir(parents=True)
    (session / "a" / "take1.dat").write_bytes(b"1")
    (session / "take2.dat").write_bytes(b"2")
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"o")
    os.symlink(outside, session / "link.dat")
    with held_open(outside, "ab"):
        assert fdinfo.held([session], fdinfo.open_for_writing()) is None
    with held_open(session / "a" / "take1.dat", "ab"):
        seen = fdinfo.open_for_writing()
    assert fdinfo.held([session], seen) == session / "a" / "take1.dat"
