"""The daemon's ``deposit-status`` hands a refused manual input back
(``manual.return_rejected``) while it answers, also where the atomic no-replace rename
is refused."""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbankd.archive import fsops
from nbankd.archive.fsops import NoReplaceUnsupported
from nbankd.control import deposit_handlers
from nbankd.deposit import manual
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State


def test_deposit_status_answers_where_a_refused_file_is_on_nfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where renameat2(RENAME_NOREPLACE) is refused with EINVAL (the Linux NFS client
    does), deposit-status puts the file back by link and unlink and says it is back."""
    folder = tmp_path / "rig"
    (folder / manual.REJECTED_DIR).mkdir(parents=True)
    held = folder / manual.REJECTED_DIR / "rec.wav"
    held.write_bytes(b"refused bytes")
    st = held.stat()
    inbox = manual.ManualInbox(
        folder=folder, archive="a", archive_path=tmp_path / "a", registry="http://x/"
    )
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        item = journal.add(
            token="ab" * 16,
            inbox=inbox.key,
            relpath=b"rec.wav",
            kind="file",
            archive="a",
            archive_path=str(tmp_path / "a"),
            placement="copy",
            verify=1,
            created=0.0,
            updated=0.0,
        )
        journal.save(
            replace(
                item,
                state=State.REJECTED,
                rejected_relpath=b"rec.wav",
                identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
                reason_json=json.dumps({"message": "duplicate"}),
            )
        )

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
