"""Gaps of ``nbankctl requeue`` a previous session noted.

Findings, fixed since: over the raw protocol a requeue of a relative path was resolved
against the daemon's working directory, and one of a path holding a lone surrogate was
answered with an internal error; a rejected folder a person renamed was scanned as
inbox content after a restart (its ``NAME.reason`` files deposited as data, its
rejected inputs taken as fresh ones); an input put at the top of the rejected folder
(its sub-folder there blocked) could not be requeued without the journal.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, raw_request, wait_for


def _raw_requeue(h: DaemonHarness, path: str) -> dict[str, Any]:
    line = json.dumps({"v": 1, "cmd": "requeue", "args": {"path": path}}).encode() + b"\n"
    return raw_request(h.socket_path, line)


def _rejected_one(h: DaemonHarness) -> None:
    h.start()
    h.drop("bad name.wav", b"a recording the registry refuses by its name")
    h.wait_settled(1)
    assert (h.rejected / "bad name.wav").exists()


def test_a_relative_path_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw requeue request with a relative path is refused as a usage error, never
    resolved against the daemon's working directory (here: a rejected input there)."""
    h: DaemonHarness = daemon_factory()
    _rejected_one(h)
    # the daemon was started from this process's working directory
    relative = os.path.relpath(h.rejected / "bad name.wav", os.getcwd())
    reply = _raw_requeue(h, relative)
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "absolute" in reply["error"]["message"]
    assert (h.rejected / "bad name.wav").exists()


def test_a_path_with_a_lone_surrogate_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw requeue request whose path holds a lone surrogate (no file name can) is
    answered as a usage error, not as the daemon's own failure."""
    h: DaemonHarness = daemon_factory()
    h.start()
    reply = _raw_requeue(h, f"{h.rejected}/a\ud800.wav")
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "surrogate" in reply["error"]["message"]
    assert b"control command failed" not in h.log_path.read_bytes()


def _rejected_then_renamed(h: DaemonHarness) -> None:
    """An input rejected for its sidecar, then the rejected folder renamed by a person
    while the daemon is stopped, and the daemon started again."""
    h.start()
    h.drop("trial7.nbank.yaml", b"id: [unclosed\n")  # a bad sidecar: rejected
    h.drop("trial7", b"the recording of trial 7")
    h.wait_settled(1)
    assert (h.rejected / "trial7.reason").exists()
    h.stop()
    (h.inbox / "rejected").rename(h.inbox / "rejected-old")
    h.start()


def test_a_renamed_rejected_folder_is_not_deposited(daemon_factory: Any) -> None:
    """A rejected folder renamed by a person: its NAME.reason files and the rejected
    inputs beside them are left where they are, never deposited or rejected again."""
    h: DaemonHarness = daemon_factory()
    _rejected_then_renamed(h)
    h.drop("after.dat", b"dropped after the restart")
    wait_for(lambda: h.receipt("after"), 30, "the file dropped after the restart")
    wait_for(lambda: not h.journal_in_flight(), 30, "everything in flight to finish")
    h.stop()
    from_old = [r for r in h.receipts() if "/rejected-old/" in r["source"]]
    assert from_old == [], from_old
    old = h.inbox / "rejected-old"
    assert (old / "trial7").read_bytes() == b"the recording of trial 7"
    assert (old / "trial7.reason").exists() and (old / "trial7.nbank.yaml").exists()
    assert not (h.rejected / "trial7").exists()


def test_explain_says_why_a_renamed_rejected_input_waits(daemon_factory: Any) -> None:
    """``nbankctl explain`` of an input in a renamed rejected folder says it is a
    rejected input held for its reason beside it, and what to do."""
    h: DaemonHarness = daemon_factory()
    _rejected_then_renamed(h)
    target = h.inbox / "rejected-old" / "trial7"

    def message() -> str:
        proc = nbankctl(h, "explain", "--json", str(target), timeout=60)
        return str(json.loads(proc.stdout).get("message"))

    wait_for(lambda: "rejected input" in message(), 30, "explain to tell the hold")
    assert "requeue" in message() and "NAME.reason" in message()


def _requeue_all(h: DaemonHarness) -> dict[str, Any]:
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return dict(json.loads(proc.stdout))


def test_an_input_rejected_to_the_top_goes_back_without_the_journal(
    daemon_factory: Any,
) -> None:
    """An input rejected to the top of the rejected folder (a file in the way of its
    sub-folder there) goes back to the inbox folder its reason names once the journal
    is lost, that folder being there."""
    h: DaemonHarness = daemon_factory()
    h.rejected.mkdir(parents=True)
    (h.rejected / "rig1").write_bytes(b"a file where the sub-folder belongs")
    h.start()
    h.drop("rig1/bad name.wav", b"a take the registry refuses by its name")
    h.wait_settled(1)
    assert (h.rejected / "bad name.wav").exists()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    doc = _requeue_all(h)
    assert [r["requeued"] for r in doc["requeued"]] == [str(h.inbox / "rig1" / "bad name.wav")]
    assert (h.inbox / "rig1" / "bad name.wav").read_bytes() == (
        b"a take the registry refuses by its name"
    )
    assert not (h.rejected / "bad name.wav.reason").exists()


def test_an_input_at_the_top_whose_folder_is_gone_stays_with_a_clear_message(
    daemon_factory: Any,
) -> None:
    """An unrecorded input at the top of the rejected folder whose reason names an
    inbox folder that is not there stays rejected; the answer names that folder."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    h.rejected.mkdir(parents=True, exist_ok=True)
    (h.rejected / "take.wav").write_bytes(b"a take")
    reason = {
        "code": "x",
        "message": "m",
        "original_path": str(h.inbox / "rig3" / "take.wav"),
        "rejected_path": str(h.rejected / "take.wav"),
    }
    (h.rejected / "take.wav.reason").write_text(json.dumps(reason))
    doc = _requeue_all(h)
    [failed] = doc["failed"]
    assert failed["path"] == str(h.rejected / "take.wav"), doc
    assert str(h.inbox / "rig3") in failed["message"] and "makes no folder" in failed["message"]
    assert not (h.inbox / "rig3").exists()
    assert (h.rejected / "take.wav").exists()
