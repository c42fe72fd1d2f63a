"""``directories: zip``: a folder in an inbox deposited as its canonical zip, the same
bytes nbank's ``--zip-directories`` writes, the folder removed once the zip is
registered and verified, and every input in exactly one place after a kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from nbank.canonical_zip import zip_directory

from fixtures.steps_env import Env
from nbankd.archive.staging import STAGED_PREFIX
from nbankd.config.model import InboxConfig
from nbankd.deposit import receipts
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import FINAL, State, next_step
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.factory import open_registry

TESTS = Path(__file__).resolve().parents[1]

TREE = {
    "a.txt": b"alpha",
    "a/b.bin": bytes(range(256)) * 64,
    "ñame/ü.wav": b"RIFF-ish",
    "empty.dat": b"",
}


def zip_spec(spec: InboxSpec, **changes: object) -> InboxSpec:
    """The inbox's spec with ``directories: zip`` (and other changes to its configuration)."""
    config = replace(spec.config, directories="zip", **changes)  # type: ignore[arg-type]
    return replace(spec, config=config)


def use_zip(env: Env, **changes: object) -> None:
    """Makes the env's inbox deposit folders as zips."""
    spec = zip_spec(env.spec, **changes)
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def drop_folder(journal: Journal, spec: InboxSpec, name: str, files: dict[str, bytes]) -> Item:
    """Writes a folder into the inbox and journals its intent, as a scan of an inbox
    with folder resources would."""
    folder = write_tree(spec.path / name, files)
    st = os.lstat(folder)
    return journal.add(
        token=secrets.token_hex(16),
        inbox=spec.key,
        relpath=os.fsencode(name),
        kind="dir",
        archive=spec.archive_name,
        archive_path=str(spec.archive_path),
        placement=spec.placement,
        verify=1,
        seen_identity=json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
        created=time.time(),  # a claim of this boot (release trusts its changes)
        updated=0.0,
    )


def nbank_sha1(tmp: Path, files: dict[str, bytes], name: str = "ref") -> tuple[str, bytes]:
    """The SHA-1 and bytes of nbank's canonical zip of a folder holding ``files``."""
    folder = write_tree(tmp / "nbank-ref" / name, files)
    data = zip_directory(folder, tmp / "nbank-ref" / f"{name}.zip").read_bytes()
    return hashlib.sha1(data).hexdigest(), data


def staging_leftovers(env_archive_staging: Path) -> list[str]:
    return sorted(p for p in os.listdir(env_archive_staging) if p.startswith(STAGED_PREFIX))


def test_a_folder_is_stored_as_nbanks_zip(env: Env) -> None:
    """A folder is stored as <id>.zip holding nbank's exact bytes, registered with
    their SHA-1."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec1", TREE), State.DONE)
    sha1, data = nbank_sha1(env.root, TREE)
    assert item.state is State.DONE and (item.name, item.zipped) == ("rec1", True)
    assert env.stored() == ["re/rec1.zip"]
    assert (env.archive.resources_dir / "re" / "rec1.zip").read_bytes() == data
    record = env.registry.get_resource("rec1")
    assert record is not None and record.sha1 == sha1 == item.sha1


def test_the_folder_is_removed_once_deposited(env: Env) -> None:
    """The folder leaves the inbox (and its work folder) once its zip is verified and
    registered; staging/ keeps nothing."""
    use_zip(env)
    env.until(drop_folder(env.journal, env.spec, "rec1", TREE), State.DONE)
    assert not (env.inbox / "rec1").exists()
    assert os.listdir(env.inbox / WORK_DIR_NAME) == []
    assert staging_leftovers(env.archive.staging_dir) == []


def test_the_receipt_says_zipped(env: Env) -> None:
    """The deposit's receipt records that the folder was zipped, as nbank's record does."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec1", TREE), State.DONE)
    [receipt] = [
        r for r in receipts.read_receipts(env.root / "receipts") if r["token"] == item.token
    ]
    assert receipt["zipped"] is True and receipt["archive_path"].endswith("/re/rec1.zip")


def test_the_identifier_is_the_folders_stem_as_in_nbank(env: Env) -> None:
    """A folder named rec-2.v1 is deposited as rec-2 (nbank takes the name's stem)."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec-2.v1", {"x": b"1"}), State.DONE)
    assert item.name == "rec-2" and env.stored() == ["re/rec-2.zip"]


def test_zip_needs_no_directory_policy(env: Env) -> None:
    """An archive that forbids directory resources still takes a folder's zip."""
    assert not env.archive.policy.allow_directories
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec3", {"x": b"1"}), State.DONE)
    assert item.state is State.DONE


def test_an_empty_folder_is_deposited_as_an_empty_zip(env: Env) -> None:
    """An empty folder becomes nbank's empty zip."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "nothing", {}), State.DONE)
    sha1, _ = nbank_sha1(env.root, {}, "nothing")
    assert item.state is State.DONE and item.sha1 == sha1


def test_zip_is_decided_at_claim(env: Env) -> None:
    """The claim journals zipped and placement copy; a later reload to directories:
    resources does not change how the claimed folder is deposited."""
    use_zip(env, placement="rename")
    item = env.until(drop_folder(env.journal, env.spec, "rec4", TREE), State.CLAIMED)
    saved = env.journal.get(item.id)
    assert saved is not None and (saved.zipped, saved.placement) == (True, "copy")
    spec = replace(env.spec, config=replace(env.spec.config, directories="resources"))
    env.steps.inboxes = lambda key: spec if key == spec.key else None
    done = env.until(saved, State.DONE)
    assert env.stored() == ["re/rec4.zip"] and done.zipped


def test_a_folder_with_a_link_is_rejected_naming_it(env: Env) -> None:
    """A folder holding a symbolic link is rejected with the link's path, and moved whole
    to rejected/."""
    use_zip(env)
    item = drop_folder(env.journal, env.spec, "rec5", {"a": b"1"})
    (env.inbox / "rec5" / "link").symlink_to("/etc/passwd")
    item = env.until(item, State.REJECTED)
    reason = json.loads(item.reason_json or "{}")
    assert item.state is State.REJECTED and reason["code"] == "unsupported"
    assert "rec5/link' is a symbolic link" in reason["message"]
    assert (env.inbox / "rejected" / "rec5" / "link").is_symlink()
    assert env.stored() == [] and staging_leftovers(env.archive.staging_dir) == []


def test_a_partial_zip_left_by_a_crash_is_cleaned(env: Env) -> None:
    """A partial zip an interrupted stage left in staging/ is removed by the next stage."""
    use_zip(env)
    item = env.until(drop_folder(env.journal, env.spec, "rec6", TREE), State.CLAIMED)
    leftover = env.archive.staging_dir / f"{STAGED_PREFIX}{item.token}-deadbeef.partial"
    leftover.write_bytes(b"PK half")
    env.until(item, State.DONE)
    assert not leftover.exists() and staging_leftovers(env.archive.staging_dir) == []


# --- kill -9 at every step --------------------------------------------------------------

CRASH_POINTS = (
    "after-claim-rename",
    "after-claim",
    "after-stage",
    "after-lookup",
    "after-register-request",
    "after-register",
    "after-publish-link",
    "after-publish",
    "after-verify",
    "after-receipt-append",
    "after-record",
    "after-release-source",
    "after-release-unlink",
)


def steps_at(root: Path) -> tuple[Steps, Journal, InboxSpec]:
    """Steps over the env fixture's folders under ``root``, opened afresh (as a restarted
    daemon opens them), with folders deposited as zips."""
    from nbankd.archive import opening
    from nbankd.config.model import ArchiveConfig
    from nbankd.deposit import inboxfs

    inbox = root / "inbox"
    registry = open_registry("embedded", embedded_db=root / "registry.sqlite3")
    archive = opening.open_archive(root / "arch")
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    config = InboxConfig(path=inbox, archive="arch", dtype="test-file", directories="zip")
    spec = InboxSpec.of(
        config,
        ArchiveConfig(name="arch", path=archive.path),
        work_id=work_id,
        rejected_id=rejected_id,
    )
    journal = Journal(root / "journal.sqlite3")
    steps = Steps(
        journal=journal,
        registry=registry,
        inboxes=lambda key: spec if key == spec.key else None,
        receipts_dir=root / "receipts",
    )
    return steps, journal, spec


CHILD = """
import sys
from pathlib import Path
from typing import Any
sys.path.insert(0, sys.argv[3])
import importlib.util
spec = importlib.util.spec_from_file_location("zipcrash", sys.argv[4])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
steps, journal, _ = module.steps_at(Path(sys.argv[1]))
steps.drive(journal.get(int(sys.argv[2])))
"""


def finish(steps: Steps, journal: Journal, item_id: int) -> Item:
    """Drives the item to a final state, ignoring backoff delays."""
    item = journal.get(item_id)
    assert item is not None
    for _ in range(40):
        if item.state in FINAL:
            return item
        assert next_step(item.progress, float("inf")) is not None
        item = steps.drive(replace(item, not_before=0.0))
    raise AssertionError(f"no end in sight: {item.state} {item.error_message}")


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_every_folder_ends_in_one_place_after_kill_9(env: Env, point: str) -> None:
    """Killed with SIGKILL at this point, the deposit finishes after restart: the zip
    stored and registered once, the folder gone, nothing left in staging/."""
    item = drop_folder(env.journal, zip_spec(env.spec), "rec7", TREE)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(env.root), str(item.id), str(TESTS), __file__],
        env={**os.environ, "NBANKD_CRASH_AT": point},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    steps, journal, _ = steps_at(env.root)
    try:
        done = finish(steps, journal, item.id)
    finally:
        journal.close()
    sha1, data = nbank_sha1(env.root, TREE)
    assert done.state is State.DONE, done.error_message
    assert env.stored() == ["re/rec7.zip"]
    assert (env.archive.resources_dir / "re" / "rec7.zip").read_bytes() == data
    record = env.registry.get_resource("rec7")
    assert record is not None and record.sha1 == sha1
    assert not (env.inbox / "rec7").exists() and os.listdir(env.inbox / WORK_DIR_NAME) == []
    assert staging_leftovers(env.archive.staging_dir) == []
    tokens = [r["token"] for r in receipts.read_receipts(env.root / "receipts")]
    assert tokens == [item.token]


# --- the daemon -------------------------------------------------------------------------


def test_the_daemon_deposits_a_folder_as_its_zip(daemon_factory: Any) -> None:
    """With directories: zip the daemon deposits a folder moved into the inbox as nbank's
    zip of it, and removes the folder."""
    h = daemon_factory(inbox_options={"directories": "zip"})
    h.start()
    sha1, data = nbank_sha1(h.root, TREE, "session7")
    os.rename(write_tree(h.root / "session7", TREE), h.inbox / "session7")
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    assert (receipt["id"], receipt["sha1"], receipt["zipped"]) == ("session7", sha1, True)
    assert h.archive_files()["session7.zip"].read_bytes() == data
    assert not (h.inbox / "session7").exists()


# --- configuration ----------------------------------------------------------------------

CONFIG = """\
archives:
  - path: archive
inboxes:
  - path: inbox
    dtype: wav
    directories: zip
"""


def test_directories_zip_needs_no_directory_policy(tmp_path: Path) -> None:
    """directories: zip is accepted for an archive whose policy forbids directories."""
    from nbankd.config import check_paths, load_config

    (tmp_path / "archive").mkdir()
    policy = {"allow_directories": False}
    body = {"registry": "https://host/neurobank/", "policy": policy}
    (tmp_path / "archive" / "nbank.json").write_text(json.dumps(body))
    (tmp_path / "nbankd.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "nbankd.yaml")
    [inbox] = config.inboxes
    assert (inbox.directories, inbox.folder_resources) == ("zip", True)
    assert check_paths(config) == []
