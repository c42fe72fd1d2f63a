"""Edges of "release keeps an input changed after its record" and of "publish in
place only the content hashed": a removal the release step itself left half done, a
power loss dropping the rig's unflushed bytes, copies and zips put back after their
record, identity changes that are not content changes, and a rewrite that restores
the file's mtime."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from test_zip_directories import drop_folder, use_zip

from fixtures.inplace_env import TESTS, FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step, advance


def _work(inbox: Path, token: str) -> Path:
    return inbox / ".nbank" / token


def _use_spec(env: Env, **changes: object) -> None:
    """The env's inbox with other configuration values (as a reload would give)."""
    spec = replace(env.spec, config=replace(env.spec.config, **changes))  # type: ignore[arg-type]
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None


# -- a release that stopped part way through removing a folder ------------------------


@contextmanager
def immutable(path: Path, under: Path) -> Iterator[None]:
    """``path`` cannot be removed (chattr +i) until the block ends (then every file
    under ``under``, wherever it has moved, is made removable again)."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i refused here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(under)], capture_output=True)


def _step(env: FolderEnv, item: Item, step: Step) -> Item:
    """Runs one step and journals the item's progress as the daemon does."""
    item, outcome = env.steps.run(item, step)
    return env.journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))


def test_a_folder_release_stopped_part_way_is_not_put_back(tmp_path: Path) -> None:
    """A release whose removal of a deposited folder stopped part way (here at a member
    that cannot be removed, made immutable after the claim, which refuses a folder
    holding one; a kill or power cut in the middle of the removal leaves the same kind
    of remnant) is not judged a writer's change when run again: the daemon's own
    half-removed tree never goes back to the inbox as an input."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    try:
        files = {f"f{i}.dat": os.urandom(4096) for i in range(8)}
        item, _ = env.drop_folder("session9", files=files)
        last = os.listdir(env.inbox / "session9")[-1]  # removed last: the others go first
        item = env.until(item, State.RECORDED)
        assert item.state is State.RECORDED, (item.error_code, item.error_message)
        work = _work(env.inbox, item.token)
        with immutable(work / last, tmp_path / "data"):
            item = _step(env, item, Step.RELEASE)
            assert item.state is State.RECORDED, (item.state, item.error_code)
            assert not work.exists()  # renamed before its removal, which stopped part way
            assert sorted(os.listdir(work.with_name(work.name + ".released"))) == [last]
            item = _step(env, item, Step.RELEASE)  # its next attempt (or after a restart)
            assert item.state is not State.RETURNING, (
                f"the daemon's half-removed folder is to go back to the inbox as an input: "
                f"{item.error_code}: {item.error_message}"
            )
            assert not (env.inbox / "session9").exists()
    finally:
        env.journal.close()
        env.registry.close()


# -- a power loss right after the record, the rig's bytes never flushed ---------------

_POWER = r"""
import fcntl, json, os, secrets, struct, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from fixtures.inplace_env import make_env
from nbankd.archive import opening
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit import inboxfs
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State, Step, advance
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.factory import open_registry

mnt, state, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4]
data = mnt / "data"
if phase == "deposit":
    env = make_env(data, state, placement="copy")
    path = env.inbox / "rig.dat"
    path.write_bytes(os.urandom(300_000))  # as a rig writes: never fsynced
    st = os.lstat(path)
    item = env.journal.add(
        token=secrets.token_hex(16), inbox=env.spec.key, relpath=b"rig.dat", kind="file",
        archive=env.spec.archive_name, archive_path=str(env.spec.archive_path),
        placement="copy", verify=1,
        seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
        created=0.0, updated=0.0)
    item = env.until(item, State.RECORDED)
    assert item.state is State.RECORDED, (item.state, item.error_code, item.error_message)
    # power loss: EXT4_IOC_SHUTDOWN with EXT4_GOING_FLAGS_NOLOGFLUSH
    fd = os.open(mnt, os.O_RDONLY)
    fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))
    os.close(fd)
    env.journal.close()
else:
    registry = open_registry("embedded", embedded_db=state / "registry.sqlite3")
    archive = opening.open_archive(data / "arch")
    inbox = data / "inbox"
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    config = InboxConfig(path=inbox, archive="arch", dtype="test-file",
                         directories="resources", placement="copy")
    spec = InboxSpec.of(config, ArchiveConfig(name="arch", path=archive.path),
                        work_id=work_id, rejected_id=rejected_id)
    journal = Journal(state / "journal.sqlite3")
    steps = Steps(journal=journal, registry=registry,
                  inboxes=lambda key: spec if key == spec.key else None,
                  receipts_dir=state / "receipts")
    [item] = journal.in_state(State.RECORDED)
    # the power loss was a restart of the machine: claimed in an earlier boot
    claimed = json.loads(item.identity)
    assert claimed["boot"]
    item = journal.save(replace(item, identity=json.dumps({**claimed, "boot": "an-earlier-boot"})))
    for _ in range(4):
        if item.state in (State.DONE, State.RETURNED):
            break
        step = {State.RECORDED: Step.RELEASE, State.RETURNING: Step.PUT_BACK}[item.state]
        item, outcome = steps.run(item, step)
        item = journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
    back = inbox / "rig.dat"
    print(json.dumps({"state": str(item.state), "code": item.error_code,
                      "back": back.stat().st_size if back.exists() else None}))
"""


def test_a_power_loss_after_the_record_does_not_return_the_rigs_lost_bytes(
    tmp_path: Path,
) -> None:
    """Deposited as a copy (ext4, a loop device), recorded, then the power fails before
    the rig's own unflushed bytes reach the disk: the archive holds the fsynced copy,
    the input in the work folder came back shorter. The release must not take that
    for a writer's change and return the truncated file to the inbox."""
    tools = ("unshare", "mkfs.ext4", "mount")
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in tools):
        pytest.skip("needs root, unshare, mkfs.ext4 and loop devices")
    image, mnt, state = tmp_path / "fs.img", tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    state.mkdir()
    with open(image, "wb") as fp:
        fp.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    py = [sys.executable, "-c", _POWER, str(mnt), str(state), str(TESTS)]
    shell = (
        'mount -o loop "$IMG" "$MNT" || exit 97; "$@" deposit; rc=$?; umount "$MNT"; '
        '[ $rc -eq 0 ] || exit $rc; mount -o loop "$IMG" "$MNT" || exit 98; '
        '"$@" after; rc=$?; umount "$MNT"; exit $rc'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, "sh", *py],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IMG": str(image), "MNT": str(mnt)},
    )
    if proc.returncode == 97:
        pytest.skip(f"cannot loop-mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after == {"state": "done", "code": None, "back": None}, after


# -- put back after the record: the archive's copy stays ------------------------------


def test_a_zipped_folder_put_back_after_its_record_keeps_its_stored_zip(env: Env) -> None:
    """A folder deposited as its zip that gained a file after the record goes back to
    the inbox whole; the stored zip (linked from its staged name) is untouched and no
    staged name is left behind."""
    use_zip(env)
    item = env.until(
        drop_folder(env.journal, env.spec, "zsess", {"a.dat": os.urandom(9000)}), State.RECORDED
    )
    assert item.zipped
    (_work(env.inbox, item.token) / "late.dat").write_bytes(b"late")
    item = env.until(item, State.RETURNING)
    assert (item.state, item.error_code) == (State.RETURNING, "changed")
    item = env.until(item, State.RETURNED)
    [stored] = env.stored()
    data = (env.archive.resources_dir / stored).read_bytes()
    assert hashlib.sha1(data).hexdigest() == item.sha1
    assert (env.inbox / "zsess" / "late.dat").read_bytes() == b"late"
    assert [p for p in os.listdir(env.archive.staging_dir) if not p.startswith(".")] == []


def test_a_copied_folder_put_back_after_its_record_keeps_its_stored_tree(tmp_path: Path) -> None:
    """A folder stored as a copy that changed after its record goes back whole; every
    stored file keeps the bytes claimed."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state", placement="copy")
    try:
        item, files = env.drop_folder("csess")
        item = env.until(item, State.RECORDED)
        (_work(env.inbox, item.token) / "a.dat").write_bytes(b"rewritten")
        item = env.until(item, State.RETURNED)
        assert item.state is State.RETURNED
        stored = env.archive_root / "resources" / "cs" / "csess"
        for rel, data in files.items():
            assert (stored / rel).read_bytes() == data
        assert (env.inbox / "csess" / "a.dat").read_bytes() == b"rewritten"
    finally:
        env.journal.close()
        env.registry.close()


# -- an identity change that is not a content change ----------------------------------


@pytest.mark.parametrize("auto_id", [False, True], ids=["named", "auto-id"])
def test_a_mode_change_after_the_record_is_no_change(env: Env, auto_id: bool) -> None:
    """A writer that only changes the claimed file's mode after its record (ctime moves,
    not one byte) leaves the deposit as it is: the input hashes to the deposited SHA-1
    and is removed, never put back (to end as a rejected duplicate with auto ids)."""
    if auto_id:
        _use_spec(env, auto_id=True)
    data = os.urandom(20_000)
    item = env.until(env.drop("moded.dat", data), State.RECORDED)
    work = _work(env.inbox, item.token)
    os.chmod(work, 0o600)  # e.g. fchmod through its descriptor
    item = env.until(item, State.DONE)
    assert (item.state, item.error_code) == (State.DONE, None)
    assert not work.exists() and not (env.inbox / "moded.dat").exists()
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data


def test_a_mode_change_and_a_rewrite_after_the_record_go_back(env: Env) -> None:
    """Same size and mtime, other bytes (mtime set back), ctime moved: the SHA-1 tells,
    and the input goes back whole."""
    data = os.urandom(20_000)
    item = env.until(env.drop("rewrit.dat", data), State.RECORDED)
    work = _work(env.inbox, item.token)
    before = os.stat(work)
    with open(work, "r+b") as writer:
        writer.write(bytes(b ^ 0xFF for b in data[:10]))
    os.utime(work, ns=(before.st_atime_ns, before.st_mtime_ns))
    item = env.until(item, State.RETURNING)
    assert (item.state, item.error_code) == (State.RETURNING, "changed")


# -- placed by rename: a same-size rewrite that restores mtime ----------------------


def test_a_same_size_rewrite_with_its_mtime_restored_is_not_published(env: Env) -> None:
    """Placed by rename, an input a writer rewrote after registration (same size) and
    whose mtime it then set back (``touch -r``, ``cp -p``, an in-place editor that
    keeps times) is not published with bytes other than the record's: only ctime,
    which no one can set back, tells."""
    data = os.urandom(30_000)
    item = env.until(env.drop("kept.dat", data, placement="rename", verify=False), State.REGISTERED)
    work = _work(env.inbox, item.token)
    before = os.stat(work)
    with open(work, "r+b") as writer:
        writer.write(bytes(b ^ 0xFF for b in data[:100]))
    os.utime(work, ns=(before.st_atime_ns, before.st_mtime_ns))
    item = env.step(item, Step.PUBLISH)
    stored = [env.archive.resources_dir / p for p in env.stored()]
    published = [hashlib.sha1(p.read_bytes()).hexdigest() for p in stored]
    assert published in ([], [item.sha1]), (
        f"published {published} under the record of sha1 {item.sha1} (state {item.state})"
    )
