"""A former inbox's work folder inside a widened inbox: what it holds is told."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, wait_for
from nbankd.names import WORK_DIR_NAME


def _status(h: DaemonHarness) -> dict[str, Any]:
    proc = nbankctl(h, "status", "--json")
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def test_a_stray_file_in_a_former_work_folder_makes_status_degraded(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An inbox widened to its parent keeps the old inbox's work folder out of scans;
    a file there that no deposit owns (claimed by a daemon whose state_dir was lost)
    makes status degraded, naming that folder, as in the inbox's own work folder."""
    h = daemon_factory()
    rig = h.inbox / "rigA"
    rig.mkdir(parents=True)
    h.inbox_options = {"path": str(rig)}
    h.start()
    h.drop("rigA/first.dat", b"deposited before the change")
    wait_for(lambda: not h.journal_in_flight() and h.receipts(), 30, "the first deposit")
    h.stop()
    stray = rig / WORK_DIR_NAME / ("ab" * 16)  # a claimed input no journal of ours knows
    stray.write_bytes(b"a recording claimed by a lost state_dir")
    h.edit_config(lambda cfg: cfg["inboxes"][0].update(path=str(h.inbox)))
    h.start()
    try:
        wait_for(lambda: _status(h).get("degraded"), 30, "status to answer degraded")
        degraded = _status(h)["degraded"]
    finally:
        h.stop()
    assert any(str(rig / WORK_DIR_NAME) in line and "former inbox" in line for line in degraded), (
        degraded
    )
    assert stray.read_bytes() == b"a recording claimed by a lost state_dir"
