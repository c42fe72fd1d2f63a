"""A changed ``rejected_dir`` (reload or restart): the earlier rejected folder is
never taken as inputs while it exists (recorded in state_dir), status names it,
and ``nbankctl requeue`` still takes inputs out of it. Real daemon subprocesses;
no sleeps for synchronisation (polling with a deadline)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.control.alert_rules import conditions
from nbankd.daemon import rejected_dirs, requeue_recovery
from nbankd.deposit import inboxfs
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME

RECORD = rejected_dirs.RECORD_NAME


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
    h.reload_with(lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    # the old rejected folder was there before this file: it is seen first, ready first
    h.drop("after.dat", b"dropped after the reload")
    wait_for(lambda: h.receipt("after"), 30, "the file dropped after the reload")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    h.stop()
    from_rejected = [r for r in h.receipts() if "/rejected/" in r["source"]]
    assert from_rejected == [], from_rejected  # trial7.reason was registered as "trial7"
    assert (h.rejected / "trial7.reason").exists()
    assert (h.rejected / "trial7").read_bytes() == b"the recording of trial 7"


def _explain(h: DaemonHarness, path: Path) -> dict[str, Any]:
    proc = nbankctl(h, "explain", str(path), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _record(h: DaemonHarness) -> dict[str, list[str]]:
    doc: dict[str, list[str]] = json.loads((h.state_dir / RECORD).read_text())["inboxes"]
    return doc


def _earlier(h: DaemonHarness) -> list[dict[str, Any]]:
    _code, status = status_json(h)
    earlier: list[dict[str, Any]] = status["inboxes"][0]["earlier_rejected_dirs"]
    return earlier


def test_after_a_restart_with_a_new_rejected_dir_status_names_the_old_one_and_requeue_empties_it(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A restart with an edited rejected_dir: the old folder is left alone, status
    names it and how to empty it, explain and requeue (by rejected or original path)
    take its inputs out; once it holds no rejection it is forgotten, and a folder
    of that name is an ordinary part of the inbox."""
    h = daemon_factory()
    h.start()
    h.drop("with space.dat", b"good bytes")  # an invalid name: rejected
    h.drop("other one.dat", b"other bytes")
    h.wait_settled(2)
    h.stop()
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    h.start()
    h.drop("after.dat", b"dropped after the restart")
    wait_for(lambda: h.receipt("after"), 30, "the file dropped after the restart")
    assert _record(h) == {str(h.inbox): ["failed", "rejected"]}
    code, status = status_json(h)
    assert code == 1
    [entry] = status["inboxes"]
    assert entry["earlier_rejected_dirs"] == [
        {"path": str(h.rejected), "rejected_inputs": 2, "empty": False}
    ]
    assert entry["in_rejected_folder"] == 0
    [line] = [d for d in status["degraded"] if str(h.rejected) in d]
    assert "2 rejected input(s)" in line and "requeue --all-rejected" in line

    old = h.rejected / "with space.dat"
    explained = _explain(h, old)
    assert explained["state"] == "rejected" and explained["rejected_path"] == str(old)
    assert explained["reason"]["code"] == "invalid-name"
    assert _explain(h, h.rejected)["message"].startswith("an earlier rejected folder")
    by_original = _explain(h, h.inbox / "other one.dat")
    assert by_original["rejected_path"] == str(h.rejected / "other one.dat")

    (h.rejected / "with space.dat.nbank.yaml").write_text("id: withspace\n")
    proc = nbankctl(h, "requeue", str(old))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (h.rejected / "other one.dat.nbank.yaml").write_text("id: otherone\n")
    proc = nbankctl(h, "requeue", str(h.inbox / "other one.dat"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: h.receipt("withspace") and h.receipt("otherone"), 30, "requeued")
    assert list(h.rejected.iterdir()) == []
    # no NAME.reason left in it: forgotten at the next scan, an ordinary folder again
    assert nbankctl(h, "rescan").returncode == 0
    wait_for(lambda: _earlier(h) == [], 30, "the emptied folder to be forgotten")
    wait_for(lambda: status_json(h)[0] == 0, 30, "a healthy status")
    assert _record(h) == {str(h.inbox): ["failed"]}

    h.rejected.rmdir()
    h.drop("rejected/inner.dat", b"a folder of that name made later")
    wait_for(lambda: h.receipt("inner"), 30, "a file in a new folder of the old name")
    h.stop()


def test_requeue_all_rejected_takes_inputs_out_of_an_earlier_rejected_folder(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """After a reload to another rejected_dir, requeue --all-rejected INBOX takes the
    inputs of the old folder back too (here rejected again, into the new folder)."""
    h = daemon_factory()
    h.start()
    h.drop("with space.dat", b"good bytes")
    h.wait_settled(1)
    h.reload_with(lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [done] = json.loads(proc.stdout)["requeued"]
    assert done["rejected_path"] == str(h.rejected / "with space.dat")
    failed = h.inbox / "failed"
    wait_for(lambda: (failed / "with space.dat.reason").exists(), 30, "rejected again")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    assert sorted(p.name for p in h.rejected.iterdir()) == []
    h.stop()
    assert h.receipts() == []


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
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(rejected_dir="failed"))
    h.start()
    h.drop("after.dat", b"dropped after the upgrade")
    wait_for(lambda: h.receipt("after"), 30, "the file dropped after the upgrade")
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
    wait_for(lambda: h.receipt("first"), 30, "the first deposit")
    h.stop()
    (h.state_dir / RECORD).unlink()
    h.start()
    h.drop("second.dat", b"after")
    wait_for(lambda: h.receipt("second"), 30, "the deposit after the upgrade")
    assert _earlier(h) == []
    h.stop()
    assert _record(h) == {str(h.inbox): ["rejected"]}


# -- the record, and a requeue's recovery, without a daemon -------------------------


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


def _stopped_requeue(
    tmp_path: Path, folder: str, record: dict[str, Any]
) -> tuple[InboxSpec, Path, Path]:
    """An inbox (rejected_dir ``failed``, earlier ``rejected``) whose requeue of
    ``folder``/rec.wav a crash stopped after its sidecar moved back; ``record``: what
    the requeue record holds besides its moves. Returns the spec, the sidecar in the
    inbox and state_dir."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="failed")
    (inbox / "rejected").mkdir()
    spec = InboxSpec.of(
        InboxConfig(
            path=inbox,
            archive="arch",
            dtype="wav",
            rejected_dir="failed",
            earlier_rejected_dirs=("rejected",),
        ),
        ArchiveConfig(name="arch", path=tmp_path / "arch"),
        work_id=work_id,
        rejected_id=rejected_id,
    )
    (inbox / folder / "rec.wav").write_bytes(b"the rejected recording")
    (inbox / folder / "rec.wav.reason").write_text("{}")
    side = inbox / "rec.wav.nbank.yaml"  # moved back already
    side.write_text("id: old0001\n")
    moves = []
    for src, entry in (("rec.wav.nbank.yaml", side), ("rec.wav", inbox / folder / "rec.wav")):
        st = os.lstat(entry)
        moves.append(
            {"from": src, "to": src, "id": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
        )
    state = tmp_path / "state"
    state.mkdir()
    record["moves"] = moves
    return spec, side, state


def test_a_requeue_out_of_an_earlier_rejected_folder_is_undone_there(tmp_path: Path) -> None:
    """A requeue from an earlier rejected folder a crash stopped before its input
    moved: what had moved goes back to that folder, not to the current one; the
    inbox's record (requeue-HASH.json) names the folder."""
    doc: dict[str, Any] = {"reason": "rec.wav.reason", "rejected_dir": "rejected"}
    spec, side, state = _stopped_requeue(tmp_path, "rejected", doc)
    doc["inbox"] = spec.key
    record = requeue_recovery.record_path(state, spec.key)
    record.write_text(json.dumps(doc))
    said = requeue_recovery.recover(state, {spec.key: spec})
    assert not said.failed and len(said.done) == 1
    assert "stopped before its input moved back" in said.done[0]
    assert not side.exists() and not record.exists()
    assert (spec.path / "rejected" / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"
    assert list((spec.path / "failed").iterdir()) == []


def test_a_record_without_its_rejected_folder_means_the_current_one(tmp_path: Path) -> None:
    """A record of an earlier release (the single requeue.json, no rejected_dir) is
    undone into the inbox's current rejected folder."""
    doc: dict[str, Any] = {"reason": "rec.wav.reason"}
    spec, side, state = _stopped_requeue(tmp_path, "failed", doc)
    doc["inbox"] = spec.key
    (state / "requeue.json").write_text(json.dumps(doc))
    said = requeue_recovery.recover(state, {spec.key: spec})
    assert not said.failed and len(said.done) == 1
    assert "stopped before its input moved back" in said.done[0]
    assert not side.exists() and list(state.iterdir()) == []
    assert (spec.path / "failed" / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"
    assert list((spec.path / "rejected").iterdir()) == []


def test_a_record_kept_for_an_inbox_left_out_is_undone_into_its_folder(tmp_path: Path) -> None:
    """A legacy record naming an earlier rejected folder, its inbox not configured at
    start: renamed to the inbox's record, folder kept, and undone into that folder
    when the inbox comes back."""
    doc: dict[str, Any] = {"reason": "rec.wav.reason", "rejected_dir": "rejected"}
    spec, side, state = _stopped_requeue(tmp_path, "rejected", doc)
    doc["inbox"] = spec.key
    (state / "requeue.json").write_text(json.dumps(doc))
    said = requeue_recovery.recover(state, {})
    assert not said.failed and "is kept" in said.done[0]
    record = requeue_recovery.record_path(state, spec.key)
    assert json.loads(record.read_text())["rejected_dir"] == "rejected"
    said = requeue_recovery.recover(state, {spec.key: spec}, [spec.key])
    assert not said.failed and "stopped before its input moved back" in said.done[0]
    assert not side.exists() and list(state.iterdir()) == []
    assert (spec.path / "rejected" / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"


def test_a_record_naming_a_folder_outside_the_inbox_is_removed(tmp_path: Path) -> None:
    """A record whose rejected folder is no folder inside the inbox is not one requeue
    wrote: removed as unreadable, nothing moved through it."""
    doc: dict[str, Any] = {"reason": "rec.wav.reason", "rejected_dir": "../elsewhere"}
    spec, side, state = _stopped_requeue(tmp_path, "rejected", doc)
    doc["inbox"] = spec.key
    record = requeue_recovery.record_path(state, spec.key)
    record.write_text(json.dumps(doc))
    said = requeue_recovery.recover(state, {spec.key: spec})
    assert not said.failed and "unreadable requeue record" in said.done[0]
    assert side.exists() and not record.exists()


def test_an_alert_names_the_rejected_folder_its_input_waits_in() -> None:
    """A rejected input of an earlier rejected folder is told as waiting there, not in
    the current folder."""
    inbox = "/srv/inbox/rig3"
    earlier = {"path": f"{inbox}/rejected", "rejected_inputs": 1, "empty": False}
    entry = {"path": inbox, "rejected_dir": f"{inbox}/failed", "earlier_rejected_dirs": [earlier]}
    status = {"registry": {"problem": None}, "inboxes": [entry]}
    listed = {inbox: [f"{inbox}/rejected/a.wav", f"{inbox}/failed/b.wav"]}
    found = conditions(status, {}, {}, now=0, started=0, unavailable_after=1, rejected=listed)
    assert [c.summary for c in found] == [
        f"{inbox}/rejected/a.wav was rejected (it waits in {inbox}/rejected)",
        f"{inbox}/failed/b.wav was rejected (it waits in {inbox}/failed)",
    ]
