"""The small durable primitives every state file goes through."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from nbankd.archive.fsops import append_durable, write_atomic


def test_append_ends_a_torn_line_first(tmp_path: Path) -> None:
    """A last line left without its newline (a crash mid-write) is ended, so the new
    line stays whole and readable on its own."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": ')
    append_durable(log, b'{"c": 3}\n')
    assert log.read_bytes().split(b"\n") == [b'{"a": 1}', b'{"b": ', b'{"c": 3}', b""]


def test_append_creates_the_log_with_its_mode(tmp_path: Path) -> None:
    """A new log gets the mode asked for and holds exactly the line."""
    log = tmp_path / "new.jsonl"
    append_durable(log, b"one\n", mode=0o640)
    append_durable(log, b"two\n", mode=0o600)
    assert log.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def test_append_refuses_a_link(tmp_path: Path) -> None:
    """A link in the log's place is never followed: the target is untouched."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep\n")
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(OSError) as caught:
        append_durable(tmp_path / "log.jsonl", b"x\n")
    assert caught.value.errno == errno.ELOOP and target.read_bytes() == b"keep\n"


def test_append_wants_whole_lines(tmp_path: Path) -> None:
    """A line without its newline is a caller's bug, refused before anything is written."""
    with pytest.raises(ValueError):
        append_durable(tmp_path / "log", b"no newline")
    assert not (tmp_path / "log").exists()


def test_write_atomic_without_replace_never_overwrites(tmp_path: Path) -> None:
    """replace=False publishes by link: an existing file stays, no temporary is left."""
    path = tmp_path / "nbank.json"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["nbank.json"]
