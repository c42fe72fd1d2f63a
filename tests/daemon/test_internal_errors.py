"""An unexpected error inside a deposit step (a bug) keeps the input and backs off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fixtures.daemon import DaemonHarness, status_json, wait_for
from nbankd.daemon.service import JOURNAL_NAME
from nbankd.deposit.folderproof import PROOF_NAME
from nbankd.deposit.journal import Journal

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))


def test_unexpected_error_in_a_step_waits_with_backoff_and_keeps_the_input(
    daemon_factory,
) -> None:
    """A step raising an unexpected error leaves the input claimed and intact, records
    code `internal` with a backoff (no hot retry loop), and the status names it."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_RAISE_AT": "after-lookup"})
    h.drop("bug01.dat", b"precious bytes")

    journal = Journal(h.state_dir / JOURNAL_NAME)

    def failed_item():
        items = [i for i in journal.unfinished() if i.error_code == "internal"]
        return items[0] if items else None

    item = wait_for(failed_item, 60, "the item to fail with code internal")
    assert item.attempts >= 1 and item.not_before > item.updated

    def logged() -> int:
        return h.log_path.read_text().count("unexpected error in a deposit step")

    # the log writer's thread may write the line after the journal has the attempt;
    # each attempt logs once, before its journal write: attempts read after the log
    tracebacks = wait_for(logged, 60, "the unexpected error logged")
    attempts = failed_item().attempts
    assert 1 <= tracebacks <= attempts
    work = [p for p in (h.inbox / ".nbank").rglob("*") if p.is_file() and p.name != PROOF_NAME]
    assert [p.read_bytes() for p in work] == [b"precious bytes"]
    assert h.archive_files() == {} and h.receipts() == []
    code, status = status_json(h)
    assert code == 1 and "internal" in json.dumps(status)
    journal.close()
    h.stop()
