"""Hostile review of the release's power-loss rule (b94f2e5: after a restart only an
input no larger, with no later mtime or ctime, is removed as power-loss damage) and
of the ready marker's identity noted at claim (f96e700: the release removes
``NAME.done`` only if unchanged; 7eaf1cf: the rejection takes it along by the same
rule).

Findings fixed since (their tests pass): a ready marker whose status alone changed
between claim and release (a lab's ``chmod -R g+w`` / ``setfacl`` / backup xattr over
the inbox, all of which move its ctime) was taken for one "set again" and left in the
inbox, at the release and at a rejection: the next recording of the name was ready
the moment it appeared, before its rig marked it done. A marker is now "set again"
only when its size or modification time moved. A claim stopped between the rename
into the work folder and the journaled identity (a crash or power cut) recorded at its
resumption whatever marker was there then: one the rig set again for its next recording
meanwhile was taken for the claimed one and removed, and that recording waited for a
marker for ever. The marker's status is now noted before the rename (with the intent,
and again, durably, when it was set since), and a resumed claim records that one.

Guards (pass): nbankd itself never moves a claimed input's times or numbers between
its claim and its release (so the new rule never puts back a power-damaged input
because of nbankd's own steps); a claimed input truncated and written shorter by its
writer before a reboot goes back whole (never taken for power-loss damage); a
power-damaged input whose ctime moved since the claim (a status change by someone
else) goes back after the reboot and is rejected, never stored twice.

Fixed since (their tests pass): that put-back input ended rejected as name-taken, its
reason naming the taken identifier only, not the earlier deposit it is a damaged
version of, and with auto_id it was deposited anew as a new resource. It is now
rejected ``damaged-copy`` naming the deposit (and that the stored copy is the whole
one), with auto_id too, also when the daemon restarted between the put-back and its
next claim.
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


def _identities(h: DaemonHarness) -> list[tuple[str, dict[str, object]]]:
    """Each journaled item's token and claim identity (read-only)."""
    path = h.state_dir / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT token, identity FROM items WHERE identity IS NOT NULL")
        return [(token, json.loads(ident)) for token, ident in rows.fetchall()]


def _state_of(h: DaemonHarness, path: Path) -> str:
    out = nbankctl(h, "--json", "explain", str(path))
    return json.loads(out.stdout).get("state", "") if out.returncode == 0 else ""


def _settled_state(h: DaemonHarness, path: Path) -> str:
    """explain's first state of ``path`` once seen and settled ("not-seen", then
    "settling" come first: they say nothing of the marker yet)."""
    return str(
        wait_for(
            lambda: (s := _state_of(h, path)) not in ("", "not-seen", "settling") and s,
            60,
            "the next recording settled",
        )
    )


@pytest.mark.parametrize("marked", [False, True], ids=["plain", "marker-and-sidecar"])
def test_guard_nbankd_never_moves_a_claimed_inputs_status_before_its_release(
    daemon_factory: Factory, marked: bool
) -> None:
    """Between claim and release, the claimed input keeps the status its claim noted."""
    options = {"ready": "marker"} if marked else {}
    h = daemon_factory(inbox_options=options)
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    if marked:
        (h.inbox / "rec.bin.nbank.json").write_text(json.dumps({"metadata": {"k": "v"}}))
    h.drop("rec.bin", os.urandom(8192))
    if marked:
        (h.inbox / "rec.bin.done").write_bytes(b"")
    h.wait_exit()
    [(token, claimed)] = _identities(h)
    st = os.lstat(h.inbox / ".nbank" / token)
    now = {f: getattr(st, "st_" + f) for f in ("dev", "ino", "size", "mtime_ns", "ctime_ns")}
    assert {f: claimed[f] for f in now} == now


def test_guard_an_input_cut_and_written_shorter_before_a_reboot_goes_back_whole(
    daemon_factory: Factory,
) -> None:
    """A writer's shorter rewrite of a claimed input before a reboot is never removed."""
    h = daemon_factory()
    first = os.urandom(8192)
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    h.drop("rec.bin", first)
    h.wait_exit()
    [claimed] = work_entries(h.inbox / ".nbank")
    later = os.urandom(3000)  # no larger than claimed: only its times tell a writer
    fd = os.open(claimed, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, later, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    h.wrap_argv = rebooted(h)
    h.start()
    wait_for(lambda: no_work_left(h), 30, "the claimed input to leave the work folder")
    h.stop()
    assert [p.read_bytes() for p in h.archive_files().values()] == [first]
    assert (h.inbox / "rec.bin").read_bytes() == later


def test_a_marker_only_chmodded_since_the_claim_is_removed_with_its_recording(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A lab's chmod of the inbox never leaves a deposited recording's marker behind."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(go)})
    first = os.urandom(5000)
    h.drop("session.bin", first)
    marker = h.inbox / "session.bin.done"
    marker.write_bytes(b"")
    wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the recording's claim")
    os.chmod(marker, 0o664)  # what `chmod -R g+w inbox` does to it: its ctime only
    go.touch()
    wait_for(lambda: len(h.receipts()) == 1 and no_work_left(h), 30, "the release")
    left = marker.exists()
    nxt = h.drop("session.bin", os.urandom(6000))  # being recorded: not marked yet
    try:
        state = _settled_state(h, nxt)
    finally:
        h.stop()
    # left, the old marker makes the unmarked next recording ready: deposited at once
    assert (left, state) == (False, "waiting-for-marker")


def test_a_marker_only_chmodded_since_the_claim_goes_with_its_rejected_recording(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A rejected recording's marker goes along whatever chmod the lab ran meanwhile."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    h.start(env={"NBANKD_PAUSE_AT": "after-reject-name", "NBANKD_PAUSE_UNTIL": str(go)})
    h.drop("session.bin", b"")  # empty: rejected
    marker = h.inbox / "session.bin.done"
    marker.write_bytes(b"")
    wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the rejection to begin")
    os.chmod(marker, 0o664)
    go.touch()
    try:
        wait_for(lambda: (h.rejected / "session.bin").exists(), 30, "the rejection")
    finally:
        h.stop()
    assert not marker.exists(), "the rejected recording's marker was left in the inbox"


def test_a_marker_set_again_while_a_claim_was_cut_short_is_left_for_the_next(
    daemon_factory: Factory,
) -> None:
    """A crash inside the claim never costs the next recording of the name its marker."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    h.start(env={"NBANKD_CRASH_AT": "after-claim-rename"})
    first, second = os.urandom(5000), os.urandom(6000)
    h.drop("session.bin", first)
    marker = h.inbox / "session.bin.done"
    marker.write_bytes(b"")
    h.wait_exit()
    assert work_entries(h.inbox / ".nbank"), "the claim's rename did not happen"
    # the rig, while the daemon is down, records the next one and marks it done
    nxt = h.drop("session.bin", second)
    os.utime(marker, ns=(os.lstat(marker).st_atime_ns, os.lstat(marker).st_mtime_ns + 10**9))
    h.start()  # the claim resumes from the journal, its identity not yet recorded
    try:
        wait_for(lambda: len(h.receipts()) >= 1, 30, "the first recording's receipt")
        wait_for(lambda: no_work_left(h), 30, "the first recording's release")
        state = wait_for(
            lambda: {"deposited", "waiting-for-marker"} & {_state_of(h, nxt)},
            30,
            "the next recording deposited or waiting for its marker",
        )
    finally:
        h.stop()
    assert (state, marker.exists()) == ({"deposited"}, False)


def test_a_marker_set_again_before_a_claim_cut_short_is_removed_with_its_recording(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A marker touched between intent and claim, then a crash, goes with its recording."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    env = {"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)}
    h.start(env={**env, "NBANKD_CRASH_AT": "after-claim-rename"})
    h.drop("session.bin", os.urandom(5000))
    marker = h.inbox / "session.bin.done"
    marker.write_bytes(b"")
    wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the recording's intent")
    # the rig marks it done again, before the claim takes it: still this recording's
    os.utime(marker, ns=(os.lstat(marker).st_atime_ns, os.lstat(marker).st_mtime_ns + 10**9))
    go.touch()
    h.wait_exit()
    assert work_entries(h.inbox / ".nbank"), "the claim's rename did not happen"
    h.start()
    try:
        wait_for(lambda: len(h.receipts()) == 1 and no_work_left(h), 30, "the release")
        left = marker.exists()
        nxt = h.drop("session.bin", os.urandom(6000))  # being recorded: not marked yet
        state = _settled_state(h, nxt)
    finally:
        h.stop()
    # left, the old marker makes the unmarked next recording ready: deposited at once
    assert (left, state) == (False, "waiting-for-marker")


def _damaged_after_a_reboot(h: DaemonHarness, env: dict[str, str] | None = None) -> bytes:
    """Deposits rec.bin, then leaves its claimed input as a power cut would (its last
    bytes and mtime lost) with its status changed since, and restarts the daemon as
    after a reboot; returns the deposited bytes."""
    data = os.urandom(8192)
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    h.drop("rec.bin", data)
    h.wait_exit()
    [claimed] = work_entries(h.inbox / ".nbank")
    path = h.state_dir / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        [(token, identity)] = db.execute("SELECT token, identity FROM items").fetchall()
        ident = json.loads(identity)  # the disk lost the claim's last bytes and mtime
        ident.update(size=ident["size"] + 4096, mtime_ns=ident["mtime_ns"] + 10**9)
        db.execute("UPDATE items SET identity = ? WHERE token = ?", (json.dumps(ident), token))
    os.truncate(claimed, 4096)  # and its status changed since (ctime later than claimed)
    h.wrap_argv = rebooted(h)
    h.start(env=env)
    return data


def _rejected_reason(h: DaemonHarness) -> dict[str, object]:
    try:
        wait_for(lambda: (h.rejected / "rec.bin.reason").exists(), 60, "the damaged copy's fate")
        return json.loads((h.rejected / "rec.bin.reason").read_text())
    finally:
        h.stop()


def test_guard_a_damaged_input_put_back_after_a_reboot_is_never_stored_twice(
    daemon_factory: Factory,
) -> None:
    """A power-damaged input whose ctime moved since the claim is rejected, kept whole."""
    h = daemon_factory()
    data = _damaged_after_a_reboot(h)
    _rejected_reason(h)
    assert [p.read_bytes() for p in h.archive_files().values()] == [data]
    assert len(h.receipts()) == 1
    assert (h.rejected / "rec.bin").read_bytes() == data[:4096]


def test_a_damaged_input_put_back_after_a_reboot_is_told_a_copy_of_its_deposit(
    daemon_factory: Factory,
) -> None:
    """The rejection of a power-damaged input names the deposit it is a partial copy of."""
    h = daemon_factory()
    _damaged_after_a_reboot(h)
    reason = _rejected_reason(h)
    [receipt] = h.receipts()
    told = f"{reason['message']} {reason['hint']}"
    assert reason["code"] == "damaged-copy", reason
    for words in ("damaged", "partial", "deposited", "whole", str(receipt["id"])):
        assert words in told, (words, told)


def test_with_auto_id_a_damaged_input_put_back_after_a_reboot_is_not_deposited_anew(
    daemon_factory: Factory,
) -> None:
    """With auto_id, a power-damaged input is rejected, never a new resource."""
    h = daemon_factory(inbox_options={"auto_id": True})
    data = _damaged_after_a_reboot(h)
    reason = _rejected_reason(h)
    assert (reason["code"], len(h.receipts())) == ("damaged-copy", 1), reason
    assert [p.read_bytes() for p in h.archive_files().values()] == [data]
    assert (h.rejected / "rec.bin").read_bytes() == data[:4096]


def test_a_damaged_copy_put_back_before_a_daemon_restart_is_still_told_apart(
    daemon_factory: Factory, tmp_path: Path
) -> None:
    """A damaged copy put back, then the daemon killed before its next claim: rejected."""
    h = daemon_factory(inbox_options={"auto_id": True})
    go = tmp_path / f"go-{secrets.token_hex(3)}"
    data = _damaged_after_a_reboot(
        h, env={"NBANKD_PAUSE_AT": "before-intent", "NBANKD_PAUSE_UNTIL": str(go)}
    )
    wait_for(lambda: Path(f"{go}.reached").exists(), 60, "the put-back copy to be found")
    assert (h.inbox / "rec.bin").exists() and no_work_left(h)
    h.kill9()
    h.start()
    reason = _rejected_reason(h)
    assert (reason["code"], len(h.receipts())) == ("damaged-copy", 1), reason
    assert [p.read_bytes() for p in h.archive_files().values()] == [data]
