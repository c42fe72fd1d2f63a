"""Second hostile round on the state_dir fixes (rejected_dirs.json, per-inbox requeue
records, reloads). Real daemon subprocesses where a daemon is needed; no sleeps for
synchronisation (polling with a deadline, or a bounded join)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, wait_for
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.daemon import requeue_recovery
from nbankd.deposit import inboxfs
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME

# --- 1. an inbox widened to the folder above it ----------------------------------------


def test_an_inbox_widened_to_its_parent_never_deposits_the_old_rejected_folder(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An inbox whose path changes to the folder above it (a lab merging its rigs into
    one recursive inbox) never takes the old inbox's rejected folder (NAME.reason files,
    rejected inputs) as new inputs: the record already says that folder is one."""
    h = daemon_factory()
    rig = h.inbox / "rigA"
    rig.mkdir(parents=True)
    h.inbox_options = {"path": str(rig)}
    h.start()
    h.drop("rigA/trial7.nbank.yaml", b"id: [unclosed\n")  # a bad sidecar: rejected
    h.drop("rigA/trial7", b"the recording of trial 7")
    old_rejected = rig / "rejected"
    wait_for(lambda: (old_rejected / "trial7.reason").exists(), 30, "the rejection")
    wait_for(lambda: not h.journal_in_flight(), 30, "the rejection to finish")
    h.stop()
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(path=str(h.inbox)))
    h.start()
    h.drop("after.dat", b"dropped after the restart")
    wait_for(lambda: h.receipt("after"), 30, "the file dropped after the restart")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    h.stop()
    sources = [r["source"] for r in h.receipts()]
    from_old = [s for s in sources if "/rigA/rejected/" in s or f"/rigA/{WORK_DIR_NAME}/" in s]
    left = sorted(
        str(p.relative_to(h.inbox)) for p in h.inbox.rglob("*") if WORK_DIR_NAME not in p.parts
    )
    assert from_old == [], (from_old, left)
    assert (old_rejected / "trial7.reason").exists(), left
    assert (old_rejected / "trial7").read_bytes() == b"the recording of trial 7", left


# --- 2. a rejected_dir set by mistake and set back -------------------------------------


def test_a_rejected_dir_set_by_mistake_and_set_back_does_not_hide_a_data_folder(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """A reload that names an existing data folder as rejected_dir (a typo), then a
    reload that sets it back: the data folder, into which nothing was ever rejected,
    is an ordinary part of the inbox again and what a rig writes there is deposited."""
    h = daemon_factory()
    h.start()
    h.drop("sessions/day1.dat", b"day one")
    wait_for(lambda: h.receipt("day1"), 30, "day1 deposited")
    h.reload_with(lambda cfg: cfg["inboxes"][0].update(rejected_dir="sessions"))
    h.reload_with(lambda cfg: cfg["inboxes"][0].update(rejected_dir="rejected"))
    h.drop("sessions/day2.dat", b"day two")
    h.drop("marker.dat", b"dropped after the day2 file")
    wait_for(lambda: h.receipt("marker"), 30, "the later file deposited")
    # day2 was there first and settled first: a fair scan has taken it by now
    try:
        wait_for(lambda: h.receipt("day2"), 60, "day2 deposited")
    finally:
        h.stop()


# --- 3. a requeue record that is not a regular file ------------------------------------


def _spec(tmp_path: Path, name: str = "inbox") -> InboxSpec:
    inbox = tmp_path / name
    inbox.mkdir()
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    return InboxSpec.of(
        InboxConfig(path=inbox, archive="arch", dtype="wav"),
        ArchiveConfig(name="arch", path=tmp_path / "arch"),
        work_id=work_id,
        rejected_id=rejected_id,
    )


def test_a_fifo_in_place_of_a_requeue_record_never_hangs_the_recovery(tmp_path: Path) -> None:
    """A FIFO at state_dir/requeue-HASH.json (or any requeue-*.json) is refused as a
    record, as rejected_dirs.json refuses one; the recovery run at every start returns
    instead of waiting for ever for a writer."""
    spec = _spec(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    fifo = requeue_recovery.record_path(state, spec.key)
    os.mkfifo(fifo)
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(requeue_recovery.recover(state, {spec.key: spec})), daemon=True
    )
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    if hung:  # release the reader so that the thread ends
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(10)
    assert not hung, "recover() blocked opening a FIFO requeue record"


def test_one_bad_entry_among_requeue_records_does_not_stop_the_others_recovery(
    tmp_path: Path,
) -> None:
    """A folder named like a requeue record (requeue-0.json) in state_dir is said and
    passed over; the start's recovery still undoes another inbox's stopped requeue
    (its sidecar back in the rejected folder before the first scan)."""
    spec = _spec(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "requeue-0.json").mkdir()  # sorts before every requeue-HASH.json
    rejected = spec.rejected_dir
    (rejected / "rec.wav").write_bytes(b"the rejected recording")
    (rejected / "rec.wav.reason").write_text("{}")
    side = spec.path / "rec.wav.nbank.yaml"  # moved back before the crash
    side.write_text("id: old0001\n")
    moves = []
    for src, entry in (("rec.wav.nbank.yaml", side), ("rec.wav", rejected / "rec.wav")):
        st = os.lstat(entry)
        moves.append(
            {"from": src, "to": src, "id": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
        )
    record = requeue_recovery.record_path(state, spec.key)
    record.write_text(json.dumps({"inbox": spec.key, "moves": moves, "reason": "rec.wav.reason"}))
    with contextlib.suppress(OSError):  # the daemon logs it and goes on to its first scan
        requeue_recovery.recover(state, {spec.key: spec})
    assert not side.exists(), "the sidecar stayed in the inbox for a newcomer to take"
    assert (rejected / "rec.wav.nbank.yaml").exists()
    assert not record.exists()
