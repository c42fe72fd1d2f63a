"""The staged name of a deposit: built and read back in one place (archive/layout)."""

from __future__ import annotations

import os

import pytest

from nbankd.archive.layout import STAGED_PREFIX, StagedName, parse_staged_name, staged_name
from nbankd.archive.staging import process_staged_name

TOKEN = "0123456789abcdef0123456789abcdef"


def test_staged_name_with_instance() -> None:
    """A process names its staged copy .nbankd-TOKEN-INSTANCE."""
    assert staged_name(TOKEN, "0a1b2c3d") == f".nbankd-{TOKEN}-0a1b2c3d"


def test_staged_name_of_older_releases() -> None:
    """Without an instance the name is .nbankd-TOKEN, as older releases named it."""
    assert staged_name(TOKEN) == f".nbankd-{TOKEN}" and STAGED_PREFIX == ".nbankd-"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        (f".nbankd-{TOKEN}-0a1b2c3d", StagedName(TOKEN, "0a1b2c3d")),
        (f".nbankd-{TOKEN}", StagedName(TOKEN, None)),
        (".nbankd-tar-rec", StagedName("tar", "rec")),  # a tape import's: no journal token
        (".nbankd-copy-rec-12-ab", StagedName("copy", "rec-12-ab")),  # a transfer's
        (f"{TOKEN}", None),  # no prefix: not nbankd's
        ("rec.wav", None),  # nbank's own staged names
    ],
)
def test_parse_staged_name(name: str, parsed: StagedName | None) -> None:
    """A staged name reads back as its token and instance; other names as None."""
    assert parse_staged_name(name) == parsed


@pytest.mark.parametrize("instance", [None, "0a1b2c3d"])
def test_staged_name_round_trip(instance: str | None) -> None:
    """Parsing a built staged name gives back its token and instance."""
    assert parse_staged_name(staged_name(TOKEN, instance)) == (TOKEN, instance)


def test_a_process_staged_name_fits_a_file_name_for_any_identifier() -> None:
    """A tape import's or copy's staged name stays a file name for a 255-byte identifier,
    and two long identifiers get two names."""
    long_a, long_b = "a" * 255, "a" * 254 + "b"
    names = [process_staged_name(STAGED_PREFIX + "copy-", i) for i in (long_a, long_b)]
    assert all(len(os.fsencode(n)) <= 255 for n in names)
    assert names[0].rsplit("-", 2)[0] != names[1].rsplit("-", 2)[0]
    assert "rec-" in process_staged_name(STAGED_PREFIX + "tar-", "rec")
