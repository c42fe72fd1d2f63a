"""A recording that grew, went quiet and is still held open for writing (settle.hold_open)
is waiting, not changing: a scan in the middle of a hold (another file's event, a
rescan, ``nbankctl queue`` asking for a fresh scan) must not call it stalled."""

from __future__ import annotations

from nbankd.watch.identity import Identity
from nbankd.watch.scan import Entry, EntryKind
from nbankd.watch.settle import SettlePolicy, State, TrackerState, hold_open, step

SETTLE = 10.0
POLICY = SettlePolicy(settle_seconds=SETTLE, stall_after=60.0)


def _rec(version: int) -> Entry:
    ident = Identity(
        dev=1,
        ino=7,
        size=100 + version,
        mtime_ns=version,
        ctime_ns=version,
        nlink=1,
        mode=0o100644,
        uid=0,
    )
    return Entry("rec.wav", EntryKind.FILE, ident)


def test_a_file_that_grew_then_is_held_open_is_not_stalled_between_holds() -> None:
    """Written for 5 s, then quiet and held open (asked again every settle period): a
    scan half way through a hold, past stall_after since it first changed, finds it
    waiting for its writer to close it, not "still changing"."""
    s = step(TrackerState(), [_rec(0)], 0.0, POLICY)
    s = step(s.state, [_rec(1)], 5.0, POLICY)  # it grew once, then never again
    now = 15.0
    for _ in range(6):  # held at every settle deadline, as the scan does
        s = step(s.state, [_rec(1)], now, POLICY)
        assert s.ready == (_rec(1),), s.verdicts
        state = hold_open(s.state, ["rec.wav"], now, SETTLE)
        now += SETTLE
    assert now - SETTLE > POLICY.stall_after  # the last hold began past stall_after
    middle = step(state, [_rec(1)], now - SETTLE / 2, POLICY)  # any scan in between
    verdict = middle.verdicts["rec.wav"]
    assert middle.stalled == () and verdict.state is not State.STALLED, verdict.reason
