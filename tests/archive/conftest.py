"""Fixtures for archive tests: a fresh archive and some input files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive


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
