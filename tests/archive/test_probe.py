"""What an archive's filesystem can do (nbankd.archive.probe), and what nbankd says it
does instead of what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbankd.archive.probe import Capabilities, probe

ALL = Capabilities(hard_links=True, rename_noreplace=True, o_direct=True, flock=True)


def test_a_local_filesystem_has_everything(tmp_path: Path) -> None:
    """On the test machine's disk every feature works, and the probe leaves nothing."""
    assert probe(tmp_path) == ALL
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_an_error(tmp_path: Path) -> None:
    """A folder that is not there (an unmounted archive) raises; nothing is guessed."""
    with pytest.raises(OSError):
        probe(tmp_path / "not-mounted")


@pytest.mark.parametrize(
    ("caps", "phrases", "publish"),
    [
        (ALL, [], True),
        (Capabilities(False, True, True, True), ["renameat2(RENAME_NOREPLACE)"], True),
        (Capabilities(False, False, True, True), ["deposits into it wait"], False),
        (Capabilities(True, True, False, True), ["no O_DIRECT"], True),
        (Capabilities(True, True, True, False), ["no flock"], True),
    ],
)
def test_notes_say_what_is_done_instead(
    caps: Capabilities, phrases: list[str], publish: bool
) -> None:
    """Each missing feature gets one sentence naming the fallback (or the wait)."""
    notes = caps.notes()
    assert len(notes) == len(phrases)
    assert all(p in n for p, n in zip(phrases, notes, strict=True))
    assert caps.can_publish is publish
