"""End to end: the real daemon wakes on inotify, proves its watch alive, and falls
back to polling when the watch goes deaf.

With ``rescan_every: 1h`` a file dropped after start-up can only be found by a
wake-up (a live watch) or by the fallback poll (a deaf one), so each test shows
which of the two did it by the status it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, status_json, wait_for, work_entries
from nbankd.daemon.scanning import REMOVAL_SCAN_GAP
from nbankd.names import CANARY_NAME
from nbankd.watch.observer import DEAF_SEAM

HOUR = {"rescan_every": "1h"}


def _log_events(h: DaemonHarness, event: str) -> list[dict[str, Any]]:
    found = []
    for line in h.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def _inbox_status(h: DaemonHarness) -> tuple[int, dict[str, Any], list[str]]:
    code, doc = status_json(h)
    [inbox] = doc["inboxes"]
    return code, inbox, doc["degraded"]


def test_file_dropped_after_start_is_woken_for(daemon_factory: Any) -> None:
    """With rescans an hour apart, a dropped file is deposited by its wake-up and the
    watch reports inotify, healthy, its canary answered."""
    h: DaemonHarness = daemon_factory(inbox_options=HOUR)
    h.start()
    data = os.urandom(4096)
    src = h.drop("woken01.wav", data)
    h.wait_settled(1)
    [receipt] = h.receipts()
    assert receipt["id"] == "woken01" and not src.exists()
    code, inbox, degraded = _inbox_status(h)
    assert (code, degraded) == (0, [])
    watch = (inbox["watch"], inbox["watch_mode"], inbox["watch_problem"])
    assert watch == ("auto", "inotify", None)
    assert (h.inbox / CANARY_NAME).is_file()
    assert _log_events(h, "inbox watch failed its liveness check; polling instead") == []
    h.stop()


def test_deaf_watch_still_deposits_through_the_fallback(daemon_factory: Any) -> None:
    """With every inotify event dropped (the seam) and rescans an hour apart, the
    unanswered canary turns status degraded (exit 1, logged once) and the fallback
    poll deposits the file anyway."""
    options = {**HOUR, "watch_check_every": "1s", "fallback_poll_every": "1s"}
    h: DaemonHarness = daemon_factory(inbox_options=options)
    h.start(env={DEAF_SEAM: "1"})
    wait_for(lambda: _inbox_status(h)[0] == 1, what="status to turn degraded")
    data = os.urandom(4096)
    src = h.drop("polled01.wav", data)
    h.wait_settled(1)
    [receipt] = h.receipts()
    assert receipt["id"] == "polled01" and not src.exists()
    code, inbox, degraded = _inbox_status(h)
    assert code == 1
    assert inbox["watch_mode"] == "poll"
    assert "no inotify event within 1s of the liveness check" in inbox["watch_problem"]
    [line] = [d for d in degraded if d.startswith(f"watch of {h.inbox}")]
    assert "scanned every 1s instead" in line
    # logged through the log writer's thread: it may reach the file after status turned
    failed = "inbox watch failed its liveness check; polling instead"
    wait_for(lambda: _log_events(h, failed), 60, "the failed liveness check logged")
    assert len(_log_events(h, failed)) == 1
    h.stop()


def test_version_names_the_libraries_in_use() -> None:
    """``nbankd --version`` names watchdog, structlog, requests and PyYAML with their
    installed versions, on one line."""
    from importlib import metadata

    nbankd = str(Path(sys.executable).with_name("nbankd"))
    out = subprocess.run([nbankd, "--version"], capture_output=True, text=True, check=True)
    [line] = out.stdout.splitlines()
    for name in ("watchdog", "structlog", "requests", "PyYAML"):
        assert f"{name} {metadata.version(name)}" in line


def test_start_up_log_names_the_libraries_in_use(daemon_factory: Any) -> None:
    """The ``started`` log line carries the versions of the libraries in use."""
    from importlib import metadata

    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    [started] = _log_events(h, "started")
    assert started["dependencies"]["watchdog"] == metadata.version("watchdog")
    assert started["dependencies"]["PyYAML"] == metadata.version("PyYAML")


def test_own_claim_does_not_rescan_the_inbox_at_once(daemon_factory: Any) -> None:
    """The claim moving an input into .nbank is a name leaving the inbox: the next scan
    comes REMOVAL_SCAN_GAP after the last one, not CHANGE_SCAN_GAP (a burst's claims
    would otherwise rescan the whole inbox five times a second)."""
    h: DaemonHarness = daemon_factory(inbox_options=HOUR)
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(go)})
    h.drop("held.dat", b"held right after its claim")
    work = h.inbox / ".nbank"
    wait_for(lambda: any(work_entries(work)), what="the input to be claimed")
    _code, before, _ = _inbox_status(h)
    wait_for(
        lambda: _inbox_status(h)[1]["scans"] > before["scans"],
        timeout=REMOVAL_SCAN_GAP + 30,
        what="the scan after the claim",
    )
    _code, after, _ = _inbox_status(h)
    assert after["last_scan"] - before["last_scan"] >= REMOVAL_SCAN_GAP - 0.05
    go.touch()
    h.wait_settled(1)
