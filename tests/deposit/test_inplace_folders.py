"""A folder published in place (``directories: resources`` with ``placement: rename``)
is the input's own tree, as the rig left it: it is hashed where it is (no copy in
staging/), and publishing fsyncs each of its files and folders before the rename, so a
recorded deposit survives a power loss whatever the verify setting."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nbank.util import hash_directory as nbank_hash_directory

from nbankd.archive import opening
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit import inboxfs
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import FINAL, State, advance, next_step
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.base import Registry
from nbankd.registry.factory import open_registry

TESTS = Path(__file__).resolve().parents[1]
FILES = {"a.dat": 48 << 10, "sub/b.dat": 20000}


@dataclass
class FolderEnv:
    archive_root: Path
    inbox: Path
    registry: Registry
    journal: Journal
    spec: InboxSpec
    steps: Steps

    def drop_folder(self, name: str, *, verify: bool = True) -> tuple[Item, dict[str, bytes]]:
        """Writes a folder (unsynced, as a rig leaves it) into the inbox and journals it
        (``verify``: the intent's verify setting)."""
        files = {rel: os.urandom(size) for rel, size in FILES.items()}
        for rel, data in files.items():
            path = self.inbox / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        st = os.lstat(self.inbox / name)
        item = self.journal.add(
            token=secrets.token_hex(16),
            inbox=self.spec.key,
            relpath=os.fsencode(name),
            kind="dir",
            archive=self.spec.archive_name,
            archive_path=str(self.spec.archive_path),
            placement="rename",
            verify=int(verify),
            seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
            created=0.0,
            updated=0.0,
        )
        return item, files

    def until(self, item: Item, state: State) -> Item:
        """Runs steps (each saved as the daemon saves it) until ``state``."""
        for _ in range(40):
            if item.state is state or item.state in FINAL:
                return item
            step = next_step(item.progress, float("inf"))
            assert step is not None, item
            item, outcome = self.steps.run(item, step)
            item = self.journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
        raise AssertionError(f"no end in sight: {item.state} {item.error_code}")


def make_env(data_root: Path, state_root: Path) -> FolderEnv:
    """Inbox and archive under ``data_root`` (one filesystem: placement rename); the
    journal, registry and receipts under ``state_root``."""
    inbox = data_root / "inbox"
    inbox.mkdir(parents=True)
    state_root.mkdir(parents=True, exist_ok=True)
    registry = open_registry("embedded", embedded_db=state_root / "registry.sqlite3")
    archive = opening.create_archive(data_root / "arch", registry.url, allow_directories=True)
    registry.add_datatype("test-file")
    registry.add_archive("arch", "neurobank", str(archive.path))
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    config = InboxConfig(
        path=inbox, archive="arch", dtype="test-file", directories="resources", placement="rename"
    )
    spec = InboxSpec.of(
        config,
        ArchiveConfig(name="arch", path=archive.path),
        work_id=work_id,
        rejected_id=rejected_id,
    )
    journal = Journal(state_root / "journal.sqlite3")
    steps = Steps(
        journal=journal,
        registry=registry,
        inboxes=lambda key: spec if key == spec.key else None,
        receipts_dir=state_root / "receipts",
    )
    return FolderEnv(archive.path, inbox, registry, journal, spec, steps)


@pytest.fixture
def folder_env(tmp_path: Path) -> Iterator[FolderEnv]:
    env = make_env(tmp_path / "data", tmp_path / "state")
    yield env
    env.journal.close()
    env.registry.close()


def _flushed_inodes(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, int]]:
    """Records the (device, inode) of every file fsync or fdatasync is called on."""
    seen: set[tuple[int, int]] = set()
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real=real) -> None:  # type: ignore[no-untyped-def]
            st = os.fstat(fd)
            seen.add((st.st_dev, st.st_ino))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    return seen


@pytest.mark.parametrize("verify", [True, False], ids=["verify-on", "verify-off"])
def test_files_of_a_folder_published_in_place_are_flushed_before_the_record(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """Every file of a folder published in place is fsynced (or fdatasynced) before its
    deposit is recorded, whatever the verify setting: it is the input's own inode,
    written by the rig and never flushed by anyone else."""
    seen = _flushed_inodes(monkeypatch)
    item, files = folder_env.drop_folder("rec1", verify=verify)
    item = folder_env.until(item, State.RECORDED)
    assert item.state is State.RECORDED, (item.error_code, item.error_message)
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    unflushed = []
    for rel in files:
        st = os.stat(stored / rel)
        if (st.st_dev, st.st_ino) not in seen:
            unflushed.append(rel)
    assert unflushed == [], f"recorded, but never flushed: {unflushed}"


def test_a_folder_placed_by_rename_is_not_copied_into_staging(folder_env: FolderEnv) -> None:
    """Deposited by rename, a folder leaves nothing in staging/ and is stored whole,
    with neurobank's directory hash recorded."""
    item, files = folder_env.drop_folder("rec1")
    item = folder_env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert os.listdir(folder_env.archive_root / "staging") == []
    stored = folder_env.archive_root / "resources" / "re" / "rec1"
    assert {rel: (stored / rel).read_bytes() for rel in files} == files
    assert item.sha1 == nbank_hash_directory(stored)
    assert item.size == sum(len(d) for d in files.values())


# -- the consequence on ext4: a power loss after the receipt loses the bytes ----------------

SCRIPT = r"""
import fcntl, hashlib, json, os, struct, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from deposit.test_inplace_folders import make_env
from nbankd.deposit.lifecycle import State

mnt, state, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[-1]
if phase == "deposit":
    env = make_env(mnt / "data", state)
    item, files = env.drop_folder("rec1", verify=sys.argv[4] == "1")
    item = env.until(item, State.RECORDED)
    out = {"state": str(item.state), "error": item.error_code,
           "sha1": {rel: hashlib.sha1(d).hexdigest() for rel, d in files.items()}}
    # power loss: EXT4_IOC_SHUTDOWN with EXT4_GOING_FLAGS_NOLOGFLUSH (the running journal
    # transaction is lost, as when power fails; what was committed stays)
    fd = os.open(mnt, os.O_RDONLY)
    fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))
    os.close(fd)
    (state / "deposit.json").write_text(json.dumps(out))
else:
    stored = mnt / "data" / "arch" / "resources" / "re" / "rec1"
    got = {}
    for rel in json.loads((state / "deposit.json").read_text())["sha1"]:
        try:
            got[rel] = hashlib.sha1((stored / rel).read_bytes()).hexdigest()
        except OSError as err:
            got[rel] = f"unreadable: {err}"
    print(json.dumps(got))
"""


@pytest.mark.parametrize("verify", [True, False], ids=["verify-on", "verify-off"])
def test_a_recorded_folder_published_in_place_survives_a_power_loss(
    tmp_path: Path, verify: bool
) -> None:
    """A folder published in place (ext4 on a loop device) whose receipt is written keeps
    every byte its receipt names through a power loss (an ext4 shutdown that drops the
    journal's running transaction) right after the record step."""
    tools = ("unshare", "mkfs.ext4", "losetup", "mount")
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in tools):
        pytest.skip("needs root, unshare, mkfs.ext4 and loop devices")
    image, mnt, state = tmp_path / "fs.img", tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    state.mkdir()
    with open(image, "wb") as fp:
        fp.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    py = [sys.executable, "-c", SCRIPT, str(mnt), str(state), str(TESTS), str(int(verify))]
    shell = (
        'mount -o loop "$IMG" "$MNT" || exit 97; "$@" deposit; rc=$?; umount "$MNT"; '
        '[ $rc -eq 0 ] || exit $rc; mount -o loop "$IMG" "$MNT" || exit 98; '
        '"$@" read; rc=$?; umount "$MNT"; exit $rc'
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
    deposit = json.loads((state / "deposit.json").read_text())
    assert deposit["state"] == str(State.RECORDED), deposit
    receipts = [
        json.loads(line)
        for log in (state / "receipts").glob("*.jsonl")
        for line in log.read_text().splitlines()
    ]
    assert [r["id"] for r in receipts] == ["rec1"]  # the deposit is recorded as made
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == deposit["sha1"], "recorded, then lost on power loss"
