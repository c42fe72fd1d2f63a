"""Which tar members ``tape import`` refuses, with and without tarfile's data filter.

Debian 12's Python (3.11.2) has no ``tarfile.data_filter``: the import must refuse
the same crafted members there, by its own checks alone.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from nbankd import tape, tape_import


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


CRAFTED = [
    ("/etc/passwd", tarfile.REGTYPE, {}, "absolute"),
    ("a/../../b", tarfile.REGTYPE, {}, ".."),
    ("link", tarfile.SYMTYPE, {"linkname": "/etc"}, "symbolic link"),
    ("hard", tarfile.LNKTYPE, {"linkname": "other"}, "hard link"),
    ("dev", tarfile.CHRTYPE, {}, "device"),
    ("fifo", tarfile.FIFOTYPE, {}, "FIFO"),
    ("new\nline", tarfile.REGTYPE, {}, "control character"),
    ("", tarfile.REGTYPE, {}, "empty"),
]


@pytest.mark.parametrize("with_filter", [True, False], ids=["data_filter", "no_data_filter"])
@pytest.mark.parametrize(("name", "kind", "attrs", "why"), CRAFTED, ids=[c[3] for c in CRAFTED])
def test_crafted_members_are_refused_with_or_without_the_data_filter(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_filter: bool,
    name: str,
    kind: bytes,
    attrs: dict[str, object],
    why: str,
) -> None:
    """A crafted member is refused, naming why, whether or not Python has data_filter."""
    if not with_filter:
        monkeypatch.setattr(tape, "_DATA_FILTER", None)  # the rule lives there
    problem = tape_import.member_problem(_member(name, kind, **attrs), tmp_path, None)
    assert problem is not None and why in problem


@pytest.mark.parametrize("with_filter", [True, False], ids=["data_filter", "no_data_filter"])
def test_a_plain_member_is_accepted_with_or_without_the_data_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_filter: bool
) -> None:
    """A regular file under a plain relative name passes, with or without data_filter."""
    if not with_filter:
        monkeypatch.setattr(tape, "_DATA_FILTER", None)  # the rule lives there
    assert tape_import.member_problem(_member("ab12cd.wav", size=10), tmp_path, None) is None


def test_a_member_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    """--max-size refuses a bigger member, naming both sizes."""
    problem = tape_import.member_problem(_member("big", size=2048), tmp_path, 1024)
    assert problem is not None and "2048" in problem and "1024" in problem
