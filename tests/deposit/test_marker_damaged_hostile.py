"""Hostile review of defd362 (a ready marker's status noted with the intent and
again before the claim's rename; a resumed claim records the noted one) and fba7bec
(an input put back after a reboot as a damaged copy, keyed by device and inode, is
rejected ``damaged-copy`` at its next claim).

Findings: a new recording in a damaged copy's inode, no larger and its mtime set back
(cp -p, rsync -t), was rejected ``damaged-copy`` of an unrelated deposit (fixed: only
the file put back, its ctime unchanged since, or after a requeue its size, mtime and
SHA-1 the same, is); a claim cut short by a release before defd362 (no marker noted)
resumed taking the marker found then, the next recording's (fixed: a marker set after
the item was journaled is left for the next recording).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from fixtures.daemon import DaemonHarness, nbankctl, wait_for, work_entries
from fixtures.reboot import no_work_left, rebooted

Factory = Callable[..., DaemonHarness]
DAY_NS = 86400 * 10**9


def _damaged_rejected(h: DaemonHarness) -> bytes:
    """Deposits rec.bin, leaves its claimed input as a power cut would (last bytes and
    mtime lost) with its status changed, restarts the daemon as after a reboot and
    waits for the put-back copy's rejection; returns the deposited bytes. The daemon
    is left running."""
    data = os.urandom(8192)
    h.start(env={"NBANKD_CRASH_AT": "after-record"})
    h.drop("rec.bin", data)
    h.wait_exit()
    [claimed] = work_entries(h.inbox / ".nbank")
    path = h.state_dir / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        [(token, identity)] = db.execute("SELECT token, identity FROM items").fetchall()
        ident = json.loads(identity)
        ident.update(size=ident["size"] + 4096, mtime_ns=ident["mtime_ns"] + 10**9)
        db.execute("UPDATE items SET identity = ? WHERE token = ?", (json.dumps(ident), token))
    os.truncate(claimed, 4096)
    h.wrap_argv = rebooted(h)
    h.start()
    wait_for(lambda: (h.rejected / "rec.bin.reason").exists(), 60, "the damaged copy's rejection")
    reason = json.loads((h.rejected / "rec.bin.reason").read_text())
    assert reason["code"] == "damaged-copy", reason
    return data


def _fate(h: DaemonHarness, name: str, receipts: int) -> str:
    """Waits until ``name`` is deposited (``receipts`` receipts) or rejected; says which."""

    def seen() -> str:
        if (h.rejected / f"{name}.reason").exists():
            return "rejected: " + (h.rejected / f"{name}.reason").read_text()
        if len(h.receipts()) >= receipts and not (h.inbox / name).exists() and no_work_left(h):
            return "deposited"
        return ""

    return str(wait_for(seen, 60, f"{name} deposited or rejected"))


def test_a_new_recording_in_a_damaged_copys_inode_is_never_taken_for_it(
    daemon_factory: Factory,
) -> None:
    """New bytes in a damaged copy's inode, its mtime set back, are deposited.

    What a new recording given a deleted damaged copy's inode number (ext4 reuses it)
    and an older mtime (cp -p, rsync -t) looks like, made deterministic: the rejected
    copy rewritten in place (same inode), its mtime set back, then requeued."""
    h = daemon_factory(inbox_options={"auto_id": True})
    _damaged_rejected(h)
    try:
        damaged = h.rejected / "rec.bin"
        st = os.lstat(damaged)
        older = os.urandom(3000)  # an earlier session, synced in late by rsync -t
        with open(damaged, "r+b") as f:
            f.truncate(0)
            f.write(older)
        os.utime(damaged, ns=(st.st_atime_ns - DAY_NS, st.st_mtime_ns - DAY_NS))
        assert os.lstat(damaged).st_ino == st.st_ino
        out = nbankctl(h, "requeue", str(damaged))
        assert out.returncode == 0, out.stderr + out.stdout
        fate = _fate(h, "rec.bin", 2)
        stored = sorted(p.read_bytes() for p in h.archive_files().values())
    finally:
        h.stop()
    assert fate == "deposited", fate
    assert older in stored


def test_guard_a_requeued_damaged_copy_is_rejected_again_and_kept_whole(
    daemon_factory: Factory,
) -> None:
    """A requeued damaged copy is never deposited anew nor removed: rejected again, kept."""
    h = daemon_factory(inbox_options={"auto_id": True})
    data = _damaged_rejected(h)
    try:
        (h.rejected / "rec.bin.reason").rename(h.root / "first.reason")  # to see the next
        out = nbankctl(h, "requeue", str(h.rejected / "rec.bin"))
        assert out.returncode == 0, out.stderr + out.stdout
        wait_for(lambda: (h.rejected / "rec.bin.reason").exists(), 60, "the second rejection")
        reason = json.loads((h.rejected / "rec.bin.reason").read_text())
        receipts = len(h.receipts())
    finally:
        h.stop()
    assert (reason["code"], receipts) == ("damaged-copy", 1), reason
    assert (h.rejected / "rec.bin").read_bytes() == data[:4096]
    assert [p.read_bytes() for p in h.archive_files().values()] == [data]


def test_guard_a_damaged_copy_copied_in_as_the_hint_says_is_deposited(
    daemon_factory: Factory,
) -> None:
    """Copied into the inbox under another name (cp -p), a damaged copy's bytes deposit."""
    h = daemon_factory()
    data = _damaged_rejected(h)
    try:
        src = h.rejected / "rec.bin"
        tmp = h.root / ".copy"
        tmp.write_bytes(src.read_bytes())
        st = os.lstat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p keeps its times
        os.rename(tmp, h.inbox / "rec-partial.bin")
        fate = _fate(h, "rec-partial.bin", 2)
        stored = sorted(p.read_bytes() for p in h.archive_files().values())
    finally:
        h.stop()
    assert fate == "deposited", fate
    assert stored == sorted([data, data[:4096]])
    assert (h.rejected / "rec.bin").read_bytes() == data[:4096]


def test_guard_explain_of_a_damaged_copy_names_its_deposit(daemon_factory: Factory) -> None:
    """nbankctl explain of a rejected damaged copy tells damaged-copy and its deposit."""
    h = daemon_factory()
    _damaged_rejected(h)
    try:
        out = nbankctl(h, "--json", "explain", str(h.rejected / "rec.bin"))
        [receipt] = h.receipts()
    finally:
        h.stop()
    assert out.returncode == 0, out.stderr
    told = out.stdout
    assert "damaged-copy" in told and str(receipt["id"]) in told, told


def _state_of(h: DaemonHarness, path: Path) -> str:
    out = nbankctl(h, "--json", "explain", str(path))
    return json.loads(out.stdout).get("state", "") if out.returncode == 0 else ""


def test_a_claim_cut_short_by_an_older_release_keeps_the_next_recordings_marker(
    daemon_factory: Factory,
) -> None:
    """Upgrading past a claim cut short, the next recording's marker is never taken."""
    h = daemon_factory(inbox_options={"ready": "marker", "auto_id": True})
    h.start(env={"NBANKD_CRASH_AT": "after-claim-rename"})
    h.drop("session.bin", os.urandom(5000))
    marker = h.inbox / "session.bin.done"
    marker.write_bytes(b"")
    h.wait_exit()
    assert work_entries(h.inbox / ".nbank"), "the claim's rename did not happen"
    path = h.state_dir / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        [(token, seen)] = db.execute("SELECT token, seen_identity FROM items").fetchall()
        old = {k: v for k, v in json.loads(seen).items() if k != "marker"}  # as before defd362
        db.execute("UPDATE items SET seen_identity = ? WHERE token = ?", (json.dumps(old), token))
    # the rig, while nbankd is upgraded, records the next one and marks it done
    nxt = h.drop("session.bin", os.urandom(6000))
    st = os.lstat(marker)
    os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    h.start()
    try:
        wait_for(lambda: len(h.receipts()) >= 1 and no_work_left(h), 30, "the first release")
        state = wait_for(
            lambda: {"deposited", "waiting-for-marker"} & {_state_of(h, nxt)},
            30,
            "the next recording deposited or waiting for its marker",
        )
    finally:
        h.stop()
    assert (state, marker.exists()) == ({"deposited"}, False)
