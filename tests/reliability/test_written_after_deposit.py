"""A program that keeps a file open past the settle time and writes again after the
daemon copied it never loses those bytes: the daemon does not remove an input that is
no longer the one it claimed."""

from __future__ import annotations

import os
from typing import Any

from fixtures.daemon import DaemonHarness, wait_for


def test_bytes_written_after_the_record_are_never_removed(daemon_factory: Any) -> None:
    """The writer appends after the record step: the archive keeps the claimed bytes,
    and the whole file, appended bytes included, is kept in the inbox's rejected folder
    (its name is taken by the earlier version) with a reason naming the holder."""
    h: DaemonHarness = daemon_factory()
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-record", "NBANKD_PAUSE_UNTIL": str(go)})
    first, more = os.urandom(60_000), os.urandom(7_000)
    tmp = h.root / "writing.tmp"
    with open(tmp, "wb") as writer:  # open since before the file entered the inbox
        writer.write(first)
        writer.flush()
        os.rename(tmp, h.inbox / "late01.dat")
        wait_for(lambda: len(h.receipts()) == 1, 30, "the receipt of the first version")
        writer.write(more)  # paused after the record step: the copy is stored
        writer.flush()
    go.touch()
    reasons = wait_for(h.reasons, 60, "the changed version to be rejected by name")
    h.stop()
    assert h.archive_files()["late01.dat"].read_bytes() == first
    [receipt] = h.receipts()
    assert (receipt["id"], receipt["outcome"]) == ("late01", "deposited")
    kept = [p for p in h.rejected.rglob("late01*") if not p.name.endswith(".reason")]
    assert [p.read_bytes() for p in kept] == [first + more]
    assert "late01" in reasons[0]["message"]
    log = h.log_path.read_text()
    assert "changed after its copy was deposited as late01" in log
