"""Hostile review of other filesystems and file flags inside an inbox: a sub-folder of a
recursive inbox that is a mount point (a tmpfs, a bind mount of a folder elsewhere, the
inbox itself bound onto its own sub-folder), a mount inside a folder input, a mount
appearing between the scan and the claim, immutable and append-only files (``chattr
+i`` / ``+a``) as inputs or inside a folder input, and hard links.

Every mount is made in a private mount namespace (``fixtures.mountns``) the daemon runs
in: nothing is left mounted when a test fails. Every test not labelled "guard" fails
on the code it was written against and names the behaviour expected once fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import more_scans, status_json, wait_for, work_entries
from fixtures.fileflags import chattr, unflag
from fixtures.mountns import MountNamespace, poll_daemon
from nbankd.archive.opening import create_archive
from nbankd.deposit.lifecycle import FINAL

FINAL_STATES = {str(s) for s in FINAL}


# --- a mount point inside a folder input ----------------------------------------------


@pytest.mark.parametrize("mount", ["bind", "tmpfs"])
def test_files_on_a_mount_inside_a_folder_input_are_never_removed(
    daemon_factory: Any, mount_ns: MountNamespace, mount: str
) -> None:
    """A folder input holding a mount point (a lab member's folder bind-mounted into the
    session folder, or a tmpfs) never has the other filesystem's files removed: the
    folder is refused or waits (naming the mount), or only what is on the inbox's own
    filesystem is ever removed; never the other folder emptied and the deposit then
    stuck for ever on the mount point (EBUSY), retried as the archive's fault."""
    h = poll_daemon(daemon_factory, mount_ns, directories="resources")
    create_archive(h.archive, h.registry_address, allow_directories=True)
    session = h.root / "session1"
    (session / "shared").mkdir(parents=True)
    (session / "spikes.dat").write_bytes(b"recorded samples\n" * 64)
    thesis = b"chapter 1: never deposited, never to be removed\n"
    if mount == "bind":
        home = h.root / "home-alice"  # a lab member's folder, outside every inbox
        home.mkdir()
        (home / "thesis.txt").write_bytes(thesis)
        mount_ns.run("mount", "--bind", home, session / "shared")
        other = home
    else:
        mount_ns.mount_tmpfs(session / "shared", "1m")
        (mount_ns.view(session / "shared") / "thesis.txt").write_bytes(thesis)
    h.start()
    mount_ns.run("mv", session, h.inbox / "session1")
    if mount == "tmpfs":  # the tmpfs moved with its folder: seen where it is now
        other = mount_ns.view(h.inbox / "session1" / "shared")

    def decided() -> bool:
        # finished, or held with an error (a folder still settling after the move, told
        # "changed", is not decided yet)
        return any(
            r["state"] in FINAL_STATES or (r["code"] is not None and "changed" not in r["code"])
            for r in h.journal_rows()
        )

    try:
        wait_for(decided, 30, "session1 to be deposited, refused or held with an error")
        assert (other / "thesis.txt").exists(), (
            f"the file on the mount ({mount}) inside session1 was removed after the folder "
            f"was deposited: receipts {[r.get('outcome') for r in h.receipts()]}, items "
            f"{[(r['state'], r['code'], r['error']) for r in h.journal_rows()]}"
        )
        assert (other / "thesis.txt").read_bytes() == thesis
    finally:
        h.stop()


# --- the inbox bound onto one of its own sub-folders (a loop) -------------------------


def test_an_inbox_bound_onto_its_own_subfolder_never_feeds_its_rejected_folder_back(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """The inbox bind-mounted onto one of its sub-folders (a loop) deposits each input
    once and never takes its own rejected folder (seen again through the loop) as
    inputs: no reason is written for a reason file, and reasons do not multiply at
    every rescan (today they double at each one, until the inbox's disk is full)."""
    h = poll_daemon(daemon_factory, mount_ns)
    (h.inbox / "aa").mkdir(parents=True)
    mount_ns.run("mount", "--bind", h.inbox, h.inbox / "aa")
    h.start()
    try:
        h.drop("zz/rec.dat", b"one recording\n" * 64)
        wait_for(h.receipts, 30, "zz/rec.dat to be deposited")
        more_scans(h, 4)
        reasons = h.reasons()
        fed_back = [r["original_path"] for r in reasons if r["original_name"].endswith(".reason")]
        assert [r["outcome"] for r in h.receipts()] == ["deposited"]
        assert not fed_back and len(reasons) <= 1, (
            f"{len(reasons)} reasons after 4 rescans, {len(fed_back)} of them for reason "
            f"files read back through the loop, e.g. {fed_back[:2]}"
        )
    finally:
        h.stop()


# --- a file on a mounted sub-folder of a recursive inbox ------------------------------


def test_an_input_on_a_mounted_subfolder_gets_no_reason_for_a_move_never_made(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """A filesystem mounted on a sub-folder of a recursive inbox (nothing on it can be
    claimed: the rename into .nbank/ fails with EXDEV) is not scanned, and status says
    so, naming the folder: never a NAME.reason in rejected/ for a file that stayed where
    it was (its rejected_path and requeue command naming nothing), written again at
    every rescan while status calls the inbox healthy."""
    h = poll_daemon(daemon_factory, mount_ns)
    (h.inbox / "sub").mkdir(parents=True)
    mount_ns.mount_tmpfs(h.inbox / "sub", "1m")
    on_mount = mount_ns.view(h.inbox / "sub") / "rec.dat"
    on_mount.write_bytes(b"recorded on a usb disk\n" * 64)
    h.start()
    try:

        def told() -> str:
            code, doc = status_json(h)
            shown = json.dumps(doc)
            return code == 1 and doc["degraded"] and "mount point" in shown and shown

        shown = wait_for(told, 30, "status to be degraded, naming the mount point")
        assert '"sub"' in shown, shown
        more_scans(h, 4)
        assert on_mount.exists()
        assert h.reasons() == [] and h.journal_rows() == [], (h.reasons(), h.journal_rows())
    finally:
        h.stop()


# --- immutable and append-only files --------------------------------------------------


@pytest.mark.parametrize("flag", ["+a", "+i"])
def test_a_folder_input_holding_a_flagged_file_is_not_deposited_then_kept_for_ever(
    daemon_factory: Any, flag: str
) -> None:
    """A folder input holding an append-only or immutable file (chattr +a / +i: nobody
    may remove it, not even root) is either held whole in the inbox with an error naming
    the file, or deposited and removed; never deposited (receipt written, registered)
    and then kept in .nbank/ for ever, its release retried as the archive being
    unavailable (``archive-unavailable: Operation not permitted``)."""
    h = poll_daemon(daemon_factory, directories="resources")
    create_archive(h.archive, h.registry_address, allow_directories=True)
    try:
        h.start()
        session = h.root / "session1"
        session.mkdir()
        (session / "spikes.dat").write_bytes(b"recorded samples\n" * 64)
        (session / "rig.log").write_bytes(b"rig log, append-only\n")
        chattr(flag, session / "rig.log")
        os.rename(session, h.inbox / "session1")
        work = h.inbox / ".nbank"

        def state() -> str | None:
            rows = h.journal_rows()
            if h.receipts():
                if not work_entries(work):
                    return "deposited and removed"
                if any(r["code"] for r in rows):
                    return "deposited and kept in the work folder"
                return None
            if any(r["code"] for r in rows) and (h.inbox / "session1" / "rig.log").exists():
                return "held in the inbox"
            return None

        found = wait_for(state, 30, "session1 to be deposited or held")
        assert found != "deposited and kept in the work folder", (
            f"session1 (rig.log chattr {flag}) was deposited and can never leave "
            f"{[p.name for p in work_entries(work)]}: "
            f"{[(r['state'], r['code'], r['error']) for r in h.journal_rows()]}"
        )
    finally:
        unflag(h.root)
        h.stop()


def test_an_immutable_input_is_told_as_immutable_not_as_an_unwritable_inbox(
    daemon_factory: Any,
) -> None:
    """An immutable input (chattr +i: rename refused with EPERM though the inbox is
    writable) waits with a message saying the file is immutable (or append-only), not
    ``inbox-not-writable`` "cannot move ... out of INBOX", whose fix (give the daemon
    write permission on the inbox) the daemon's user already has."""
    h = poll_daemon(daemon_factory)
    try:
        h.start()
        path = h.drop("rec.dat", b"one recording\n" * 64)
        chattr("+i", path)
        [row] = wait_for(
            lambda: [r for r in h.journal_rows() if r["code"]], 30, "rec.dat to wait with an error"
        )
        told = f"{row['code']}: {row['error']}".replace(str(h.root), "ROOT")  # (the test's
        # own folder is named after it, "immutable" included)
        assert "immutable" in told or "append-only" in told, told
    finally:
        unflag(h.root)
        h.stop()


# --- guards: what held up -------------------------------------------------------------


def test_guard_hard_links_are_rejected_and_their_other_names_untouched(
    daemon_factory: Any,
) -> None:
    """Guard: an input with another name outside the inbox, and two names of one file
    inside it, are each rejected (unsupported), never read or deposited; the name outside
    keeps its bytes."""
    h = poll_daemon(daemon_factory)
    h.start()
    try:
        outside = h.root / "alice-notes.dat"
        outside.write_bytes(b"alice's notes\n" * 8)
        os.link(outside, h.inbox / "in.dat")
        twin = h.root / "twin.dat"
        twin.write_bytes(b"twin\n" * 8)
        os.link(twin, h.inbox / "twin1.dat")
        os.link(twin, h.inbox / "twin2.dat")
        twin.unlink()
        h.wait_settled(3)
        assert h.receipts() == []
        assert sorted(r["original_name"] for r in h.reasons()) == [
            "in.dat",
            "twin1.dat",
            "twin2.dat",
        ]
        assert {r["code"] for r in h.reasons()} == {"unsupported"}
        assert outside.read_bytes() == b"alice's notes\n" * 8
    finally:
        h.stop()


def test_guard_a_mount_appearing_between_scan_and_claim_takes_nothing_from_it(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """Guard: a tmpfs mounted on the input's folder after the scan found the input and
    before its claim (holding a file of the same name and size) makes the claim find
    another file: nothing on the mount is deposited as the scanned input, and the
    original, hidden under the mount, is deposited once the mount goes."""
    h = poll_daemon(daemon_factory, mount_ns)
    go = h.root / "go"
    (h.inbox / "sub").mkdir(parents=True)
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        original = b"the original recording\n" * 40
        h.drop("sub/rec.dat", original)
        wait_for(lambda: Path(f"{go}.reached").exists(), 20, "sub/rec.dat to be journaled")
        mount_ns.mount_tmpfs(h.inbox / "sub", "1m")
        impostor = b"X" * len(original)
        (mount_ns.view(h.inbox / "sub") / "rec.dat").write_bytes(impostor)
        go.touch()
        wait_for(
            lambda: any(r["state"] in FINAL_STATES for r in h.journal_rows()),
            30,
            "the claim to end",
        )
        assert h.receipts() == []
        mount_ns.run("umount", h.inbox / "sub")
        [receipt] = wait_for(h.receipts, 30, "the original to be deposited")
        assert receipt["sha1"] == hashlib.sha1(original).hexdigest()
    finally:
        h.stop()
