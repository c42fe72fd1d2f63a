"""The policy's group id: looked up once per :data:`GROUP_TTL`, not at every entry."""

from __future__ import annotations

import grp
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.archive import access
from nbankd.archive.opening import create_archive, open_archive

URL = "http://localhost:8000/neurobank/"


@pytest.fixture
def passing_group() -> Iterator[str]:
    """A system group made for this test (removed at the end if still there)."""
    name = f"nbt{secrets.token_hex(4)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def test_a_group_found_is_used_until_its_ttl_ends(tmp_path: Path, passing_group: str) -> None:
    """A group removed after it was looked up keeps its id until GROUP_TTL has passed
    (the group database is not read at every entry); after it, the removal is seen."""
    archive = create_archive(tmp_path / "a", URL, group=passing_group)
    gid = access.group_id(archive)
    subprocess.run(["groupdel", passing_group], check=True, capture_output=True)
    assert access.group_id(open_archive(archive.path)) == gid
    ttl = access.GROUP_TTL
    try:
        access.GROUP_TTL = 0.0
        with pytest.raises(errors.ArchiveUnavailable, match=passing_group):
            access.group_id(archive)
    finally:
        access.GROUP_TTL = ttl


def test_a_group_not_found_is_asked_for_again(tmp_path: Path, passing_group: str) -> None:
    """A group missing at one lookup is found at the next once it exists (a missing
    group is never remembered)."""
    archive = create_archive(tmp_path / "a", URL, group=passing_group)
    subprocess.run(["groupdel", passing_group], check=True, capture_output=True)
    ttl = access.GROUP_TTL
    try:
        access.GROUP_TTL = 0.0  # nothing found earlier counts: only a miss could be kept
        with pytest.raises(errors.ArchiveUnavailable):
            access.group_id(archive)
        access.GROUP_TTL = ttl
        subprocess.run(["groupadd", "--system", passing_group], check=True, capture_output=True)
        assert access.group_id(archive) == grp.getgrnam(passing_group).gr_gid
    finally:
        access.GROUP_TTL = ttl
