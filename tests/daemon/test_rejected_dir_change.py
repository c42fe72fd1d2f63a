"""A changed ``rejected_dir`` (reload or restart): the earlier rejected folder is
never taken as inputs while it exists (recorded in state_dir). Real daemon
subprocesses; no sleeps for synchronisation (polling with a deadline)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fixtures.daemon import DaemonHarness, nbankctl, wait_for
from nbankd.daemon import rejected_dirs
from nbankd.names import WORK_DIR_NAME

RECORD = rejected_dirs.RECORD_NAME


def _edit(h: DaemonHarness, change: Callable[[dict[str, Any]], Any]) -> None:
    cfg = yaml.safe_load(h.config_path.read_text())
    change(cfg)
    h.config_path.write_text(yaml.safe_dump(cfg))


def _reload(h: DaemonHarness, change: Callable[[dict[str, Any]], Any]) -> None:
    _edit(h, change)
    proc = nbankctl(h, "reload", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _receipt(h: DaemonHarness, ident: str) -> dict[str, Any] | None:
    return next((r for r in h.receipts() if r["id"] == ident), None)


def test_a_changed_rejected_dir_never_deposits_the_old_rejected_folder(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """After rejected_dir changes, what the old rejected folder holds (rejected inputs
    and their NAME.reason files) is left for a person, never deposited as inputs."""
    h = daemon_factory()
    h.start()
    h.drop("trial7.nbank.yaml", b"id: [unclosed\n")  # a bad sidecar: rejected
    h.drop("trial7", b"the recording of trial 7")
    h.wait_settled(1)
    assert (h.rejected / "trial7.reason").exists()
    _reload(h, lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    # the old rejected folder was there before this file: it is seen first, ready first
    h.drop("after.dat", b"dropped after the reload")
    wait_for(lambda: _receipt(h, "after"), 30, "the file dropped after the reload")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    h.stop()
    from_rejected = [r for r in h.receipts() if "/rejected/" in r["source"]]
    assert from_rejected == [], from_rejected  # trial7.reason was registered as "trial7"
    assert (h.rejected / "trial7.reason").exists()
    assert (h.rejected / "trial7").read_bytes() == b"the recording of trial 7"


def _record(h: DaemonHarness) -> dict[str, list[str]]:
    doc: dict[str, list[str]] = json.loads((h.state_dir / RECORD).read_text())["inboxes"]
    return doc


def test_an_upgraded_state_dir_without_the_record_learns_the_old_folder_from_the_journal(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A state_dir from before the record (an upgrade), started with a changed
    rejected_dir: the folder the journal's rejections went to is left alone all the
    same, and the record is written."""
    h = daemon_factory()
    h.start()
    h.drop("trial7.nbank.yaml", b"id: [unclosed\n")  # a bad sidecar: rejected
    h.drop("trial7", b"the recording of trial 7")
    h.wait_settled(1)
    h.stop()
    (h.state_dir / RECORD).unlink()  # as an earlier version left it
    _edit(h, lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    h.start()
    h.drop("after.dat", b"dropped after the upgrade")
    wait_for(lambda: _receipt(h, "after"), 30, "the file dropped after the upgrade")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    h.stop()
    assert [r["id"] for r in h.receipts()] == ["after"]
    assert (h.rejected / "trial7").read_bytes() == b"the recording of trial 7"
    assert _record(h) == {str(h.inbox): ["failed", "rejected"]}


def test_an_unchanged_inbox_upgrades_without_a_record(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A state_dir without the record and an unchanged configuration: the daemon
    starts and deposits as before, and records the rejected folder it uses."""
    h = daemon_factory()
    h.start()
    h.drop("first.dat", b"before")
    wait_for(lambda: _receipt(h, "first"), 30, "the first deposit")
    h.stop()
    (h.state_dir / RECORD).unlink()
    h.start()
    h.drop("second.dat", b"after")
    wait_for(lambda: _receipt(h, "second"), 30, "the deposit after the upgrade")
    h.stop()
    assert _record(h) == {str(h.inbox): ["rejected"]}


# -- the record, without a daemon ---------------------------------------------------


def test_the_record_refuses_a_link_and_a_malformed_file_and_keeps_valid_folders(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert rejected_dirs.load(state) == ({}, None)  # absent: nothing recorded
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"inboxes": {"/in": ["old"]}}))
    (state / RECORD).symlink_to(target)
    record, why = rejected_dirs.load(state)
    assert record == {} and why is not None and "link" in why
    (state / RECORD).unlink()
    (state / RECORD).write_text("{not json")
    assert rejected_dirs.load(state)[1] is not None
    entries = ["old", "a/b", "../out", "/abs", WORK_DIR_NAME, f"{WORK_DIR_NAME}/x", ".", 3]
    (state / RECORD).write_text(json.dumps({"inboxes": {"/in": entries}}))
    assert rejected_dirs.load(state) == ({"/in": ("a/b", "old")}, None)
    rejected_dirs.save(state, {"/in": ["old", "rejected"]})
    assert rejected_dirs.load(state) == ({"/in": ("old", "rejected")}, None)
