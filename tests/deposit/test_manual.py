"""nbankd.deposit.manual: handing a rejected input back to the files' folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.items import held_rejection
from nbankd.deposit import manual
from nbankd.deposit.journal import Journal


def test_a_hand_back_that_another_thread_did_first_says_the_file_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """return_rejected whose rename finds the held file gone (a worker and a status
    request handing it back at once; here the move happens just before) answers its
    place, not an error."""
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        item, held = held_rejection(journal, tmp_path / "rig", "rec.wav")
    finally:
        journal.close()
    place = tmp_path / "rig" / "rec.wav"
    real = manual.move_noreplace_at

    def beaten(src_dir: int, src: bytes, dst_dir: int, dst: bytes) -> None:
        real(src_dir, src, dst_dir, dst)  # the other thread's hand-back
        real(src_dir, src, dst_dir, dst)  # ours: the source is gone

    monkeypatch.setattr(manual, "move_noreplace_at", beaten)
    assert manual.return_rejected(item) == place
    assert place.read_bytes() == b"refused bytes" and not held.exists()
