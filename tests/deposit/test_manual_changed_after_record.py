"""A manual deposit (``nbankctl deposit``) whose file a writer changed after its record:
the archive keeps the claimed version under its identifier and the changed file goes
back in place. What the deposit reports must still name that stored identifier."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from nbankctl.deposit_output import report_outcomes
from nbankctl.report import Report
from nbankd.archive import opening
from nbankd.deposit import manual
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import FINAL, State, Step, advance, next_step
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.factory import open_registry


def test_a_manual_deposit_changed_after_its_record_reports_its_stored_identifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded (receipt written, bytes stored and registered), then appended to by a
    writer: the file goes back in place, and the ``nbank deposit -j`` record the
    deposit prints still gives the identifier of the stored copy, not an error that
    would make a script deposit the file again."""
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    archive = opening.create_archive(tmp_path / "arch", registry.url)
    registry.add_datatype("test-file")
    registry.add_archive("arch", "neurobank", str(archive.path))
    folder = tmp_path / "rig"
    folder.mkdir()
    first, more = os.urandom(30_000), os.urandom(3_000)
    (folder / "take.dat").write_bytes(first)
    inbox = manual.ManualInbox(
        folder=folder,
        archive="arch",
        archive_path=archive.path,
        registry=registry.url,
        dtype="test-file",
    )
    inbox.spec(prepare=True)
    journal = Journal(tmp_path / "journal.sqlite3")
    steps = Steps(
        journal=journal,
        registry=registry,
        inboxes=manual.spec_for_key,
        receipts_dir=tmp_path / "receipts",
    )
    try:
        [item], refused = manual.journal_files(
            journal, inbox, ["take.dat"], kind="file", now=time.time()
        )
        assert refused == []
        # copied, as journal_files decides when it cannot tell whether a writer still
        # holds the file (no lease: another user's file, NFS) or the archive is elsewhere
        item = journal.save(replace(item, placement="copy"))
        for _ in range(40):
            if item.state in FINAL:
                break
            step = next_step(item.progress, float("inf"))
            assert step is not None
            if step is Step.RELEASE:  # recorded: a writer appends now
                with open(folder / WORK_DIR_NAME / item.token, "ab") as writer:
                    writer.write(more)
            item, outcome = steps.run(item, step)
            item = journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
        assert item.state is State.RETURNED
        assert (folder / "take.dat").read_bytes() == first + more
        stored = [p for p in archive.resources_dir.rglob("*") if p.is_file()]
        assert [p.read_bytes() for p in stored] == [first]
        printed = manual.record(item)
        assert printed.get("id") == item.name, (
            f"stored as {item.name}, the deposit prints {printed}"
        )
        assert "back in place" in printed["note"]
        report = Report()
        args = argparse.Namespace(json_out=True, json=False)
        report_outcomes(args, report, [manual.describe(item, folder / "take.dat")])
        said = capsys.readouterr()
        assert f"deposited as {item.name}" in said.err and "back in place" in said.err
        assert json.loads(said.out)["id"] == item.name
        assert report.exit_code != 0  # the file as it is now was not deposited
    finally:
        journal.close()
        registry.close()
