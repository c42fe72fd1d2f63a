"""Review of the Intent refactor: what a step reads from the journal row and what it
still takes from the live inbox, for a daemon inbox and a manual deposit alike."""

from __future__ import annotations

from fixtures.steps_env import Env
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import State
from nbankd.deposit.receipts import read_receipts, receipts_path


def test_a_manual_deposits_receipt_names_its_folder(env: Env) -> None:
    """A manual deposit's receipt is filed under, and names as its inbox, the files'
    folder (as before the Intent), never the journal's key of options."""
    folder = env.root / "files"
    folder.mkdir()
    (folder / "rec.dat").write_bytes(b"bytes")
    inbox = manual.ManualInbox(
        folder=folder,
        archive="arch",
        archive_path=env.archive.path,
        registry=env.registry.url,
        dtype="test-file",
    )
    spec = inbox.spec(prepare=True)
    env.steps.inboxes = lambda key: spec if key == inbox.key else None
    [item], refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert refused == []
    item = env.until(item, State.DONE)
    assert item.state is State.DONE
    (receipt,) = read_receipts(env.root / "receipts")
    assert receipt["inbox"] == str(folder)
    assert receipt["source"] == str(folder / "rec.dat")
    assert receipts_path(env.root / "receipts", str(folder)).exists()
