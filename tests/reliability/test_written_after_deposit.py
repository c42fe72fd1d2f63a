"""A program that keeps a file open past the settle time and writes again after the
daemon copied it never loses those bytes: the daemon does not remove an input that is
no longer the one it claimed."""

from __future__ import annotations

import os
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for


def test_bytes_written_after_the_record_are_never_removed(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """Where the kernel cannot say whether the file is open (the daemon neither owns it
    nor holds CAP_LEASE), a writer that appends after the record step loses nothing:
    the archive keeps the claimed bytes, and the whole file, appended bytes included,
    is kept in the rejected folder (its name is taken by the earlier version)."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
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
    assert "cannot tell whether files are still open for writing" in log


def test_a_quiet_file_still_open_for_writing_waits_until_closed(daemon_factory: Any) -> None:
    """A file a program keeps open for writing, quiet for many settle periods, is not
    claimed; once the program closes it (after writing more) it is deposited whole."""
    h: DaemonHarness = daemon_factory()
    h.start()
    first, more = os.urandom(30_000), os.urandom(4_000)
    tmp = h.root / "recording.tmp"
    with open(tmp, "wb") as writer:
        writer.write(first)
        writer.flush()
        os.rename(tmp, h.inbox / "open01.dat")
        wait_for(
            lambda: (
                sum(
                    e.get("event") == "input still open for writing; it waits until closed"
                    for e in h.log_events()
                )
                >= 1
            ),
            30,
            "the daemon to find the file open for writing",
        )
        src = str(h.inbox / "open01.dat")
        wait_for(
            lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
            30,
            "explain to say why the file waits",
        )
        assert h.receipts() == []
        assert (h.inbox / "open01.dat").exists()  # never claimed while open
        [inbox] = status_json(h)[1]["inboxes"]
        assert inbox["open_for_writing"] == ["open01.dat"]  # status and metrics show it
        writer.write(more)
    h.wait_settled(1)
    h.stop()
    assert h.archive_files()["open01.dat"].read_bytes() == first + more
    codes = {e.get("code") for e in h.log_events()}
    assert "open-for-writing" not in codes  # never claimed and put back: no churn
