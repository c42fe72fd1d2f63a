"""The release's two verdicts on what it finds, as pure functions: whether a claimed
input changed across a restart of the machine only as a power loss leaves one
(removed, its stored copy complete) or was rewritten (put back), and whether the ready
marker found is the one the claim found (removed) or one set since for the next
recording of the name (left)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from nbankd.deposit.damaged import no_larger_no_newer
from nbankd.deposit.identity import (
    MARKER_FIELDS,
    marker_is_claimed,
    marker_seen,
    power_loss_only,
    renewed,
    same_marker,
    with_marker,
    with_marker_status,
)

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


MARKER = {"dev": 1, "ino": 50, "size": 0, "mtime_ns": 100 * S, "ctime_ns": 100 * S}


def _claim(marker: dict[str, int] | str | None) -> str:
    """A claim's identity with ``marker`` recorded ("none": an older release's, no key)."""
    ident = {**CLAIMED, "boot": "b"}
    if marker != "none":
        ident["marker"] = marker
    return json.dumps(ident)


@pytest.mark.parametrize(
    ("recorded", "found", "claimed"),
    [
        (_claim(MARKER), MARKER, True),  # the claimed recording's own: removed
        (_claim(MARKER), {**MARKER, "mtime_ns": 200 * S, "ctime_ns": 200 * S}, False),  # touch
        (_claim(MARKER), {**MARKER, "ctime_ns": 200 * S}, True),  # chmod, ACL, xattr
        (_claim(MARKER), {**MARKER, "ino": 51, "dev": 9}, True),  # a remount renumbered it
        (_claim(MARKER), {**MARKER, "ino": 51, "mtime_ns": 200 * S}, False),  # made anew
        (_claim(MARKER), {**MARKER, "size": 1}, False),  # written
        (_claim(None), MARKER, False),  # none at the claim: set since
        (_claim("none"), MARKER, True),  # an older release's claim: removed, as it did
        (None, MARKER, True),  # an older journal's item, no identity at all
    ],
    ids=[
        "unchanged",
        "touched",
        "status-changed",
        "renumbered",
        "made-anew",
        "written",
        "none-at-claim",
        "older-release",
        "no-identity",
    ],
)
def test_marker_is_claimed(recorded: str | None, found: dict[str, int], claimed: bool) -> None:
    """Only the marker the claim found, unchanged, is the claimed recording's."""
    assert marker_is_claimed(recorded, found) is claimed


def test_a_claims_marker_is_recorded_from_its_status_and_kept_when_renewed(tmp_path: Any) -> None:
    """The marker recorded at claim survives an identity taken anew later."""
    marker = tmp_path / "a.wav.done"
    marker.write_bytes(b"")
    st = os.lstat(marker)
    claimed = with_marker(_claim("none"), st)
    found = {f: getattr(st, "st_" + f) for f in MARKER_FIELDS}
    again = renewed(claimed, {**CLAIMED, "size": 1, "boot": "c"})
    assert marker_is_claimed(again, found) and json.loads(again)["size"] == 1


@pytest.mark.parametrize(
    ("noted", "now", "same"),
    [
        (
            {"size": 0, "mtime_ns": S, "ctime_ns": S},
            {"size": 0, "mtime_ns": S, "ctime_ns": 9 * S},
            True,
        ),
        ({"size": 0, "mtime_ns": S}, {"size": 0, "mtime_ns": 2 * S}, False),
        ({"size": 0, "mtime_ns": S}, {"size": 3, "mtime_ns": S}, False),
        (None, None, True),
        (None, {"size": 0, "mtime_ns": S}, False),
        ({"size": 0, "mtime_ns": S}, None, False),
    ],
    ids=["chmodded", "touched", "written", "none-both", "set-since", "removed-since"],
)
def test_same_marker(noted: dict[str, int] | None, now: dict[str, int] | None, same: bool) -> None:
    """A marker noted before a claim is the same one unless set, written or removed since."""
    assert same_marker(noted, now) is same


def test_a_marker_noted_before_the_rename_is_the_claimed_one(tmp_path: Any) -> None:
    """The status an intent notes of a marker, recorded at claim, claims that marker."""
    marker = tmp_path / "a.wav.done"
    marker.write_bytes(b"")
    noted = marker_seen(marker)
    claimed = with_marker_status(_claim("none"), noted)
    found = {f: getattr(os.lstat(marker), "st_" + f) for f in MARKER_FIELDS}
    assert marker_is_claimed(claimed, found) and marker_seen(tmp_path / "none.done") is None


@pytest.mark.parametrize(
    ("now", "damaged"),
    [
        (_now(size=4096, ctime_ns=200 * S), True),  # cut short, its status changed since
        (_now(mtime_ns=99 * S, ctime_ns=200 * S), True),  # stale, same size
        (_now(size=4096, mtime_ns=200 * S), False),  # written again since: a new recording
        (_now(size=9000, ctime_ns=200 * S), False),  # larger
    ],
    ids=["cut-chmodded", "stale-chmodded", "rewritten", "larger"],
)
def test_no_larger_no_newer(now: dict[str, int], damaged: bool) -> None:
    """A copy put back as damaged is told apart from one written since by size and mtime."""
    assert no_larger_no_newer(CLAIMED, now) is damaged
