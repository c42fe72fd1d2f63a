"""A sidecar goes with its input only once it has settled, unchanged since, and no
program still writes it: a sidecar written after the scan found its input ready, or
rewritten after the intent was journaled, or still open, never gives the record half
its metadata. Each test runs the real daemon, stopped at a test seam at the moment
the sidecar changes."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, wait_for

RECORDING = b"a recording whose sidecar is still being written"


def _metadata(h: DaemonHarness) -> dict[str, Any]:
    """The registry's metadata of the one record holding RECORDING."""
    with h.open_registry() as reg:
        [found] = reg.search(sha1=hashlib.sha1(RECORDING).hexdigest())
        record = reg.get_resource(found.name)
    assert record is not None
    return dict(record.metadata)


def _states(h: DaemonHarness) -> list[str]:
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT state FROM items")]
    finally:
        db.close()


def test_a_sidecar_written_after_the_scan_settles_before_its_input_is_taken(
    daemon_factory: Any,
) -> None:
    """A sidecar created between the scan that found rec.dat ready and its intent is not
    taken half written: rec.dat waits until the sidecar settles, then carries all of it."""
    h = daemon_factory(inbox_options={"auto_id": True, "settle_seconds": 4})
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "before-intent", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        h.drop("rec.dat", RECORDING)
        wait_for(Path(f"{go}.reached").exists, 30, "the scan to find rec.dat ready")
        sidecar = h.inbox / "rec.dat.nbank.yaml"
        sidecar.write_text("metadata:\n  bird: b1\n")  # the first half of it
        go.touch()
        wait_for(
            lambda: "settling: sidecar" in nbankctl(h, "explain", str(h.inbox / "rec.dat")).stdout,
            30,
            "rec.dat to wait for its new sidecar to settle",
        )
        with sidecar.open("a") as f:
            f.write("  age: 3\n")
        h.wait_settled(1)
    finally:
        h.stop()
    assert _metadata(h) == {"bird": "b1", "age": 3}


def test_a_sidecar_rewritten_after_the_intent_sends_its_input_back_to_settle(
    daemon_factory: Any,
) -> None:
    """A sidecar rewritten between the intent and the claim is not read: the input goes
    back to the inbox and is deposited once the new sidecar has settled, with all of it."""
    h = daemon_factory(inbox_options={"auto_id": True, "settle_seconds": 2})
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        sidecar = h.inbox / "rec.dat.nbank.yaml"
        sidecar.write_text("metadata:\n  bird: b0\n")
        h.drop("rec.dat", RECORDING)
        wait_for(Path(f"{go}.reached").exists, 30, "the intent to be journaled")
        sidecar.write_text("metadata:\n  bird: b2\n")  # rewritten: the first half of it
        go.touch()
        wait_for(lambda: _states(h) == ["returned"], 30, "rec.dat to go back to the inbox")
        assert (h.inbox / "rec.dat").read_bytes() == RECORDING
        with sidecar.open("a") as f:
            f.write("  age: 3\n")
        h.wait_settled(1)
    finally:
        h.stop()
    assert _metadata(h) == {"bird": "b2", "age": 3}


def test_a_sidecar_still_open_for_writing_holds_its_input(daemon_factory: Any) -> None:
    """A sidecar some program still holds open for writing keeps its input waiting, as
    the input itself would, however long it has been quiet."""
    h = daemon_factory(inbox_options={"auto_id": True, "settle_seconds": 0.3})
    h.start()
    sidecar = h.inbox / "rec.dat.nbank.yaml"
    try:
        with sidecar.open("w") as writer:
            writer.write("metadata:\n  bird: b1\n")
            writer.flush()
            h.drop("rec.dat", RECORDING)
            wait_for(
                lambda: (
                    "open for writing" in nbankctl(h, "explain", str(h.inbox / "rec.dat")).stdout
                ),
                30,
                "rec.dat to wait for the program writing its sidecar",
            )
            assert h.receipts() == []
            writer.write("  age: 3\n")
        h.wait_settled(1)
    finally:
        h.stop()
    assert _metadata(h) == {"bird": "b1", "age": 3}
