"""``nbankctl requeue`` of a rejected input the journal has no record of (a lost
state_dir, or a file someone put in the rejected folder with a ``.reason`` of their
own): it goes back only into the inbox folder that the one it sits in mirrors, which
must exist; its reason may give back its original name there, never another folder
(but for an input at the top of the rejected folder: tests/daemon/test_requeue_gaps.py)."""

from __future__ import annotations

import json
import shutil
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl


def _requeue_all(h: DaemonHarness) -> dict[str, Any]:
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return dict(json.loads(proc.stdout))


def test_inputs_rejected_before_a_lost_state_dir_are_requeued(daemon_factory: Any) -> None:
    """After the state_dir is lost, ``requeue --all-rejected`` still moves an input the
    daemon rejected back to where it was in the inbox."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("bad name.wav", b"a recording the registry refuses by its name")
    h.wait_settled(1)
    assert (h.rejected / "bad name.wav").exists()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    doc = _requeue_all(h)
    assert [r["requeued"] for r in doc["requeued"]] == [str(h.inbox / "bad name.wav")], doc
    assert (
        h.inbox / "bad name.wav"
    ).read_bytes() == b"a recording the registry refuses by its name"
    assert not (h.rejected / "bad name.wav.reason").exists()


def test_an_unrecorded_input_goes_back_under_its_original_name(daemon_factory: Any) -> None:
    """An unrecorded input renamed ``~1`` at its rejection goes back under the original
    name its reason gives in the folder it mirrors."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    (h.inbox / "rig1").mkdir()
    (h.rejected / "rig1").mkdir(parents=True)
    (h.rejected / "rig1" / "take~1.wav").write_bytes(b"a take")
    reason = {"code": "x", "message": "m", "original_path": str(h.inbox / "rig1" / "take.wav")}
    (h.rejected / "rig1" / "take~1.wav.reason").write_text(json.dumps(reason))
    doc = _requeue_all(h)
    assert doc["failed"] == [], doc
    assert (h.inbox / "rig1" / "take.wav").read_bytes() == b"a take"


def test_an_unrecorded_input_whose_folder_is_gone_stays_rejected(daemon_factory: Any) -> None:
    """An unrecorded input whose inbox folder no longer exists stays where it is, the
    folder is not made, and the answer says why."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    (h.rejected / "rig3").mkdir(parents=True)
    (h.rejected / "rig3" / "take.wav").write_bytes(b"a take")
    reason = {"code": "x", "message": "m", "original_path": str(h.inbox / "rig3" / "take.wav")}
    (h.rejected / "rig3" / "take.wav.reason").write_text(json.dumps(reason))
    doc = _requeue_all(h)
    assert [f["path"] for f in doc["failed"]] == [str(h.rejected / "rig3" / "take.wav")], doc
    assert "makes no folder" in doc["failed"][0]["message"]
    assert not (h.inbox / "rig3").exists()
    assert (h.rejected / "rig3" / "take.wav").exists()
