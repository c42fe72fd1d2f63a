"""Second edges of "release keeps an input changed after its record": which claims
the power-loss rule (a change across a restart of the machine is the rig's unflushed
bytes lost, the input removed) may cover. Only a claim made before this boot may be
excused; an intent journaled before the boot and claimed after it is a claim of this
boot, whose later changes are a writer's. And what is no change at all: an input
renumbered by an SSHFS remount (new device and inode numbers, the same bytes), at the
release and at the in-place publish."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from fixtures.steps_env import Env
from nbankd.archive import opening
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit import inboxfs
from nbankd.deposit.identity import booted_at
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.factory import open_registry


def _work(inbox: Path, token: str) -> Path:
    return inbox / ".nbank" / token


def test_an_intent_from_before_the_boot_claimed_after_it_keeps_a_writers_bytes(
    env: Env,
) -> None:
    """An intent journaled before the machine restarted (the daemon stopped by the
    power cut before it claimed the file) is claimed, copied and recorded after the
    boot; a writer that appends after the record (one the daemon cannot see: no
    CAP_LEASE, NFS) changes a claim of this boot. Its bytes must go back to the inbox,
    not be removed as power-loss damage."""
    assert booted_at() > 60, "no boot time on this machine"
    first, more = os.urandom(40_000), os.urandom(5_000)
    path = env.inbox / "resumed.dat"
    path.write_bytes(first)
    st = os.lstat(path)
    item = env.journal.add(
        token=secrets.token_hex(16),
        inbox=env.spec.key,
        relpath=b"resumed.dat",
        kind="file",
        archive=env.spec.archive_name,
        archive_path=str(env.archive.path),
        placement="copy",
        verify=1,
        seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
        created=booted_at() - 60,  # journaled a minute before this boot
        updated=booted_at() - 60,
    )
    item = env.until(item, State.RECORDED)  # claimed (identity recorded) in this boot
    assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
    with open(_work(env.inbox, item.token), "ab") as writer:  # appended after the record
        writer.write(more)
    item = env.step(item, Step.RELEASE)
    kept = [
        p.read_bytes()
        for p in (env.inbox / "resumed.dat", _work(env.inbox, item.token))
        if p.exists()
    ]
    assert item.state is State.RETURNING and kept == [first + more], (
        f"state {item.state}: the writer's {len(more)} bytes appended after the record "
        f"were removed as power-loss damage (kept: {[len(k) for k in kept]})"
    )


def _sshfs_spec(inbox: Path, archive: Path, placement: str) -> InboxSpec:
    """The inbox's spec as the daemon makes it: folders recorded, token left in them."""
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    proof, owner = inboxfs.prove_folders(
        inbox, work=WORK_DIR_NAME, work_id=work_id, rejected="rejected", rejected_id=rejected_id
    )
    return InboxSpec.of(
        InboxConfig(path=inbox, archive="arch", dtype="test-file", placement=placement),  # type: ignore[arg-type]
        ArchiveConfig(name="arch", path=archive),
        work_id=work_id,
        rejected_id=rejected_id,
        work_proof=proof,
        rejected_owner=owner,
    )


def _sshfs_env(tmp_path: Path, inbox: Path, archive_at: Path, placement: str) -> Env:
    """Steps over an inbox on an SSHFS mount (registry and journal local)."""
    registry = open_registry("embedded", embedded_db=tmp_path / "registry.sqlite3")
    archive = opening.create_archive(archive_at, registry.url)
    registry.add_datatype("test-file")
    registry.add_archive("arch", "neurobank", str(archive.path))
    spec = _sshfs_spec(inbox, archive.path, placement)
    journal = Journal(tmp_path / "journal.sqlite3")
    steps = Steps(
        journal=journal,
        registry=registry,
        inboxes=lambda key: spec if key == spec.key else None,
        receipts_dir=tmp_path / "receipts",
    )
    return Env(tmp_path, inbox, archive, registry, journal, spec, steps)


def test_an_unchanged_input_on_sshfs_remounted_before_its_release_is_removed(
    tmp_path: Path, sshfs: Any
) -> None:
    """An inbox on SSHFS (supported: its work folder is proved by its token after a
    remount) is remounted between the record and the release (a network blip, an
    automount expiring): the claimed file gets new device and inode numbers, not one
    byte or time changes. It is the input claimed: removed, never put back to end as a
    second deposit or a rejection of an input already stored."""
    mount = sshfs.mount("rig")
    inbox = mount.mountpoint / "inbox"
    inbox.mkdir()
    env = _sshfs_env(tmp_path, inbox, tmp_path / "arch", "copy")
    try:
        item = env.until(env.drop("remote.dat", os.urandom(30_000)), State.RECORDED)
        assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
        before = os.lstat(_work(inbox, item.token))
        mount.unmount()
        mount.mount()
        after = os.lstat(_work(inbox, item.token))
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        item = env.step(item, Step.RELEASE)
        assert (item.state, item.error_code) == (State.DONE, None), (
            f"an unchanged input renumbered by the remount: {item.state} "
            f"{item.error_code}: {item.error_message}"
        )
    finally:
        env.journal.close()
        env.registry.close()


def test_an_input_placed_in_place_on_sshfs_remounted_before_its_publish_is_published(
    tmp_path: Path, sshfs: Any
) -> None:
    """Inbox and archive on one SSHFS mount (``placement: rename``), remounted between
    the registration and the publish: the input has the bytes hashed and registered
    (new device and inode numbers only). It must be published, not refused as
    'changed' at every retry for ever (its numbers never come back)."""
    mount = sshfs.mount("inplace")
    inbox = mount.mountpoint / "inbox"
    inbox.mkdir()
    env = _sshfs_env(tmp_path, inbox, mount.mountpoint / "arch", "rename")
    try:
        item = env.drop("inplace.dat", os.urandom(30_000), placement="rename", verify=False)
        item = env.until(item, State.REGISTERED)
        assert item.state is State.REGISTERED, (item.state, item.error_code, item.error_message)
        mount.unmount()
        mount.mount()
        for _ in range(3):  # its retries
            item = env.step(item, Step.PUBLISH)
        assert (item.state, item.error_code) == (State.PUBLISHED, None), (
            f"the registered bytes, renumbered by the remount: {item.state} "
            f"{item.error_code}: {item.error_message}"
        )
    finally:
        env.journal.close()
        env.registry.close()
