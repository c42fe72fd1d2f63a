"""Files held open for writing, as /proc shows them (the fallback where leases cannot
tell, and nbankctl's check before it hands files to a daemon): real processes
holding real files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fixtures.holders import held_open, holding
from nbankd.watch import fdinfo


def test_a_file_another_process_holds_for_writing_is_seen(tmp_path: Path) -> None:
    """A file another process holds open for appending is among those open for
    writing; once it closes it no longer is."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"x")
    with held_open(rec, "ab"):
        assert fdinfo.open_for_writing().held(rec) is True
    assert fdinfo.open_for_writing().held(rec) is False


def test_a_file_held_only_for_reading_is_not_seen(tmp_path: Path) -> None:
    """A reader alone (another process, read-only) does not count as a writer."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"x")
    with held_open(rec, "rb"):
        assert fdinfo.open_for_writing().held(rec) is False


def test_this_process_own_descriptors_are_left_out(tmp_path: Path) -> None:
    """The asking process's own writable descriptors are not reported (it never writes
    an input)."""
    rec = tmp_path / "rec.dat"
    with open(rec, "ab"):
        assert fdinfo.open_for_writing().held(rec) is False


def test_a_file_in_a_folder_is_found_held(tmp_path: Path) -> None:
    """held() walks a folder (links not followed) and finds a file in it open for
    writing; a folder without one (its link to a held file not followed) gives False."""
    session = tmp_path / "session"
    (session / "a").mkdir(parents=True)
    (session / "a" / "take1.dat").write_bytes(b"1")
    (session / "take2.dat").write_bytes(b"2")
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"o")
    os.symlink(outside, session / "link.dat")
    with held_open(outside, "ab"):
        assert fdinfo.open_for_writing().held(session) is False
    with held_open(session / "a" / "take1.dat", "ab"):
        seen = fdinfo.open_for_writing()
    assert seen.held(session) is True


def test_a_file_mapped_shared_and_writable_counts_as_held(tmp_path: Path) -> None:
    """A process mapping the file shared and writable, its descriptor closed, holds it
    for writing (as the kernel counts it)."""
    rec = tmp_path / "rec.dat"
    rec.write_bytes(b"\0" * 4096)
    code = (
        "import mmap, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n"
        "os.close(fd)\n"
        "print('open', flush=True); sys.stdin.read()\n"
    )
    with holding([sys.executable, "-c", code, str(rec)]):
        assert fdinfo.open_for_writing().held(rec) is True
