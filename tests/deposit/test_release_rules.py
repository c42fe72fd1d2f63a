"""The release's verdicts on what it finds, as pure functions: whether a claimed
input changed across a restart of the machine only as a power loss leaves one
(removed, its stored copy complete) or was rewritten (put back)."""

from __future__ import annotations

from typing import Any

import pytest

from nbankd.deposit.identity import power_loss_only

S = 1_000_000_000  # one second in ns
CLAIMED = {"dev": 1, "ino": 2, "size": 8192, "mtime_ns": 100 * S, "ctime_ns": 105 * S}


def _now(**changes: int) -> dict[str, int]:
    return {**CLAIMED, **changes}


@pytest.mark.parametrize(
    ("now", "claimed", "power_loss"),
    [
        (_now(), CLAIMED, True),  # zero-filled in place (XFS), times as claimed
        (_now(size=4096, mtime_ns=99 * S, ctime_ns=99 * S), CLAIMED, True),  # stale
        (_now(size=0), CLAIMED, True),  # truncated to nothing (ext4 delayed allocation)
        (_now(dev=7, ino=9, size=100), CLAIMED, True),  # renumbered too (a remount)
        (_now(size=6000, mtime_ns=90 * S, ctime_ns=90 * S), CLAIMED, True),  # folder: files lost
        (_now(mtime_ns=200 * S, ctime_ns=200 * S), CLAIMED, False),  # rewritten, same size
        (_now(size=4096, mtime_ns=200 * S, ctime_ns=200 * S), CLAIMED, False),  # cut, written
        (_now(size=9000), CLAIMED, False),  # larger: a power loss never adds bytes
        (_now(mtime_ns=100 * S + 1, ctime_ns=100 * S + 1), CLAIMED, False),  # 1 ns later
        (_now(ctime_ns=200 * S), CLAIMED, False),  # rewritten, its mtime set back (cp -p)
        (_now(mtime_ns=50 * S, ctime_ns=200 * S), CLAIMED, False),  # set further back
        (_now(size=100), {k: v for k, v in CLAIMED.items() if k != "ctime_ns"}, False),
    ],
    ids=[
        "same-size-same-times",
        "stale-smaller-older",
        "truncated-to-zero",
        "renumbered-smaller",
        "folder-fewer-files",
        "rewritten-same-size",
        "truncated-then-written",
        "larger",
        "written-a-nanosecond-later",
        "rewritten-mtime-restored",
        "rewritten-mtime-set-older",
        "no-ctime-recorded",
    ],
)
def test_power_loss_only(now: dict[str, int], claimed: dict[str, Any], power_loss: bool) -> None:
    """After a restart, only an input no larger with no later mtime or ctime is excused."""
    assert power_loss_only(claimed, now) is power_loss
