"""Second hostile review of mounts, file flags and descriptor walks in inboxes (commits
774f376, fef6710, 2755e4f): btrfs subvolumes (another st_dev, the same mount) taken for
mount points, flagged members the claim's check misses (an empty flagged sub-folder, a
folder published in place, a flag set after the check), a mount made inside a folder
after the claim's check, and paths named in messages.

Mounts are made in a private mount namespace (``fixtures.mountns``) the daemon runs in:
nothing is left mounted when a test fails. A btrfs is a loop-mounted image made with
``mkfs.btrfs`` (skipped where it cannot be). Every test not labelled "guard" fails on
the code it was written against and names the behaviour expected once fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, status_json, wait_for, work_entries
from fixtures.fileflags import chattr, unflag
from fixtures.mountns import MountNamespace
from nbankd.archive.opening import create_archive
from nbankd.deposit.identity import tree_now
from nbankd.watch.identity import tree_summary


def _errors(h: DaemonHarness) -> list[dict[str, Any]]:
    """The journal's items held with an error other than "changed" (still settling)."""
    return [r for r in h.journal_rows() if r["code"] and "changed" not in r["code"]]


def _daemon(daemon_factory: Any, ns: MountNamespace | None = None, **options: Any) -> DaemonHarness:
    h: DaemonHarness = daemon_factory(
        wrap_argv=ns.enter if ns is not None else [],
        inbox_options={
            "watch": "poll",
            "rescan_every": "1s",
            "directories": "resources",
            **options,
        },
    )
    create_archive(h.archive, h.registry_address, allow_directories=True)
    return h


def _btrfs(ns: MountNamespace, image: Path, where: Path) -> None:
    """A fresh btrfs (a loop-mounted sparse image) mounted on ``where`` in ``ns``."""
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        pytest.skip("needs mkfs.btrfs and btrfs (btrfs-progs)")
    with open(image, "wb") as f:
        f.truncate(160 * 1024 * 1024)
    made = subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.btrfs failed here: {made.stderr.strip()}")
    where.mkdir(parents=True, exist_ok=True)
    try:
        ns.run("mount", "-o", "loop", image, where)
    except AssertionError as err:
        pytest.skip(f"cannot loop-mount a btrfs image here: {err}")


def _on_volume(h: DaemonHarness, ns: MountNamespace) -> tuple[Path, Path]:
    """Points the inbox at ``ROOT/vol/inbox``; returns (vol, vol as the test sees it)."""
    vol = h.root / "vol"
    h.inbox = vol / "inbox"
    h.inbox_options["path"] = str(h.inbox)
    return vol, ns.view(vol)


def _session(where: Path) -> Path:
    session = where / "session1"
    session.mkdir()
    (session / "spikes.dat").write_bytes(b"recorded samples\n" * 64)
    return session


# --- btrfs subvolumes: another st_dev, the same mount ---------------------------------


@pytest.mark.parametrize("shape", ["is-a-subvolume", "holds-a-subvolume"])
def test_a_folder_input_that_is_or_holds_a_btrfs_subvolume_is_deposited(
    daemon_factory: Any, mount_ns: MountNamespace, shape: str
) -> None:
    """A session folder that is a btrfs subvolume (or holds one: ``btrfs subvolume
    create``, snapshots) on the inbox's own mount is deposited and removed like any
    folder (it can be renamed and removed: 774f376 deposited both); never told "a mount
    point inside the inbox ... unmount it" and kept in the inbox for ever (the
    subvolume's st_dev differs, its mount id is the inbox's)."""
    h = _daemon(daemon_factory, mount_ns)
    vol, view = _on_volume(h, mount_ns)
    _btrfs(mount_ns, h.root / "btrfs.img", vol)
    (view / "inbox").mkdir()
    (view / "stage").mkdir()
    if shape == "is-a-subvolume":
        mount_ns.run("btrfs", "subvolume", "create", vol / "stage" / "session1")
        (view / "stage" / "session1" / "spikes.dat").write_bytes(b"recorded samples\n" * 64)
    else:
        _session(view / "stage")
        mount_ns.run("btrfs", "subvolume", "create", vol / "stage" / "session1" / "raw")
        (view / "stage" / "session1" / "raw" / "raw.bin").write_bytes(b"raw samples\n" * 64)
    h.start()
    try:
        mount_ns.run("mv", vol / "stage" / "session1", vol / "inbox" / "session1")

        def decided() -> Any:
            if h.receipts():
                return "deposited"
            if _errors(h):
                return "held"
            _code, doc = status_json(h)
            return "unreadable" if doc["inboxes"][0]["unreadable"] else None

        found = wait_for(decided, 30, "session1 to be deposited, held or skipped")
        _code, doc = status_json(h)
        assert found == "deposited", (
            f"session1 ({shape}) {found}: items {_errors(h)}, status {doc['degraded']}"
        )
        wait_for(lambda: not work_entries(view / "inbox" / ".nbank"), 30, "the release")
    finally:
        h.stop()


# --- flags the claim's check misses ---------------------------------------------------


@pytest.mark.parametrize("flag", ["+i", "+a"])
def test_a_folder_input_holding_an_empty_flagged_folder_is_not_deposited_then_kept(
    daemon_factory: Any, flag: str
) -> None:
    """A folder input holding an empty immutable or append-only sub-folder (rmdir is
    refused, to root too) is held in the inbox naming it (input-protected), or deposited
    and removed; never deposited and then kept in .nbank/ for ever, its release retried
    as ``archive-unavailable: Operation not permitted: 'empty'``."""
    h = _daemon(daemon_factory)
    try:
        h.start()
        session = _session(h.root)
        (session / "empty").mkdir()
        chattr(flag, session / "empty")
        os.rename(session, h.inbox / "session1")
        work = h.inbox / ".nbank"

        def state() -> str | None:
            if h.receipts():
                if not work_entries(work):
                    return "deposited and removed"
                return "deposited and kept in the work folder" if _errors(h) else None
            return "held in the inbox" if _errors(h) else None

        found = wait_for(state, 30, "session1 to be deposited or held")
        assert found != "deposited and kept in the work folder", (found, _errors(h))
    finally:
        unflag(h.root)
        h.stop()


@pytest.mark.parametrize("flag", ["+i", "+a"])
def test_a_folder_published_in_place_holding_a_flagged_file_waits_before_it_is_registered(
    daemon_factory: Any, flag: str
) -> None:
    """A folder input published in place (placement: rename) holding an immutable or
    append-only file (its mode cannot be set to the archive's) waits in the inbox naming
    the file (input-protected) before anything is registered; never registered and then
    retried for ever at publish as ``archive-unavailable: Operation not permitted``,
    the record naming a resource the archive never gets."""
    h = _daemon(daemon_factory, placement="rename")
    try:
        h.start()
        session = _session(h.root)
        (session / "rig.log").write_bytes(b"rig log\n")
        chattr(flag, session / "rig.log")
        os.rename(session, h.inbox / "session1")
        [row] = wait_for(lambda: _errors(h), 30, "session1 to wait with an error")
        assert row["state"] not in ("registered", "published", "recorded"), row
        assert row["code"] == "input-protected", row
    finally:
        unflag(h.root)
        h.stop()


def test_a_file_flagged_after_the_claim_is_told_as_flagged_not_as_the_archive(
    daemon_factory: Any,
) -> None:
    """A file of a claimed folder made append-only after the claim's check (the release
    cannot remove it) waits with a message saying it is append-only and where it is (a
    path, not the bare name 'rig.log'), never ``archive-unavailable: [Errno 1]
    Operation not permitted: 'rig.log'``, which sends the administrator to the archive."""
    h = _daemon(daemon_factory)
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim-rename", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        session = _session(h.root)
        (session / "rig.log").write_bytes(b"rig log\n")
        os.rename(session, h.inbox / "session1")
        wait_for(lambda: Path(f"{go}.reached").exists(), 30, "session1 to be claimed")
        [taken] = work_entries(h.inbox / ".nbank")
        chattr("+a", taken / "rig.log")
        go.touch()
        [row] = wait_for(lambda: _errors(h), 30, "session1 to wait with an error")
        told = f"{row['code']}: {row['error']}"
        assert row["code"] != "archive-unavailable", told
        assert "append-only" in told and "/rig.log" in told, told
    finally:
        unflag(h.root)
        h.stop()


# --- a mount made inside a folder after the claim's check -----------------------------


@pytest.mark.parametrize("placement", ["copy", "rename"])
def test_nothing_on_a_mount_made_inside_a_claimed_folder_is_deposited_or_changed(
    daemon_factory: Any, mount_ns: MountNamespace, placement: str
) -> None:
    """A lab member's folder bind-mounted into a session folder just after the claim's
    mount check (here: right after the claim's rename) is never walked by the copy or
    the publish: none of its files is deposited (hashed, registered, copied) and none
    changed (its mode set to the archive's); the deposit waits (mount-inside). Today
    the copy and the hash cross the mount, and a publish in place chmods the other
    user's 0600 file to 0444."""
    h = _daemon(daemon_factory, mount_ns, placement=placement)
    home = h.root / "home-alice"
    home.mkdir()
    thesis = home / "thesis.txt"
    thesis.write_bytes(b"chapter 1: never deposited\n")
    thesis.chmod(0o600)
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-claim-rename", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        session = _session(h.root)
        (session / "shared").mkdir()
        os.rename(session, h.inbox / "session1")
        wait_for(lambda: Path(f"{go}.reached").exists(), 30, "session1 to be claimed")
        [taken] = work_entries(h.inbox / ".nbank")
        mount_ns.run("mount", "--bind", home, taken / "shared")
        go.touch()
        wait_for(lambda: h.receipts() or _errors(h), 30, "session1 to be deposited or held")
        archived = sorted(p.name for p in mount_ns.view(h.archive).rglob("*"))
        assert "thesis.txt" not in archived, (
            f"alice's file was deposited with session1 ({placement}): receipts "
            f"{[(r['outcome'], r['sha1']) for r in h.receipts()]}, items {h.journal_rows()}"
        )
        assert oct(thesis.stat().st_mode & 0o777) == oct(0o600)
    finally:
        h.stop()


# --- messages -------------------------------------------------------------------------


def test_an_unreadable_sidecar_is_named_by_a_path_that_exists(
    daemon_factory: Any, unpriv_user: Any, other_user: Any
) -> None:
    """An input's sidecar the daemon's user may not read (another user's, mode 0600),
    taken into the work folder, is named in the waiting message by its own name in the
    inbox (rec.dat.nbank.yaml) or where it is now (.nbank/...), never by the path
    INBOX/rec.dat.sidecar.yaml, which never existed: the work name's token is rewritten
    as the input's inbox path and its suffix kept."""
    h: DaemonHarness = daemon_factory(
        user=unpriv_user, inbox_options={"watch": "poll", "rescan_every": "1s"}
    )
    h.inbox.mkdir()
    os.chown(h.inbox, unpriv_user.uid, unpriv_user.gid)
    h.inbox.chmod(0o777)  # every lab member may drop files here
    h.start()
    try:
        side = h.root / "rec.dat.nbank.yaml"
        side.write_text("metadata:\n  rig: 3\n")
        os.chown(side, other_user.uid, other_user.gid)
        side.chmod(0o600)
        os.rename(side, h.inbox / "rec.dat.nbank.yaml")
        h.drop("rec.dat", b"recorded\n" * 10)
        [row] = wait_for(lambda: _errors(h), 30, "rec.dat to wait with an error")
        told = str(row["error"])
        assert str(h.inbox / "rec.dat.sidecar.yaml") not in told, told
        assert "rec.dat.nbank.yaml" in told or str(h.inbox / ".nbank") in told, told
    finally:
        h.stop()


# --- guards: what held up -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tmpfs", "bind-onto-itself", "btrfs-subvolume"])
def test_guard_an_inbox_that_is_itself_a_mount_deposits_its_folders(
    daemon_factory: Any, mount_ns: MountNamespace, kind: str
) -> None:
    """Guard: an inbox on its own tmpfs, a folder bind-mounted onto itself, or an inbox
    that is a btrfs subvolume deposits a folder input with nested folders, nothing told
    as a mount point and status healthy."""
    h = _daemon(daemon_factory, mount_ns)
    vol, view = _on_volume(h, mount_ns)
    vol.mkdir()
    if kind == "tmpfs":
        mount_ns.mount_tmpfs(vol, "8m")
    elif kind == "bind-onto-itself":
        mount_ns.run("mount", "--bind", vol, vol)
    else:
        _btrfs(mount_ns, h.root / "btrfs.img", vol)
    if kind == "btrfs-subvolume":
        mount_ns.run("btrfs", "subvolume", "create", vol / "inbox")
    else:
        (view / "inbox").mkdir()
    (view / "stage").mkdir()
    session = _session(view / "stage")
    (session / "a" / "b").mkdir(parents=True)
    (session / "a" / "b" / "deep.dat").write_bytes(b"deep\n" * 32)
    h.start()
    try:
        # (mv: a folder moves between btrfs subvolumes only as a copy)
        mount_ns.run("mv", vol / "stage" / "session1", vol / "inbox" / "session1")
        wait_for(lambda: h.receipts() or _errors(h), 30, "session1 to be deposited or held")
        assert [r["outcome"] for r in h.receipts()] == ["deposited"], _errors(h)
        wait_for(lambda: not work_entries(view / "inbox" / ".nbank"), 30, "the release")
        code, doc = status_json(h)
        assert code == 0 and not doc["degraded"], json.dumps(doc["degraded"])
    finally:
        h.stop()


def test_guard_the_claims_summary_of_a_deep_wide_tree_is_the_scans_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    """Guard: a folder 140 levels deep and 300 sub-folders wide is summarised by the
    claim (from the inbox's descriptor) exactly as by the scan (by path), the folders
    past 128 levels named too deep, no descriptor left open."""
    top = tmp_path / "session1"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(140):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    for i in range(300):
        (top / f"w{i:03d}" / "x").mkdir(parents=True)
    before = sorted(os.listdir("/proc/self/fd"))
    scanned = tree_summary(top)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        claimed = tree_now(b"session1", dir_fd=parent)
    finally:
        os.close(parent)
    assert claimed is not None
    assert claimed.identity == scanned.identity
    assert scanned.too_deep and not scanned.unreadable and not scanned.mounts
    assert sorted(os.listdir("/proc/self/fd")) == before
