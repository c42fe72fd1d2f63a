"""In-process checks of :func:`nbankd.transfer.fetching.fetch` when DEST, not the
location, fails: the error is DEST's and no other location is tried (the end-to-end
case, a full tmpfs, is in tests/ctl/test_fetch_export_hostile.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.hashing import DestinationWriteError
from nbankd.registry.base import LocationRecord
from nbankd.transfer import fetching, placing
from nbankd.transfer.placing import NewFile
from nbankd.transfer.sources import Source


def _source() -> Source:
    locs = tuple(
        LocationRecord(f"web{i}", "http", f"127.0.0.1:{i + 1}/nb", "rid") for i in range(2)
    )
    return Source("rid", None, locs)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_an_error_writing_dest_stops_at_the_first_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    tried: list[str] = []

    def download(url: str, new: NewFile, auth_for: object) -> str:
        tried.append(url)
        new.write(b"some")
        raise DestinationWriteError(code, f"{os.strerror(code)} while writing the destination")

    monkeypatch.setattr(fetching, "_download", download)
    with pytest.raises(errors.ArchiveError) as info:
        fetching.fetch(_source(), tmp_path / "rid")
    assert len(tried) == 1
    assert str(tmp_path) in str(info.value) and os.strerror(code) in str(info.value)
    assert not isinstance(info.value, errors.RegistryUnavailable | fetching.NotFetchable)
    assert os.listdir(tmp_path) == []


def test_an_error_publishing_in_dest_stops_at_the_first_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[str] = []

    def download(url: str, new: NewFile, auth_for: object) -> str:
        tried.append(url)
        return "0" * 40

    def publish_temp(tmp: Path, target: Path, *, replace: bool) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(fetching, "_download", download)
    monkeypatch.setattr(placing, "publish_temp", publish_temp)
    with pytest.raises(errors.ArchiveError, match="quota"):
        fetching.fetch(_source(), tmp_path / "rid")
    assert len(tried) == 1
    assert os.listdir(tmp_path) == []


def test_a_location_failing_still_tries_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: a location's own failure (here a download cut short) moves on to the next."""
    tried: list[str] = []

    def download(url: str, new: NewFile, auth_for: object) -> str:
        tried.append(url)
        if len(tried) == 1:
            raise errors.RegistryUnavailable(f"cannot download {url}")
        new.write(b"data")
        return "0" * 40

    monkeypatch.setattr(fetching, "_download", download)
    done = fetching.fetch(_source(), tmp_path / "rid")
    assert len(tried) == 2 and not done.verified
    assert (tmp_path / "rid").read_bytes() == b"data"
