"""The /proc fallback (``nbankd.watch.fdinfo.Writers.held``, and nbankctl's check
before it hands files to a daemon) on folders deeper than the interpreter's recursion
limit or with paths longer than PATH_MAX: walked from descriptors, as the daemon's own
walk (``writers.tree_open_for_writing_at``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fixtures.holders import held_open, holding
from nbankctl.deposit_cmds import _not_held
from nbankctl.report import Report
from nbankd.watch import fdinfo

# walks the given folder names one chdir at a time (no path longer than PATH_MAX is
# ever used), opens the last one for appending and holds it until stdin closes
_HOLD_DEEP = (
    "import os, sys\n"
    "*dirs, name = sys.argv[1:]\n"
    "for d in dirs: os.chdir(d)\n"
    "f = open(name, 'ab'); print('open', flush=True); sys.stdin.read()\n"
)


@contextmanager
def _nest(top: Path, names: list[str], leaf: str) -> Iterator[Path]:
    """Makes ``top/names[0]/names[1]/.../leaf`` through descriptors (paths longer than
    PATH_MAX included) and yields the leaf's path; removes them afterwards the same
    way (pytest's own clean-up recurses once per level and would fail)."""
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for name in names:
            os.mkdir(name, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1]))
        yield Path(top, *names, leaf)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leaf, dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir(names[len(fds) - 1], dir_fd=fds[-1])
        os.close(fds.pop())


def test_held_answers_for_a_folder_nested_deeper_than_the_recursion_limit(
    tmp_path: Path,
) -> None:
    """held() on a folder nested 1100 levels deep (paths still under PATH_MAX) answers
    False when nothing there is held, instead of raising RecursionError."""
    session, other = tmp_path / "session", tmp_path / "other.dat"
    session.mkdir()
    other.write_bytes(b"x")
    with _nest(session, ["d"] * 1100, "take.dat"):
        with held_open(other):  # something is seen, so the folder is walked
            seen = fdinfo.open_for_writing()
        assert seen.held(session) is False


def test_the_hand_over_check_does_not_crash_on_a_deeply_nested_folder(tmp_path: Path) -> None:
    """nbankctl's check before the hand-over keeps a deeply nested folder nothing holds
    open (the daemon decides about it) rather than raising."""
    session, other = tmp_path / "session", tmp_path / "other.dat"
    session.mkdir()
    other.write_bytes(b"x")
    args = argparse.Namespace(json=True, json_out=False)
    with _nest(session, ["d"] * 1100, "take.dat"), held_open(other):
        kept = _not_held(args, Report(), [session])
    assert kept == [str(session)]


def test_held_finds_a_held_file_below_path_max(tmp_path: Path) -> None:
    """A file held open for writing whose path is longer than PATH_MAX (20 folders of
    250 characters) is still named by held(), as the daemon's descriptor walk sees it."""
    session = tmp_path / "session"
    session.mkdir()
    names = [f"{i:02d}" + "x" * 248 for i in range(20)]
    with _nest(session, names, "rec.dat") as rec:
        assert len(os.fsencode(rec)) > 4096
        with holding([sys.executable, "-c", _HOLD_DEEP, *names, "rec.dat"], cwd=session):
            seen = fdinfo.open_for_writing()
        assert seen.held(session) is True
