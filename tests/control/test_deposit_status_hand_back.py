"""The daemon's ``deposit-status`` hands a refused manual input back
(``manual.return_rejected``) while it answers, also where the atomic no-replace rename
is refused."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.items import held_rejection
from nbankd.archive import fsops
from nbankd.archive.fsops import NoReplaceUnsupported
from nbankd.control import deposit_handlers
from nbankd.deposit.journal import Journal


def test_deposit_status_answers_where_a_refused_file_is_on_nfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where renameat2(RENAME_NOREPLACE) is refused with EINVAL (the Linux NFS client
    does), deposit-status puts the file back by link and unlink and says it is back."""
    folder = tmp_path / "rig"
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        item, held = held_rejection(journal, folder, "rec.wav")

        def nfs(src_dir: int, src: bytes, dst_dir: int, dst: bytes) -> None:
            raise NoReplaceUnsupported(errno.EINVAL, "renameat2(RENAME_NOREPLACE): EINVAL")

        monkeypatch.setattr(fsops, "rename_noreplace_at", nfs)
        answer = deposit_handlers.deposit_status(
            SimpleNamespace(journal=journal), {"items": [item.id], "wait": 0}
        )
    finally:
        journal.close()
    [described] = answer["items"]
    assert described["where"] == str(folder / "rec.wav")  # back by link and unlink
    assert (folder / "rec.wav").read_bytes() == b"refused bytes" and not held.exists()
