"""Hostile review of every path of nbankd that removes, unlinks or renames over
something (the release of a deposited input and its marker, put-back and rejection,
staging and leftover clean-ups, withdrawal, tape import and transfer temporaries):
can it ever remove a user's bytes that have no other durable, verified, registered
copy?

Findings (each test was marked xfail, and failed, on the code it was written against;
both fixed since):

- the release after a restart of the machine removed a claimed input whose bytes a
  writer changed after its copy was made, when its size did not grow
  (``ReleaseSteps._as_claimed``: ``restarted_since`` and ``size <= claimed``): a
  rewrite in place (a preallocated recording filled later) was taken for a power
  loss's damage, and the only copy of the new bytes was unlinked. Now only an input
  no larger and with neither its mtime nor its ctime later than claimed is excused
  (``identity.power_loss_only``); a power loss's damage still is (tested here with
  the journal's claim made larger and later than the input on disk, as a disk that
  lost the claim's last writes leaves it);
- the release removed ``NAME.done`` whatever it was by then: a rig that records the
  next ``NAME`` while the first one is in flight and marks it done (the marker still
  there) lost its marker, and the new recording waited for a marker forever. Now
  the claim records the marker's identity and the release removes only that one; the
  claimed recording's own marker still goes (also when the release runs after a
  crash), so the next recording waits for its own.

Guards (pass): a claimed input rewritten before its release, without a restart, goes
back to its inbox whole; an input unchanged across a restart is deposited and leaves
its work folder once; an input named like a reason's temporary file
(``.x.reason.tmp``, with dot-files and ``*.tmp`` no longer ignored) is rejected under
another name, never removed by the next rejection's clean-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for, work_entries
from fixtures.reboot import no_work_left, rebooted

Factory = Callable[..., DaemonHarness]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _crashed_after_record(h: DaemonHarness, name: str, data: bytes) -> Path:
    """Deposits ``name`` holding ``data`` and kills the daemon (SIGKILL) once its
    receipt is durable and its input still sits in the work folder; returns that
    claimed input."""
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    h.drop(name, data)
    h.wait_exit()
    claimed = work_entries(h.inbox / ".nbank")
    assert len(claimed) == 1, claimed
    return claimed[0]


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """What a writer that kept the file open does: other bytes over the same ones."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _everywhere(h: DaemonHarness) -> set[str]:
    """The SHA-1 of every regular file in the inbox (work folder included) and archive."""
    out = set()
    for top in (h.inbox, h.archive):
        for p in top.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out.add(_sha1(p.read_bytes()))
    return out


def test_a_claimed_input_rewritten_before_a_reboot_is_never_removed(
    daemon_factory: Factory,
) -> None:
    """Bytes a writer put into a claimed input after its copy was made survive a reboot."""
    h = daemon_factory()
    first = b"A" * 4096 + os.urandom(4096)
    claimed = _crashed_after_record(h, "rec.bin", first)
    later = b"B" * 4096 + os.urandom(4096)  # the rest of the recording, same size
    _rewrite_in_place(claimed, later)
    h.wrap_argv = rebooted(h)
    h.start()
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    h.stop()
    assert _sha1(first) in _everywhere(h)  # the deposited version stays stored
    assert _sha1(later) in _everywhere(h), "the rewritten input was removed"


def test_guard_a_claimed_input_rewritten_without_a_reboot_goes_back_whole(
    daemon_factory: Factory,
) -> None:
    """Without a restart, a claimed input rewritten after its copy goes back whole."""
    h = daemon_factory()
    first = b"A" * 4096 + os.urandom(4096)
    claimed = _crashed_after_record(h, "rec.bin", first)
    later = b"B" * 4096 + os.urandom(4096)
    _rewrite_in_place(claimed, later)
    h.start()
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    h.stop()
    assert _sha1(first) in _everywhere(h)
    assert (h.inbox / "rec.bin").read_bytes() == later


def test_guard_an_unchanged_input_across_a_reboot_is_deposited_and_released_once(
    daemon_factory: Factory,
) -> None:
    """An input left unchanged in the work folder across a reboot is released once."""
    h = daemon_factory()
    data = os.urandom(8192)
    _crashed_after_record(h, "rec.bin", data)
    h.wrap_argv = rebooted(h)
    h.start()
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    h.stop()
    stored = h.archive_files()
    assert [_sha1(p.read_bytes()) for p in stored.values()] == [_sha1(data)]
    assert len(h.receipts()) == 1
    assert not (h.inbox / "rec.bin").exists()


def _claim_saw_more(h: DaemonHarness) -> None:
    """Makes the journaled claim of the (one) item larger and later than its input on
    disk now, as a power loss leaves a disk that lost the last writes the claim saw
    (the input's unflushed bytes and their times): its size and its modification and
    change times one step past what the file has (the daemon stopped)."""
    with contextlib.closing(sqlite3.connect(h.state_dir / "journal.sqlite3")) as db, db:
        [(token, identity)] = db.execute("SELECT token, identity FROM items").fetchall()
        claimed = json.loads(identity)
        on_disk = os.lstat(h.inbox / ".nbank" / token)
        claimed.update(
            size=max(claimed["size"], on_disk.st_size + 4096),
            mtime_ns=on_disk.st_mtime_ns + 10**9,
            ctime_ns=on_disk.st_ctime_ns + 10**9,
        )
        db.execute("UPDATE items SET identity = ? WHERE token = ?", (json.dumps(claimed), token))


@pytest.mark.parametrize("damage", ["truncated", "zero-filled"])
def test_a_claimed_input_a_power_loss_damaged_is_released_after_the_reboot(
    daemon_factory: Factory, damage: str
) -> None:
    """An input a power loss left shorter or zero-filled, its times no later, is released."""
    h = daemon_factory()
    data = os.urandom(8192)
    claimed = _crashed_after_record(h, "rec.bin", data)
    with open(claimed, "r+b") as f:  # what the disk holds after the power loss
        if damage == "truncated":
            f.truncate(4096)
        else:
            f.write(bytes(len(data)))
    _claim_saw_more(h)
    h.wrap_argv = rebooted(h)
    h.start()
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    h.stop()
    assert [p.read_bytes() for p in h.archive_files().values()] == [data]
    assert len(h.receipts()) == 1
    assert not (h.inbox / "rec.bin").exists()  # the damaged input was never put back


def test_a_marker_set_again_for_the_next_recording_of_a_name_is_not_removed(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A rig's marker for its next recording of a name outlives the first one's release."""
    # identifiers chosen automatically: named after the file, the second recording
    # (other bytes, the same name) would end rejected as name-taken, not deposited
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(go)})
    first, second = os.urandom(5000), os.urandom(6000)
    h.drop("session.bin", first)
    (h.inbox / "session.bin.done").write_bytes(b"")
    wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the first recording's claim")
    # the rig records the next session under the same name and marks it done: the
    # marker is still there, so marking it is opening it again (as `touch` does)
    h.drop("session.bin", second)
    os.utime(h.inbox / "session.bin.done")
    go.touch()
    wait_for(lambda: len(h.receipts()) >= 1, 30, "the first recording's receipt")
    try:
        wait_for(lambda: len(h.receipts()) >= 2, 20, "the second recording's receipt")
    finally:
        h.stop()
    assert {r["sha1"] for r in h.receipts()} == {_sha1(first), _sha1(second)}


def test_a_marker_set_again_for_the_next_recording_stays_when_the_first_is_rejected(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A rig's marker for its next recording of a name is not taken along to the
    rejected folder with the first one (an empty file, rejected)."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    h.start(env={"NBANKD_PAUSE_AT": "after-reject-name", "NBANKD_PAUSE_UNTIL": str(go)})
    second = os.urandom(6000)
    h.drop("session.bin", b"")  # empty: rejected
    (h.inbox / "session.bin.done").write_bytes(b"")
    wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the first recording's rejection to begin")
    h.drop("session.bin", second)
    os.utime(h.inbox / "session.bin.done")
    go.touch()
    try:
        wait_for(lambda: (h.rejected / "session.bin").exists(), 30, "the first's rejection")
        wait_for(lambda: len(h.receipts()) >= 1, 30, "the second recording's receipt")
    finally:
        h.stop()
    assert [r["sha1"] for r in h.receipts()] == [_sha1(second)]
    assert not (h.rejected / "session.bin.done").exists()


def test_the_claimed_recordings_own_marker_is_removed_and_the_next_waits_for_its_own(
    daemon_factory: Factory,
) -> None:
    """A marker unchanged since its claim goes at the release, even one run after a crash."""
    h = daemon_factory(inbox_options={"ready": "marker"})
    first = os.urandom(5000)
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    h.drop("session.bin", first)
    (h.inbox / "session.bin.done").write_bytes(b"")
    h.wait_exit()
    h.start()  # the release runs after the restart, from the journaled claim
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    assert not (h.inbox / "session.bin.done").exists()
    nxt = h.drop("session.bin", os.urandom(6000))  # the next recording, not marked yet

    def verdict() -> str:
        out = nbankctl(h, "--json", "explain", str(nxt))
        return json.loads(out.stdout)["state"] if out.returncode == 0 else ""

    wait_for(lambda: verdict() == "waiting-for-marker", 30, "the next one to wait for its marker")
    h.stop()
    assert [r["sha1"] for r in h.receipts()] == [_sha1(first)]


def test_guard_an_input_named_like_a_reason_temporary_survives_the_next_rejection(
    daemon_factory: Factory,
) -> None:
    """An input called ``.x.reason.tmp`` outlives the rejection of ``x`` beside it."""
    h = daemon_factory(inbox_options={"ignore": ["*.part"]})  # dot-files and *.tmp seen
    h.start()
    precious = os.urandom(3000)
    h.drop(".x.reason.tmp", precious)
    h.wait_settled(1)
    h.drop("x", b"")  # an empty file: rejected too, its reason written beside
    h.wait_settled(2)
    h.stop()
    assert (h.rejected / "x").exists()
    kept = [p for p in h.rejected.iterdir() if p.is_file() and p.read_bytes() == precious]
    assert len(kept) == 1 and kept[0].name != ".x.reason.tmp"
