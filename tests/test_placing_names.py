"""The temporary name an output is written under (:func:`nbankd.transfer.placing.temp_name`)
fits the filesystem's 255 bytes whenever the target's own name does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.names import is_utf8
from nbankd.transfer.placing import NAME_MAX, NewFile, name_head, temp_name

NAMES = {
    "ascii": "a" * 250 + ".tar",
    "two-byte": "é" * 120 + ".zip",  # 244 bytes
    "three-byte": "€" * 84,  # 252 bytes
    "four-byte": "🎵" * 63,  # 252 bytes
    "not-utf8": os.fsdecode(b"\xff\xfe" * 125 + b".tar"),  # 254 bytes, none UTF-8
    "mixed": os.fsdecode(b"\xe2\x82" + ("é" * 110).encode() + b"\xff" * 20),  # 242 bytes
}


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_the_temporary_name_fits_and_starts_with_the_target_name_whole(name: str) -> None:
    """Cut by bytes, between characters: the temporary's name fits in 255 bytes and is
    a prefix of the target's bytes (a UTF-8 sequence never split, other bytes kept)."""
    assert len(os.fsencode(name)) <= NAME_MAX
    tmp = temp_name(Path("/x") / name)
    raw = os.fsencode(tmp.name)
    assert len(raw) <= NAME_MAX
    assert raw.startswith(b".") and raw.endswith(b".partial")
    head = raw[1 : -len(".12345678.partial")]
    assert os.fsencode(name).startswith(head)
    if is_utf8(name):
        head.decode("utf-8")  # a UTF-8 name keeps a UTF-8 head: no sequence split
    else:  # the bytes that are not UTF-8 are kept as they are, up to the cut
        assert len(head) >= NAME_MAX - 1 - len(".12345678.partial") - 3


def test_a_short_name_is_kept_whole() -> None:
    assert name_head("rec.wav", 237) == "rec.wav"
    assert temp_name(Path("/x/rec.wav")).name.startswith(".rec.wav.")


def test_the_cut_is_before_a_character_that_would_not_fit() -> None:
    """'é' is 2 bytes: 3 bytes of room hold one; the cut never keeps half of the next."""
    assert name_head("ééé", 3) == "é"
    assert name_head("aé", 2) == "a"
    assert name_head(os.fsdecode(b"\xffa\xff"), 2) == os.fsdecode(b"\xffa")


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_a_new_file_under_a_long_name_is_written_and_published(tmp_path: Path, name: str) -> None:
    """The filesystem takes the temporary name of any name it takes."""
    target = tmp_path / name
    new = NewFile(target)
    try:
        new.write(b"data")
        new.publish()
    finally:
        new.discard()
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [name]
