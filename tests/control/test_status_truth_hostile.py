"""Hostile review of whether ``nbankctl status`` (text and --json), ``nbankctl explain``
and the metrics tell the truth: every situation in which an input is not being
deposited must make status degraded (exit 1, a line naming where and what to do); and
status must not say degraded when all is well. Real daemons (tests/fixtures/daemon.py),
real nbankctl.

Tests named ``test_guard_*`` passed on the code as reviewed (what held); every other
test failed on it, its docstring naming the behaviour expected (the findings fixed on
the statustruth branch; the review's others are left to their own fixes)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for

# -- a reload by SIGHUP (systemctl reload) that failed -------------------------------------


def test_a_failed_sighup_reload_makes_status_degraded(daemon_factory: Any) -> None:
    """``systemctl reload nbankd`` (the unit's ExecReload is kill -HUP) of a file the
    daemon cannot apply keeps the running configuration: the rig just added to it is
    never watched and its recordings are never deposited. Status must say so (degraded,
    naming why the reload failed) until a reload succeeds, not report healthy."""
    h: DaemonHarness = daemon_factory()
    h.start()
    rig4, rig5 = h.root / "rig4", h.root / "rig5"
    rig4.mkdir()
    (rig4 / "take1.wav").write_bytes(b"rig4's first recording")
    rig5.write_text("a file where the lab meant a folder")  # nbankctl's check cannot see it

    def add_rigs(cfg: dict[str, Any]) -> None:
        for rig in (rig4, rig5):
            cfg["inboxes"].append({"path": str(rig), "archive": h.archive_name, "dtype": h.dtype})

    h.edit_config(add_rigs)
    assert h.proc is not None
    h.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in h.log_path.read_text(errors="replace"), 30, "the reload")
    code, doc = status_json(h)
    text = nbankctl(h, "status")
    h.stop()
    assert (rig4 / "take1.wav").exists() and h.receipts() == []  # never picked up
    assert code == 1 and any("rig5" in line for line in doc["degraded"]), (
        f"status exit {code} after a failed reload: {doc['degraded']}"
    )
    assert text.returncode == 1 and "rig5" in text.stdout, text.stdout


# -- where a waiting input's error is told -------------------------------------------------


def test_a_staged_copy_replaced_in_the_archive_is_told_against_the_archive() -> None:
    """A staged copy replaced in the archive's group-writable staging/ (code
    ``staged-changed``, which waits longer each time, as a bad read-back does) is the
    archive's problem: status names the archive (not the inbox, whose files are fine)
    and nbankd_archive_errors_total counts it, as for ``verify-failed``."""
    from dataclasses import replace

    from nbankd.daemon.status import waiting_problems
    from nbankd.daemon.tally import Tally
    from nbankd.deposit.item import Item
    from nbankd.deposit.lifecycle import State as ItemState

    base = Item(
        id=1, token="tok1", inbox="/srv/inbox/rig3", relpath=b"take.wav", kind="file",
        state=ItemState.CLAIMED, archive="birdsong", archive_path="/srv/birdsong",
        placement="copy", verify=True, created=0.0, updated=0.0,
    )  # fmt: skip
    lines, archive_errors = {}, {}
    for code in ("verify-failed", "staged-changed"):
        item = replace(
            base,
            attempts=2,
            error_code=code,
            error_message="/srv/birdsong/staging/x is not the staged copy nbankd wrote",
        )
        [lines[code]] = waiting_problems([item])
        tally = Tally()
        tally.record(item, attempts_before=1)
        archive_errors[code] = tally.archive_errors["birdsong"]
    assert lines["staged-changed"].startswith("archive birdsong"), lines
    assert archive_errors["staged-changed"] == archive_errors["verify-failed"] == 1, archive_errors


# -- a rejected input whose .reason file was removed ------------------------------------------


def test_a_rejected_input_without_its_reason_file_keeps_status_degraded(
    daemon_factory: Any,
) -> None:
    """README: status is degraded by "any file in a rejected folder". A rejected
    recording whose NAME.reason a lab member deleted (clutter, they thought) is still
    the only copy, never deposited: status must stay degraded naming it (it says
    healthy, and the rejection's alert is resolved), as explain still calls it rejected
    (from the journal's copy of its reason)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("bad name.wav", b"a recording whose name the registry refuses")
    h.wait_settled(1)
    assert status_json(h)[0] == 1
    [reason] = list(h.rejected.glob("*.reason"))
    reason.unlink()
    code, doc = status_json(h)
    explained = nbankctl(h, "explain", str(h.rejected / "bad name.wav"), "--json")
    h.stop()
    assert (h.rejected / "bad name.wav").exists()
    assert json.loads(explained.stdout)["state"] == "rejected"
    assert code == 1 and any("rejected" in line for line in doc["degraded"]), (
        f"a recording left in {h.rejected}: status exit {code}, degraded {doc['degraded']}"
    )


def test_a_rejected_folder_the_daemon_cannot_read_is_not_counted_empty(
    daemon_factory: Any, unpriv_user: Any
) -> None:
    """A rejected folder holding a rejected recording, whose mode a lab member tightened
    (chmod 000: the daemon's user can no longer list it), is not an empty rejected
    folder: status must stay degraded (naming the folder it cannot read), not count 0
    rejected inputs, report healthy and resolve the rejection's alert."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    h.drop("bad name.wav", b"a recording whose name the registry refuses")
    os.chown(h.inbox / "bad name.wav", unpriv_user.uid, unpriv_user.gid)
    h.wait_settled(1)
    assert status_json(h)[0] == 1
    mode = h.rejected.stat().st_mode
    h.rejected.chmod(0)
    try:
        code, doc = status_json(h)
    finally:
        h.rejected.chmod(mode)
        h.stop()
    waiting = [e["in_rejected_folder"] for e in doc["inboxes"]]
    assert code == 1 and doc["degraded"], (
        f"rejected folder unreadable: status exit {code}, rejected inputs {waiting}, "
        f"degraded {doc['degraded']}"
    )


# -- guard tests: these held up (they pass) -----------------------------------------------


def test_guard_a_healthy_or_paused_daemon_is_not_degraded(daemon_factory: Any) -> None:
    """GUARD (passes): after a deposit, and with the inbox paused, status (text and
    --json) exits 0 and says healthy; a dropped file waits as paused in explain."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("take1.wav", b"a recording")
    h.wait_settled(1)
    results = []
    for paused in (False, True):
        if paused:
            assert nbankctl(h, "pause").returncode == 0
            h.drop("take2.wav", b"another recording")
            wait_for(
                lambda: (
                    json.loads(nbankctl(h, "explain", str(h.inbox / "take2.wav"), "--json").stdout)[
                        "state"
                    ]
                    == "paused"
                ),
                30,
                "the new file to be ready and held by the pause",
            )
        text, doc = nbankctl(h, "status"), status_json(h)
        results.append((text.returncode, "healthy" in text.stdout, doc[0], doc[1]["healthy"]))
    h.stop()
    assert results == [(0, True, 0, True)] * 2, results
