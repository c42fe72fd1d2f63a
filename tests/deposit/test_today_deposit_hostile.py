"""Hostile review of the deposit path's changes of 015fe25, dccd8cb, a626c64 and 4e5eb11:
sidecars journaled only once settled (and checked again at the claim), a plain input
checked unchanged since it settled at its claim, a ``placement: rename`` input whose
identifier, bytes and name another input stored first kept until that copy is read
back (``already``), and the metadata readers' bounded pipes.

Findings (each test fails on the code it was written against):

- a sidecar whose name an ``ignore`` pattern hides from the scan (``*.json`` and a
  ``NAME.nbank.json``) is never seen settle, so every intent of its input answers
  HOLD: the input is never deposited, ``explain`` says "ready: the next scan claims
  it" for ever, and the inbox is rescanned every 0.2 s
  (:func:`nbankd.watch.settle.sidecar_for`, :meth:`InboxScanning._start_items`);
- a ``placement: rename`` input kept as ``already`` whose stored copy then fails its
  read-back (removed by the other input's verify, as verify's comment foresees) is
  sent to stage again, but publishing had already given it the archive's mode and
  group (its ctime moved): the stage step calls it changed, and, registered, it is
  retried for ever; the input stays in the work folder, the record has no file
  (files and folders);
- an input found changed at its claim (written to after it settled, the lane busy)
  is cancelled with nothing asking for a rescan: its new settle ended while its item
  was in flight, so it waits for ``rescan_every`` (explain: "ready: the next scan
  claims it");
- a sidecar created between the intent and the claim is ignored: the input is
  deposited without its metadata and the sidecar is left behind in the inbox (a
  sidecar removed or rewritten in the same window sends the input back);
- a claim replayed after a kill between the sidecar's move into the work folder and
  its check takes whatever sits under the sidecar's work name as the sidecar the scan
  saw settle (no device and inode comparison).

Guards (pass; labelled ``test_guard_``): an ``already`` rename input (a file, verify
on or off) killed at each point from publish to release ends deposited once, its
input removed only by the release; a folder likewise (verify off); a journal row of an
older release (no sidecar identity, no size) still takes its sidecar as found; a claim
replayed after a crash that took the very sidecar seen goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, scans, wait_for
from fixtures.inplace_env import FolderEnv
from fixtures.seam_hooks import Crash, crash_at
from fixtures.steps_env import Env
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step, advance, next_step

RECORDING = b"a recording and the sidecar that describes it\n" * 40


# -- helpers ------------------------------------------------------------------------------


def _metadata(h: DaemonHarness, data: bytes) -> dict[str, Any]:
    """The registry's metadata of the one record holding ``data``."""
    with h.open_registry() as reg:
        [found] = reg.search(sha1=hashlib.sha1(data).hexdigest())
        record = reg.get_resource(found.name)
    assert record is not None
    return dict(record.metadata)


def _journal(h: DaemonHarness) -> list[tuple[bytes, str, str | None]]:
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in db.execute("SELECT relpath, state, error_code FROM items")]
    finally:
        db.close()


def _drive(run: Any, journal: Any, item: Item, limit: int = 30) -> Item:
    """Runs ``item``'s steps (each saved as the daemon saves it, backoffs ignored) until
    it is final or ``limit`` steps have run; returns the item as saved last."""
    for _ in range(limit):
        step = next_step(item.progress, float("inf"))
        if step is None:
            break
        item, outcome = run(item, step)
        item = journal.save(item.with_progress(advance(item.progress, step, outcome, 0.0)))
    return item


def _receipts(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted((root / "receipts").glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def _plant_identical(target: Path, data: bytes | dict[str, bytes]) -> None:
    """Stores at ``target`` what another input (another rig) with the same identifier,
    name and bytes published first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        target.write_bytes(data)
        return
    for rel, content in data.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# -- findings: sidecars -------------------------------------------------------------------


def test_a_sidecar_hidden_by_an_ignore_pattern_never_holds_its_input_for_ever(
    daemon_factory: Any,
) -> None:
    """An input whose ``NAME.nbank.json`` an ignore pattern (``*.json``) hides from the
    scan is deposited (or rejected): its intent is not held for a sidecar the scan can
    never see settle, nor the inbox rescanned back to back meanwhile."""
    h = daemon_factory(
        inbox_options={
            "settle_seconds": 0.3,
            "rescan_every": "1h",
            "ignore": ["*.tmp", "*.part", ".*", "*.json"],
        }
    )
    h.start()
    try:
        (h.inbox / "rec.dat.nbank.json").write_text('{"metadata": {"bird": "b1"}}')
        h.drop("rec.dat", RECORDING)
        try:
            h.wait_settled(1, timeout=60)
        except AssertionError:
            said = nbankctl(h, "explain", str(h.inbox / "rec.dat")).stdout.strip()
            pytest.fail(
                f"rec.dat never deposited; {scans(h)} scans of its inbox meanwhile "
                f"(rescan_every 1h); explain: {said!r}"
            )
    finally:
        h.stop()


def test_a_sidecar_written_between_the_intent_and_the_claim_goes_with_its_input(
    daemon_factory: Any,
) -> None:
    """A sidecar created after rec.dat's intent was journaled (no sidecar then), before
    its claim (a busy lane), is not left behind: rec.dat is deposited with its metadata
    (as when the sidecar is rewritten or removed in that window: it settles again)."""
    h = daemon_factory(inbox_options={"auto_id": True, "settle_seconds": 0.5})
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    sidecar = h.inbox / "rec.dat.nbank.yaml"
    try:
        h.drop("rec.dat", RECORDING)
        wait_for(Path(f"{go}.reached").exists, 30, "rec.dat's intent to be journaled")
        sidecar.write_text("metadata:\n  bird: b7\n")
        go.touch()
        h.wait_settled(1, timeout=20)
    finally:
        go.touch()
        h.stop()
    # what is left in the inbox besides the daemon's own dotfiles (its liveness canary)
    left = sorted(p.name for p in h.inbox.iterdir() if p.is_file() and p.name[0] != ".")
    assert (_metadata(h, RECORDING), left) == ({"bird": "b7"}, [])


def test_a_replayed_claim_takes_only_the_sidecar_the_scan_saw(env: Env) -> None:
    """Killed after moving the sidecar into the work folder and before checking it
    (another file had been swapped in between the check and the move): the replayed
    claim does not read the file under the sidecar's work name as the sidecar that
    settled; the input goes back (sidecar-changed)."""
    item, seen_sidecar = _journaled_with_sidecar(env, b"metadata: {bird: settled}\n")
    work = env.inbox / ".nbank"
    # the state that kill leaves: the input claimed, a swapped-in file taken as sidecar
    os.rename(env.inbox / "rec.dat", work / item.token)
    os.rename(seen_sidecar, env.root / "the-sidecar-that-settled.yaml")
    (work / f"{item.token}.sidecar.yaml").write_bytes(b"metadata: {bird: swapped-in}\n")
    item = env.step(item, Step.CLAIM)
    assert "swapped-in" not in (item.metadata_json or ""), item.metadata_json
    assert (item.state, item.error_code) == (State.RETURNING, "sidecar-changed")


def _journaled_with_sidecar(env: Env, text: bytes) -> tuple[Item, Path]:
    """rec.dat and rec.dat.nbank.yaml in the inbox, journaled as a scan does today (the
    input's size and times, the settled sidecar's identity)."""
    (env.inbox / "rec.dat").write_bytes(RECORDING)
    sidecar = env.inbox / "rec.dat.nbank.yaml"
    sidecar.write_bytes(text)
    st, side = os.lstat(env.inbox / "rec.dat"), os.lstat(sidecar)
    seen = {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "sidecar": {
            "dev": side.st_dev,
            "ino": side.st_ino,
            "size": side.st_size,
            "mtime_ns": side.st_mtime_ns,
            "ctime_ns": side.st_ctime_ns,
        },
    }
    item = env.journal.add(
        token=os.urandom(16).hex(),
        inbox=env.spec.key,
        relpath=b"rec.dat",
        kind="file",
        archive=env.spec.archive_name,
        archive_path=str(env.archive.path),
        placement="copy",
        verify=1,
        sidecar_relpath=b"rec.dat.nbank.yaml",
        seen_identity=json.dumps(seen),
        created=time.time(),
        updated=0.0,
    )
    return item, sidecar


# -- findings: an input changed since it settled ------------------------------------------


def test_an_input_changed_before_its_claim_is_deposited_without_waiting_for_a_rescan(
    daemon_factory: Any,
) -> None:
    """b.dat, written to after its intent while the lane was busy with a.dat, and seen
    settled again by a scan while its item was still in flight, is deposited once that
    item is cancelled, not left until the next periodic rescan (here an hour away)."""
    h = daemon_factory(inbox_options={"settle_seconds": 0, "rescan_every": "1h"})
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "stage-copied", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        h.drop("a.dat", os.urandom(3000))  # the lane busy with it: held while it copies
        wait_for(Path(f"{go}.reached").exists, 30, "a.dat to be copying")
        h.drop("b.dat", RECORDING)
        wait_for(lambda: [r[0] for r in _journal(h)] == [b"a.dat", b"b.dat"], 30, "b.dat's intent")
        with open(h.inbox / "b.dat", "ab") as writer:  # the rig was not done with it
            writer.write(b"the last block\n")
        assert nbankctl(h, "queue").returncode == 0  # an admin's queue: a scan, waited for
        go.touch()
        wait_for(lambda: (b"b.dat", "cancelled", "gone") in _journal(h), 30, "b.dat's claim")
        try:
            h.wait_settled(2, timeout=60)
        except AssertionError:
            said = nbankctl(h, "explain", str(h.inbox / "b.dat")).stdout.strip()
            pytest.fail(f"b.dat not deposited 60 s after its claim was cancelled: {said!r}")
    finally:
        go.touch()
        h.stop()
    assert sorted(r["outcome"] for r in h.receipts()) == ["deposited", "deposited"]


# -- findings: an already-deposited rename input whose stored copy fails its read-back ----


def test_a_rename_input_whose_found_copy_is_removed_before_its_read_back_is_deposited(
    env: Env,
) -> None:
    """A placement: rename input finding its identifier, name and bytes stored by
    another input (already) is published itself when that stored copy is gone by its
    read-back (the other input's verify removed it): it ends deposited, its bytes in
    resources/, not retried for ever in the work folder."""
    data = os.urandom(20_000)
    item = env.until(env.drop("rec.dat", data, placement="rename"), State.REGISTERED)
    assert item.name is not None and item.target_name is not None
    target = env.archive.resources_dir / item.name[:2] / item.target_name
    _plant_identical(target, data)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.already) == (State.PUBLISHED, True)
    target.unlink()  # the other input's read-back failed: it removed its copy
    item = _drive(env.steps.run, env.journal, item)
    assert (item.state, item.error_code) == (State.DONE, None), item.error_message
    assert target.read_bytes() == data
    assert os.listdir(env.inbox / ".nbank") == []


def test_a_rename_folder_whose_found_copy_is_removed_before_its_read_back_is_deposited(
    folder_env: FolderEnv,
) -> None:
    """The same for a folder resource published in place: its found copy removed before
    its read-back, the folder itself is deposited, not retried for ever."""
    env = folder_env
    item, files = env.drop_folder("rec1")
    item = env.until(item, State.REGISTERED)
    target = env.stored_folder(item)
    _plant_identical(target, files)
    item, outcome = env.steps.run(item, Step.PUBLISH)
    item = env.journal.save(item.with_progress(advance(item.progress, Step.PUBLISH, outcome, 0)))
    assert (item.state, item.already) == (State.PUBLISHED, True)
    shutil.rmtree(target)
    item = _drive(env.steps.run, env.journal, item)
    assert (item.state, item.error_code) == (State.DONE, None), item.error_message
    assert {rel: (target / rel).read_bytes() for rel in files} == files
    assert os.listdir(env.inbox / ".nbank") == []


# -- guards (pass) ------------------------------------------------------------------------

_ALREADY_POINTS = [
    "after-publish-link",
    "after-publish",
    "after-verify",
    "after-receipt-append",
    "after-release-source",
]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("point", _ALREADY_POINTS)
def test_guard_an_already_rename_input_killed_at_each_point_is_deposited_once(
    env: Env, monkeypatch: pytest.MonkeyPatch, point: str, verify: bool
) -> None:
    """Guard: a rename input whose copy another input stored first, killed at each point
    from its publish to its release, ends already-deposited once: the stored copy
    untouched, the work folder empty, its input present until the release."""
    data = os.urandom(12_000)
    item = env.until(env.drop("rec.dat", data, placement="rename", verify=verify), State.REGISTERED)
    assert item.name is not None and item.target_name is not None
    target = env.archive.resources_dir / item.name[:2] / item.target_name
    _plant_identical(target, data)
    planted = os.lstat(target).st_ino
    crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        env.until(item, State.DONE)
    item = env.journal.get(item.id) or item
    if item.state not in (State.RECORDED, State.DONE):
        assert (env.inbox / ".nbank" / item.token).exists()
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and item.already
    assert [r["outcome"] for r in _receipts(env.root)] == ["already-deposited"]
    assert (os.lstat(target).st_ino, target.read_bytes()) == (planted, data)
    assert os.listdir(env.inbox / ".nbank") == []


def test_guard_an_already_rename_folder_without_verify_is_released_after_its_read_back(
    folder_env: FolderEnv,
) -> None:
    """Guard: a folder placed by rename whose copy another input stored first (verify
    off) keeps its input through publish, is read back, recorded and released."""
    env = folder_env
    item, files = env.drop_folder("rec1", verify=False)
    item = env.until(item, State.REGISTERED)
    target = env.stored_folder(item)
    _plant_identical(target, files)
    item, outcome = env.steps.run(item, Step.PUBLISH)
    item = env.journal.save(item.with_progress(advance(item.progress, Step.PUBLISH, outcome, 0)))
    assert item.already and (env.inbox / ".nbank" / item.token).is_dir()
    item = env.until(item, State.DONE)
    assert item.state is State.DONE
    assert {rel: (target / rel).read_bytes() for rel in files} == files
    assert os.listdir(env.inbox / ".nbank") == []


def test_guard_an_older_journal_row_takes_its_sidecar_as_found(env: Env) -> None:
    """Guard: a row journaled by an older release (seen_identity without the sidecar's
    identity nor the input's size) takes the sidecar as it finds it at the claim."""
    (env.inbox / "old.dat").write_bytes(RECORDING)
    (env.inbox / "old.dat.nbank.yaml").write_text("metadata: {bird: b1}\n")
    item = env.journal_existing("old.dat", sidecar=b"old.dat.nbank.yaml")
    (env.inbox / "old.dat.nbank.yaml").write_text("metadata: {bird: b2}\n")
    item = env.step(item, Step.CLAIM)
    assert item.state is State.CLAIMED
    assert json.loads(item.metadata_json or "{}") == {"bird": "b2"}


def test_guard_a_replayed_claim_goes_on_with_the_very_sidecar_it_took(env: Env) -> None:
    """Guard: killed after taking the sidecar the scan saw (its ctime moved by the
    move), the replayed claim goes on with it."""
    item, seen_sidecar = _journaled_with_sidecar(env, b"metadata: {bird: settled}\n")
    work = env.inbox / ".nbank"
    os.rename(env.inbox / "rec.dat", work / item.token)
    os.rename(seen_sidecar, work / f"{item.token}.sidecar.yaml")
    item = env.step(item, Step.CLAIM)
    assert item.state is State.CLAIMED, (item.error_code, item.error_message)
    assert json.loads(item.metadata_json or "{}") == {"bird": "settled"}
