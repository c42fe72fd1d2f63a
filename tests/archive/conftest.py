"""Fixtures for archive tests: a fresh archive and some input files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.archive.stubnames import StubNames


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    """A new archive (directories allowed) under tmp_path, registered nowhere."""
    return create_archive(
        tmp_path / "arch", "http://127.0.0.1:1/neurobank/", allow_directories=True
    )


@pytest.fixture
def src_file(tmp_path: Path) -> Path:
    """A 3 MiB input file with varied bytes (larger than one copy block is not needed)."""
    path = tmp_path / "inbox" / "rec01.wav"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(3 << 20))
    return path


@pytest.fixture
def names() -> Iterator[StubNames]:
    """A StubNames of the test's own, closed (its watches dropped) after it."""
    kept = StubNames()
    yield kept
    kept.close()


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """A stub folder ``resources/ab`` holding ``abc.wav``, ``abd`` and ``abc1.dat``."""
    folder = tmp_path / "resources" / "ab"
    folder.mkdir(parents=True)
    for name in ("abc.wav", "abd", "abc1.dat"):
        (folder / name).write_bytes(b"")
    return folder
