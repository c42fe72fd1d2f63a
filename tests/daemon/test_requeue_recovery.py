"""A requeue a crash stopped half way is finished or undone at the next start
(:func:`nbankd.daemon.requeue.recover`), from the plan it journaled in state_dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.daemon import requeue
from nbankd.deposit import inboxfs
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME


def _spec(tmp_path: Path) -> InboxSpec:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    return InboxSpec.of(
        InboxConfig(path=inbox, archive="arch", dtype="wav"),
        ArchiveConfig(name="arch", path=tmp_path / "arch"),
        work_id=work_id,
        rejected_id=rejected_id,
    )


def _record(state: Path, spec: InboxSpec, moves: list[tuple[str, str, Path]]) -> None:
    """The plan as requeue journals it: (name in rejected/, name in the inbox, the
    entry whose device and inode are recorded), the input last."""
    state.mkdir(exist_ok=True)
    entries = []
    for src, dst, entry in moves:
        st = os.lstat(entry)
        entries.append(
            {"from": src, "to": dst, "id": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
        )
    doc = {"inbox": spec.key, "moves": entries, "reason": "rec.wav.reason"}
    requeue.record_path(state).write_text(json.dumps(doc))


def test_a_requeue_stopped_before_its_input_moved_is_undone(tmp_path: Path) -> None:
    """The sidecar moved back before the crash returns to the rejected folder, beside
    its input and reason; the record is gone."""
    spec = _spec(tmp_path)
    rejected = spec.rejected_dir
    (rejected / "rec.wav").write_bytes(b"the rejected recording")
    (rejected / "rec.wav.reason").write_text("{}")
    side = spec.path / "rec.wav.nbank.yaml"  # already moved back by the requeue
    side.write_text("id: old0001\n")
    _record(
        tmp_path / "state",
        spec,
        [
            ("rec.wav.nbank.yaml", "rec.wav.nbank.yaml", side),
            ("rec.wav", "rec.wav", rejected / "rec.wav"),
        ],
    )
    said = requeue.recover(tmp_path / "state", {spec.key: spec})
    assert said is not None and "stopped before its input moved back" in said
    assert not side.exists()
    assert (rejected / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"
    assert (rejected / "rec.wav.reason").exists()
    assert not requeue.record_path(tmp_path / "state").exists()


def test_a_requeue_stopped_after_its_input_moved_is_finished(tmp_path: Path) -> None:
    """The input already back in the inbox: the requeue was done; its reason file goes."""
    spec = _spec(tmp_path)
    rejected = spec.rejected_dir
    (rejected / "rec.wav.reason").write_text("{}")
    back = spec.path / "rec.wav"
    back.write_bytes(b"the recording, requeued")
    _record(tmp_path / "state", spec, [("rec.wav", "rec.wav", back)])
    said = requeue.recover(tmp_path / "state", {spec.key: spec})
    assert said is not None and "finished" in said
    assert back.read_bytes() == b"the recording, requeued"
    assert not (rejected / "rec.wav.reason").exists()


def test_a_newcomer_in_the_sidecars_place_is_never_moved(tmp_path: Path) -> None:
    """A file now holding the sidecar's name in the inbox that is not the entry the
    requeue moved (written later, even on the inode number the moved one freed) stays
    where it is."""
    spec = _spec(tmp_path)
    rejected = spec.rejected_dir
    (rejected / "rec.wav").write_bytes(b"the rejected recording")
    moved = spec.path / "rec.wav.nbank.yaml"
    moved.write_text("id: old0001\n")
    _record(
        tmp_path / "state",
        spec,
        [
            ("rec.wav.nbank.yaml", "rec.wav.nbank.yaml", moved),
            ("rec.wav", "rec.wav", rejected / "rec.wav"),
        ],
    )
    before = moved.stat().st_mtime_ns
    moved.unlink()
    moved.write_text("id: new0002\n")  # a rig's own sidecar for a new rec.wav, written
    os.utime(moved, ns=(before + 10**9, before + 10**9))  # later (its inode maybe reused)
    requeue.recover(tmp_path / "state", {spec.key: spec})
    assert moved.read_text() == "id: new0002\n"
    assert not (rejected / "rec.wav.nbank.yaml").exists()


def test_without_a_record_nothing_is_done(tmp_path: Path) -> None:
    """No record in state_dir: nothing to recover."""
    spec = _spec(tmp_path)
    (tmp_path / "state").mkdir()
    assert requeue.recover(tmp_path / "state", {spec.key: spec}) is None
