"""When a change in an inbox brings its next scan: soon, but never back to back with
a long scan (an inbox of many files rescanned for every trickled write)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbankd.config.model import InboxConfig
from nbankd.daemon.intents import CHANGE_SCAN_GAP
from nbankd.daemon.scanning import InboxScanning
from nbankd.daemon.view import InboxState
from nbankd.daemon.wakeup import Wakeup


class Scanning(InboxScanning):
    """The scanning half with only the state a change event touches."""

    def __init__(self, state: InboxState) -> None:
        self.inboxes = {"in": state}
        self._wake = Wakeup()


@pytest.mark.parametrize(
    ("took", "next_scan"),
    [
        (0.001, 100.0 + 0.001 + CHANGE_SCAN_GAP),  # a small inbox: the usual gap
        (0.5, 100.0 + 0.5 + 1.0),  # a long scan: twice its length after its end
    ],
)
def test_a_change_schedules_the_next_scan_after_the_last_one_ended(
    took: float, next_scan: float
) -> None:
    """The next scan comes the change gap, or twice a long scan's length, after the
    last scan ended, never at the moment it ended."""
    state = InboxState(config=InboxConfig(path=Path("/in"), archive="a", dtype="d"))
    state.last_scan_tick, state.scan_took, state.next_scan = 100.0, took, 1e9
    Scanning(state)._on_change("in", "rec.wav")
    assert state.next_scan == pytest.approx(next_scan)
