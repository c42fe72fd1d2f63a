"""A requeue a crash stopped half way is finished or undone at the next start
(:func:`nbankd.daemon.requeue_recovery.recover`), from the plan it journaled in state_dir: one
record per inbox, kept while its inbox is not configured; the single record of an
earlier release is read too."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.daemon import requeue_recovery
from nbankd.deposit import inboxfs
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME


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


def _record(
    state: Path, spec: InboxSpec, moves: list[tuple[str, str, Path]], *, legacy: bool = False
) -> Path:
    """The plan as requeue journals it: (name in rejected/, name in the inbox, the
    entry whose device and inode are recorded), the input last; ``legacy``: in the
    single record of an earlier release."""
    state.mkdir(exist_ok=True)
    entries = []
    for src, dst, entry in moves:
        st = os.lstat(entry)
        entries.append(
            {"from": src, "to": dst, "id": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
        )
    doc = {"inbox": spec.key, "moves": entries, "reason": "rec.wav.reason"}
    name = requeue_recovery.LEGACY_RECORD_NAME
    path = state / name if legacy else requeue_recovery.record_path(state, spec.key)
    path.write_text(json.dumps(doc))
    return path


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
    said = requeue_recovery.recover(tmp_path / "state", {spec.key: spec})
    assert len(said.done) == 1 and "stopped before its input moved back" in said.done[0]
    assert not side.exists()
    assert (rejected / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"
    assert (rejected / "rec.wav.reason").exists()
    assert not requeue_recovery.record_path(tmp_path / "state", spec.key).exists()


def test_a_requeue_stopped_after_its_input_moved_is_finished(tmp_path: Path) -> None:
    """The input already back in the inbox: the requeue was done; its reason file goes."""
    spec = _spec(tmp_path)
    rejected = spec.rejected_dir
    (rejected / "rec.wav.reason").write_text("{}")
    back = spec.path / "rec.wav"
    back.write_bytes(b"the recording, requeued")
    _record(tmp_path / "state", spec, [("rec.wav", "rec.wav", back)])
    said = requeue_recovery.recover(tmp_path / "state", {spec.key: spec})
    assert len(said.done) == 1 and "finished" in said.done[0]
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
    requeue_recovery.recover(tmp_path / "state", {spec.key: spec})
    assert moved.read_text() == "id: new0002\n"
    assert not (rejected / "rec.wav.nbank.yaml").exists()


def test_without_a_record_nothing_is_done(tmp_path: Path) -> None:
    """No record in state_dir: nothing to recover."""
    spec = _spec(tmp_path)
    (tmp_path / "state").mkdir()
    assert (
        requeue_recovery.recover(tmp_path / "state", {spec.key: spec})
        == requeue_recovery.Recovery()
    )


def _stopped_with_sidecar_moved(tmp_path: Path, spec: InboxSpec, *, legacy: bool = False) -> Path:
    """A requeue of rec.wav stopped after its sidecar moved back (input still rejected)."""
    rejected = spec.rejected_dir
    (rejected / "rec.wav").write_bytes(b"the rejected recording")
    (rejected / "rec.wav.reason").write_text("{}")
    side = spec.path / "rec.wav.nbank.yaml"
    side.write_text("id: old0001\n")
    moves = [
        ("rec.wav.nbank.yaml", "rec.wav.nbank.yaml", side),
        ("rec.wav", "rec.wav", rejected / "rec.wav"),
    ]
    return _record(tmp_path / "state", spec, moves, legacy=legacy)


def test_a_record_of_an_inbox_left_out_is_kept_and_undone_when_it_returns(
    tmp_path: Path,
) -> None:
    """The record of an inbox not configured stays (named in the outcome) while another
    inbox's record is recovered and another inbox's requeue writes its own; when the
    inbox is configured again its stopped requeue is undone."""
    away, here = _spec(tmp_path, "away"), _spec(tmp_path, "here")
    state = tmp_path / "state"
    kept = _stopped_with_sidecar_moved(tmp_path, away)
    other = _record(state, here, [("x.wav", "x.wav", _touch(here.rejected_dir / "x.wav"))])
    said = requeue_recovery.recover(state, {here.key: here})
    assert kept.exists() and not other.exists()
    assert any(away.key in d and str(kept) in d for d in said.done), said
    # a requeue into "here" writes its own record, never over the one kept
    assert requeue_recovery.record_path(state, here.key) != kept
    said = requeue_recovery.recover(state, {here.key: here, away.key: away})
    assert any("stopped before its input moved back" in d for d in said.done), said
    assert not (away.path / "rec.wav.nbank.yaml").exists()
    assert (away.rejected_dir / "rec.wav.nbank.yaml").read_text() == "id: old0001\n"
    assert not kept.exists()


def test_recovery_of_only_some_inboxes_leaves_the_other_records(tmp_path: Path) -> None:
    """A reload recovers only the inboxes it brings back: a configured inbox's record
    outside ``keys`` is left alone, and nothing is said of records of inboxes left
    out."""
    away, here = _spec(tmp_path, "away"), _spec(tmp_path, "here")
    state = tmp_path / "state"
    kept = _stopped_with_sidecar_moved(tmp_path, away)
    mine = _stopped_with_sidecar_moved(tmp_path, here)
    assert requeue_recovery.recover(state, {here.key: here}, keys=[]) == requeue_recovery.Recovery()
    assert kept.exists() and mine.exists()
    said = requeue_recovery.recover(state, {here.key: here}, keys=[here.key])
    assert len(said.done) == 1 and here.key in said.done[0]
    assert kept.exists() and not mine.exists()


def test_the_single_record_of_an_earlier_release_is_recovered(tmp_path: Path) -> None:
    """An upgrade: state_dir/requeue.json, its inbox configured, is undone at start."""
    spec = _spec(tmp_path)
    legacy = _stopped_with_sidecar_moved(tmp_path, spec, legacy=True)
    said = requeue_recovery.recover(tmp_path / "state", {spec.key: spec})
    assert len(said.done) == 1 and "stopped before its input moved back" in said.done[0]
    assert (spec.rejected_dir / "rec.wav.nbank.yaml").exists()
    assert not legacy.exists()


def test_the_single_record_of_an_inbox_left_out_becomes_its_inboxs_record(
    tmp_path: Path,
) -> None:
    """An upgrade while the record's inbox is left out: requeue.json is renamed to that
    inbox's record (free for nothing else to write over), recovered when it returns."""
    away = _spec(tmp_path, "away")
    state = tmp_path / "state"
    legacy = _stopped_with_sidecar_moved(tmp_path, away, legacy=True)
    said = requeue_recovery.recover(state, {})
    record = requeue_recovery.record_path(state, away.key)
    assert not legacy.exists() and record.exists()
    assert any(str(record) in d for d in said.done), said
    requeue_recovery.recover(state, {away.key: away})
    assert (away.rejected_dir / "rec.wav.nbank.yaml").exists()
    assert not record.exists()


def test_a_record_whose_recovery_fails_is_kept(tmp_path: Path) -> None:
    """A recovery that cannot move (the rejected folder replaced) keeps its record and
    says why; the other records are still recovered."""
    broken, fine = _spec(tmp_path, "broken"), _spec(tmp_path, "fine")
    state = tmp_path / "state"
    kept = _stopped_with_sidecar_moved(tmp_path, broken)
    done = _stopped_with_sidecar_moved(tmp_path, fine)
    swapped = broken.rejected_dir
    swapped.rename(tmp_path / "elsewhere")
    swapped.mkdir()
    said = requeue_recovery.recover(state, {broken.key: broken, fine.key: fine})
    assert len(said.failed) == 1 and broken.key in said.failed[0], said
    assert kept.exists() and not done.exists()


def _touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


def test_a_malformed_record_is_removed_and_said(tmp_path: Path) -> None:
    """A record that is not one requeue wrote (a move without its destination) is
    removed, saying so, and never stops the start."""
    spec = _spec(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    record = requeue_recovery.record_path(state, spec.key)
    record.write_text(json.dumps({"inbox": spec.key, "moves": [{"from": "a", "id": []}]}))
    said = requeue_recovery.recover(state, {spec.key: spec})
    assert len(said.done) == 1 and "unreadable" in said.done[0], said
    assert not record.exists()
