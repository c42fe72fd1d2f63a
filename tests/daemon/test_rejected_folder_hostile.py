"""Hostile review of an inbox's rejected folder as space any inbox writer can write into.

The daemon moves refused inputs there with a ``NAME.reason`` beside them; ``nbankctl
status``, the alert thread, ``nbankctl requeue`` and the scans all read that folder.
Every test runs the real ``nbankd`` and ``nbankctl``; entries are planted the way a
local user who can write the inbox would.

Findings, all fixed: a FIFO named ``X.reason`` (no ``X`` beside it) hung status; a
``.reason`` holding deeply nested JSON (no input beside it) made status fail, every
alert check fail and ``requeue --all-rejected`` fail (RecursionError out of
``explain.read_reason``; reasons are now read as small regular files, no link followed,
and parsed within bounds); status took time quadratic in the number of rejected inputs;
a rejected folder swapped for a symbolic link was walked through the link by status
(now walked from descriptors, the link told, never followed); ``requeue
--all-rejected`` moved a planted file with no journal record wherever its forged
``.reason`` said inside the inbox, making folders (an input the journal does not know
now goes back only into the existing folder it mirrors). The rest are guards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from fixtures.webhooks import Hook


def _status(h: DaemonHarness, timeout: float) -> tuple[int, dict[str, Any] | None, float]:
    """``nbankctl status --json`` with a deadline: (exit status, document or None,
    seconds it took); a command still running at ``timeout`` is killed (status 124)."""
    started = time.monotonic()
    try:
        proc = nbankctl(h, "status", "--json", "--timeout", str(timeout), timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        return 124, None, time.monotonic() - started
    took = time.monotonic() - started
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = None
    return proc.returncode, doc, took


def _rejected_one(h: DaemonHarness, name: str = "bad name.wav") -> Path:
    """Drops an input the daemon refuses (a space in its name); returns its rejected path."""
    h.drop(name, b"a recording the registry refuses by its name")
    h.wait_settled(1)
    path = h.rejected / name
    assert path.exists() and (h.rejected / (name + ".reason")).exists()
    return path


def _webhook_alerts(hook: Hook) -> dict[str, Any]:
    return {"webhook": {"url": hook.url}, "check_every": "0.3s", "group_wait": "0s"}


# --- .reason files that are not what the daemon writes ---------------------------------


def test_a_fifo_named_like_a_reason_does_not_hang_status(daemon_factory: Any) -> None:
    """A FIFO an inbox writer made in the rejected folder under a ``.reason`` name (no
    input beside it) does not stop ``nbankctl status`` from answering."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _rejected_one(h)
    os.mkfifo(h.rejected / "planted.wav.reason")
    rc, doc, took = _status(h, timeout=15)
    assert doc is not None, f"no status within {took:.0f}s (exit {rc})"
    assert rc == 1 and doc["inboxes"][0]["in_rejected_folder"] == 1, doc


def test_a_deeply_nested_reason_does_not_break_status(daemon_factory: Any) -> None:
    """A 100 KB ``.reason`` of nested JSON arrays (no input beside it) leaves ``nbankctl
    status`` answering, still counting the real rejected input."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _rejected_one(h)
    (h.rejected / "planted.wav.reason").write_bytes(b"[" * 100_000)
    rc, doc, took = _status(h, timeout=30)
    assert doc is not None and "inboxes" in doc, f"exit {rc} after {took:.1f}s: {doc}"
    assert rc == 1 and doc["inboxes"][0]["in_rejected_folder"] == 1, doc


def test_a_deeply_nested_reason_does_not_silence_alerts(daemon_factory: Any, hook: Hook) -> None:
    """With a ``.reason`` of nested JSON planted in the rejected folder, a real
    rejection that comes after it is still told by the alerts."""
    h: DaemonHarness = daemon_factory(extra_config={"alerts": _webhook_alerts(hook)})
    h.start()
    h.rejected.mkdir(exist_ok=True)
    (h.rejected / "planted.wav.reason").write_bytes(b"[" * 100_000)
    h.drop("bad name.wav", b"a recording the registry refuses by its name")
    rejected = h.rejected / "bad name.wav"
    wait_for(lambda: Path(f"{rejected}.reason").exists(), 60, "the input rejected")

    def told_or_failed() -> bool:
        told = any(str(rejected) in json.dumps(a) for a in hook.alerts())
        return told or h.log_path.read_text(errors="replace").count("alert check failed") >= 3

    wait_for(told_or_failed, 60, "the rejection told, or three failed alert checks")
    log = h.log_path.read_text(errors="replace")
    assert any(str(rejected) in json.dumps(a) for a in hook.alerts()), (
        f"{log.count('alert check failed')} alert checks failed; RecursionError in the log: "
        f"{'RecursionError' in log}"
    )


def test_a_deeply_nested_reason_does_not_stop_requeue_all_rejected(
    daemon_factory: Any,
) -> None:
    """``nbankctl requeue --all-rejected`` still moves the real rejected input back when
    a ``.reason`` of nested JSON (no input beside it) was planted beside it."""
    h: DaemonHarness = daemon_factory()
    h.start()
    rejected = _rejected_one(h)
    (h.rejected / "planted.wav.reason").write_bytes(b"[" * 100_000)
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    assert not rejected.exists(), (proc.returncode, proc.stdout, proc.stderr)


# --- many entries ----------------------------------------------------------------------


def test_status_answers_quickly_with_ten_thousand_rejected_inputs(daemon_factory: Any) -> None:
    """10 000 rejected inputs (each with its ``.reason``: a rig with a wrong name
    pattern for a week) cost ``nbankctl status`` no more than a few seconds."""
    h: DaemonHarness = daemon_factory()
    h.start()
    _rejected_one(h)
    reason = (h.rejected / "bad name.wav.reason").read_bytes()
    for i in range(10_000):
        (h.rejected / f"r{i:05d}.wav").write_bytes(b"")
        (h.rejected / f"r{i:05d}.wav.reason").write_bytes(reason)
    rc, doc, took = _status(h, timeout=120)
    assert doc is not None and doc["inboxes"][0]["in_rejected_folder"] == 10_001, (rc, doc)
    assert took < 10, f"nbankctl status took {took:.1f}s"


# --- the rejected folder swapped for a link --------------------------------------------


def test_status_does_not_list_a_folder_a_linked_rejected_folder_points_to(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A rejected folder an inbox writer swapped for a link to a folder outside the inbox
    makes status tell the swap, never count or name what that other folder holds."""
    outside = tmp_path / "private"
    (outside / "deep").mkdir(parents=True)
    (outside / "grant-draft.docx").write_bytes(b"not the inbox writer's")
    (outside / "deep" / "salaries.xlsx").write_bytes(b"not the inbox writer's")
    h: DaemonHarness = daemon_factory()
    h.start()
    os.rename(h.rejected, h.inbox / ".gone")
    h.rejected.symlink_to(outside)
    rc, doc, _took = _status(h, timeout=30)
    assert doc is not None, rc
    shown = json.dumps(doc)
    assert "grant-draft" not in shown and "salaries" not in shown, doc["degraded"]
    assert doc["inboxes"][0]["in_rejected_folder"] == 0, doc["inboxes"][0]
    assert any("symbolic link" in line for line in doc["degraded"]), doc["degraded"]


def test_a_linked_rejected_folder_receives_no_rejection(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """An input refused while the rejected folder is a link to a folder outside the
    inbox is never moved through the link: the outside folder stays as it was."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    h: DaemonHarness = daemon_factory()
    h.start()
    os.rename(h.rejected, h.inbox / ".gone")
    h.rejected.symlink_to(outside)
    h.drop("bad name.wav", b"a recording the registry refuses by its name")
    wait_for(
        lambda: any("inbox-tampered" in line or "rejected folder" in line for line in _degraded(h)),
        60,
        "status to tell the swapped rejected folder",
    )
    assert list(outside.iterdir()) == []
    assert (h.inbox / "bad name.wav").exists() or any(
        p.name == "bad name.wav" for p in (h.inbox / ".nbank").iterdir()
    )


def _degraded(h: DaemonHarness) -> list[str]:
    return list(status_json(h)[1]["degraded"])


# --- requeue -----------------------------------------------------------------------------


def test_requeue_all_rejected_never_overwrites_a_newer_input_of_the_same_name(
    daemon_factory: Any,
) -> None:
    """``requeue --all-rejected`` leaves both files whole when a writer has since put a
    new file at the rejected input's original path: nothing is replaced, the conflict
    is reported."""
    h: DaemonHarness = daemon_factory()
    h.start()
    rejected = _rejected_one(h)
    old = rejected.read_bytes()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    newer = h.drop("bad name.wav", b"the rig's newer recording, same name")
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    doc = json.loads(proc.stdout)
    assert [f["path"] for f in doc["failed"]] == [str(rejected)], doc
    assert rejected.read_bytes() == old
    assert newer.read_bytes() == b"the rig's newer recording, same name"
    assert (h.rejected / "bad name.wav.reason").exists()


@pytest.mark.parametrize("through_link", [False, True], ids=["outside-path", "linked-folder"])
def test_a_forged_original_path_moves_nothing_out_of_the_inbox(
    daemon_factory: Any, tmp_path: Path, through_link: bool
) -> None:
    """A file and ``.reason`` an inbox writer planted in the rejected folder, naming an
    original path outside the inbox (directly, or through a link in the inbox), are
    never moved there by ``requeue --all-rejected``."""
    outside = tmp_path / "cron.d"
    outside.mkdir()
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0  # the link stays unclaimed
    h.rejected.mkdir(exist_ok=True)
    target = outside / "job"
    if through_link:
        (h.inbox / "lnk").symlink_to(outside)
        target_named = h.inbox / "lnk" / "job"
    else:
        target_named = target
    (h.rejected / "job").write_bytes(b"* * * * * root sh -c planted\n")
    reason = {"code": "x", "message": "m", "original_path": str(target_named)}
    (h.rejected / "job.reason").write_text(json.dumps(reason))
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    assert list(outside.iterdir()) == []
    assert (h.rejected / "job").exists()


def test_requeue_all_rejected_does_not_move_a_planted_file_where_its_reason_says(
    daemon_factory: Any,
) -> None:
    """A file and ``.reason`` an inbox writer planted in the rejected folder (the daemon
    never rejected it: no journal record) are not moved by ``requeue --all-rejected``
    into another rig's sub-folder that the forged reason names (made by the daemon)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    h.rejected.mkdir(exist_ok=True)
    (h.rejected / "take.wav").write_bytes(b"a recording passed off as rig2's")
    forged = {"code": "x", "message": "m", "original_path": str(h.inbox / "rig2" / "take.wav")}
    (h.rejected / "take.wav.reason").write_text(json.dumps(forged))
    proc = nbankctl(h, "requeue", "--all-rejected", str(h.inbox), "--json", timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    assert not (h.inbox / "rig2").exists(), proc.stdout
