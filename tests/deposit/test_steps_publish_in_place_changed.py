"""With ``placement: rename`` the input itself becomes the stored copy: publishing
checks that it still has the content that was hashed and registered, so ``resources/``
never holds bytes other than the record's, with or without ``verify``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.holders import held_open
from fixtures.inplace_env import FolderEnv, make_env
from fixtures.steps_env import Env
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import State, Step


def _work(inbox: Path, token: str) -> Path:
    return inbox / ".nbank" / token


@pytest.mark.parametrize("verify", [False, True])
def test_a_file_written_after_its_registration_is_not_published(env: Env, verify: bool) -> None:
    """Bytes appended between registration and publishing keep the input out of
    ``resources/``: the input, whole, goes back into the inbox with the reason; the
    record is left as it was."""
    first, more = os.urandom(30_000), os.urandom(3_000)
    item = env.until(
        env.drop("inplace.dat", first, placement="rename", verify=verify), State.REGISTERED
    )
    work = _work(env.inbox, item.token)
    with open(work, "ab") as writer:
        writer.write(more)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.RETURNING, "changed")
    assert "changed after it was registered as inplace" in (item.error_message or "")
    assert env.stored() == []
    assert item.name is not None
    record = env.registry.get_resource(item.name)
    assert record is not None and record.locations == ("arch",)
    item = env.step(item, Step.PUT_BACK)
    assert item.state is State.RETURNED
    assert (env.inbox / "inplace.dat").read_bytes() == first + more
    assert not work.exists()


def test_a_withdrawn_input_is_never_reported_deposited(env: Env) -> None:
    """Put back after its location was withdrawn, the input has no URL and is not
    counted registered: `nbankctl deposit` reports it as an error, never with an id."""
    item = env.until(env.drop("told.dat", os.urandom(9_000), placement="rename"), State.REGISTERED)
    with open(_work(env.inbox, item.token), "ab") as writer:
        writer.write(b"more")
    item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    assert (item.state, item.url, item.progress.registered) == (State.RETURNED, None, False)
    told = manual.record(item)
    assert "id" not in told and told["error"]


def test_a_changed_input_goes_back_though_its_identifier_holds_a_stored_copy(
    env: Env,
) -> None:
    """Something stored under the identifier already (another input's copy) does not
    keep a changed input in the work folder: it goes back whole, the stored entry and
    the record left alone."""
    first = os.urandom(9_000)
    item = env.until(env.drop("held.dat", first, placement="rename"), State.REGISTERED)
    assert item.name is not None
    stub = env.archive.resources_dir / item.name[:2]
    stub.mkdir(exist_ok=True)
    (stub / item.name).write_bytes(b"another entry under this identifier")
    with open(_work(env.inbox, item.token), "ab") as writer:
        writer.write(b"more")
    item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    assert item.state is State.RETURNED
    assert (env.inbox / "held.dat").read_bytes() == first + b"more"
    assert (stub / item.name).read_bytes() == b"another entry under this identifier"
    record = env.registry.get_resource(item.name)
    assert record is not None and record.locations == ("arch",)


@pytest.mark.parametrize("how", ["touch", "same bytes"])
def test_an_input_whose_mtime_alone_moved_is_published(env: Env, how: str) -> None:
    """Its size and bytes the same, an input whose mtime moved after registering (a
    touch, the same bytes written again) is hashed again and published, not sent back
    (deposited again, an automatic identifier would be refused as a duplicate of a
    record no copy serves)."""
    data = os.urandom(20_000)
    item = env.until(env.drop("touched.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item.token)
    if how == "touch":
        st = os.stat(work)
        os.utime(work, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    else:
        work.write_bytes(data)
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED, (item.error_code, item.error_message)
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data


def test_a_mode_change_alone_does_not_hold_publishing(env: Env) -> None:
    """A publish tried again after an earlier attempt set the stored mode (ctime moved,
    content the same) goes through: only device, inode, size and mtime are compared."""
    data = os.urandom(20_000)
    item = env.until(env.drop("moded.dat", data, placement="rename"), State.REGISTERED)
    os.chmod(_work(env.inbox, item.token), 0o640)
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data


def test_a_folder_that_gained_a_file_after_its_registration_is_not_published(
    tmp_path: Path,
) -> None:
    """A folder deposited in place that gained a file after registration is not stored:
    publishing withdraws the deposit, to send the folder back whole."""
    env: FolderEnv = make_env(tmp_path / "data", tmp_path / "state")
    try:
        item, files = env.drop_folder("session2", verify=False)
        item = env.until(item, State.REGISTERED)
        work = _work(env.inbox, item.token)
        (work / "sub" / "late.dat").write_bytes(b"written after registration")
        item, outcome = env.steps.run(item, Step.PUBLISH)
        assert (outcome.kind, outcome.code) == ("withdrawn", "changed")
        assert not any((env.archive_root / "resources").rglob("*.dat"))
        for rel, data in files.items():
            assert (work / rel).read_bytes() == data
    finally:
        env.journal.close()
        env.registry.close()


def test_a_put_back_input_under_its_taken_identifier_is_rejected_with_a_hint(
    env: Env,
) -> None:
    """Deposited again after it was put back, the changed input finds its identifier
    registered for the bytes it no longer holds: it is rejected whole (name-taken,
    with what to do), never published under that record."""
    item = env.until(env.drop("again.dat", os.urandom(9_000), placement="rename"), State.REGISTERED)
    with open(_work(env.inbox, item.token), "ab") as writer:
        writer.write(b"more")
    item = env.until(env.step(item, Step.PUBLISH), State.RETURNED)
    kept = (env.inbox / "again.dat").read_bytes()
    again = env.journal_existing("again.dat", placement="rename")
    again = env.until(again, State.DONE)
    assert again.state is State.REJECTED
    reason = json.loads(again.reason_json or "{}")
    assert (reason["code"], reason["hint"]) == (
        "name-taken",
        "rename the file, give an 'id' in a sidecar, or use auto_id",
    )
    assert (env.inbox / "rejected" / "again.dat").read_bytes() == kept
    assert env.stored() == []


def test_a_touched_input_still_open_for_writing_waits_until_closed(env: Env) -> None:
    """Its bytes the same but its mtime moved and a program still holding it open for
    writing, an input is not published (the program could change the stored copy): it
    waits in the work folder, whole, and is published once closed."""
    data = os.urandom(20_000)
    item = env.until(env.drop("busy.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item.token)
    st = os.stat(work)
    os.utime(work, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with held_open(work, "r+b"):
        item = env.step(item, Step.PUBLISH)
        assert (item.state, item.error_code) == (State.REGISTERED, "changed")
        assert env.stored() == [] and work.read_bytes() == data
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    [stored] = env.stored()
    assert (env.archive.resources_dir / stored).read_bytes() == data
