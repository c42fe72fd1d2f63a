"""Second hostile review of in-place withdrawals (437389f, 6508cbf): ``placement:
rename``, an input whose mtime moved after registering is hashed again and published
when its bytes match and no program holds it open for writing (it waits while one
does); a changed one goes back, its record left as it is.

Each test names a defect the review found (since mended) or a case it checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.holders import held_open
from fixtures.inplace_env import FolderEnv, holds_the_records_bytes, touch_later
from fixtures.seam_hooks import Crash, crash_at
from fixtures.steps_env import Env
from nbankd.archive import durable
from nbankd.deposit import release
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.watch import writers


def _work(inbox: Path, item: Item) -> Path:
    return inbox / ".nbank" / item.token


# -- folders: the open-for-writing check ------------------------------------------------


def test_a_folder_whose_file_a_program_rewrote_and_still_holds_open_is_not_published(
    folder_env: FolderEnv,
) -> None:
    """A folder input one of whose files a program rewrote with the same bytes (its
    mtime moved) and still holds open for writing is not published: that program's
    next write must never change the archive's copy."""
    item, files = folder_env.drop_folder("held", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    inside = _work(folder_env.inbox, item) / "sub" / "b.dat"
    fd = os.open(inside, os.O_RDWR)  # the program (its cwd in the session folder)
    try:
        os.pwrite(fd, files["sub/b.dat"], 0)  # the same bytes written again
        touch_later(inside)  # the mtime moved (as any write does, coarse clocks aside)
        item, outcome = folder_env.steps.run(item, Step.PUBLISH)
        os.pwrite(fd, b"the program's next write", 0)
    finally:
        os.close(fd)
    assert holds_the_records_bytes(folder_env.stored_folder(item), item.sha1), (
        f"published ({outcome.kind}) while a file of it was open for writing; "
        "the archive's copy no longer has the record's bytes"
    )


def test_a_folder_held_open_at_publish_is_told_as_waiting_not_as_gone_back(
    folder_env: FolderEnv,
) -> None:
    """A registered folder whose file was written again and is still held open for
    writing at publish waits in the work folder, retried; what it is told must not say
    it went back to the inbox (it did not)."""
    item, files = folder_env.drop_folder("told", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    inside = _work(folder_env.inbox, item) / "a.dat"
    fd = os.open(inside, os.O_RDWR)
    try:
        os.pwrite(fd, files["a.dat"][:1], 0)
        touch_later(inside)
        item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    finally:
        os.close(fd)
    assert outcome.kind == "transient" and inside.exists()
    assert "goes back to the inbox" not in outcome.message, outcome.message


def test_a_folder_opened_for_writing_after_its_claim_is_not_published(
    folder_env: FolderEnv,
) -> None:
    """A folder input one of whose files a program (its cwd inside) opened for writing
    after the claim, nothing written yet, is not published: that program's first write
    must never change the archive's copy (predates 437389f: the unchanged path)."""
    item, _files = folder_env.drop_folder("opened", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    inside = _work(folder_env.inbox, item) / "a.dat"
    fd = os.open(inside, os.O_RDWR)
    try:
        item, outcome = folder_env.steps.run(item, Step.PUBLISH)
        os.pwrite(fd, b"the program's first write", 0)
    finally:
        os.close(fd)
    assert holds_the_records_bytes(folder_env.stored_folder(item), item.sha1), (
        f"published ({outcome.kind}) while a file of it was open for writing"
    )


def test_a_folder_written_after_its_hash_and_before_its_rename_is_not_published_changed(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder input whose mtime moved is hashed again; a program with its cwd inside
    writing one of its files after that hash and before the rename into resources/
    must not get its bytes published under the record."""
    item, files = folder_env.drop_folder("raced", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    work = _work(folder_env.inbox, item)
    touch_later(work / "a.dat")  # the mtime moved: hashed again
    real = durable.hash_tree

    def hash_then_write(*args: object, **kwargs: object) -> tuple[str, int]:
        answer = real(*args, **kwargs)  # type: ignore[arg-type]
        with open(work / "a.dat", "r+b") as program:  # same size, other bytes
            program.write(os.urandom(len(files["a.dat"])))
        return answer

    monkeypatch.setattr(durable, "hash_tree", hash_then_write)
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert holds_the_records_bytes(folder_env.stored_folder(item), item.sha1), (
        f"published ({outcome.kind}) with bytes written after the hash"
    )


# -- files: writers the kernel cannot tell about --------------------------------------


def test_a_rewritten_file_whose_writers_cannot_be_told_is_not_published(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where leases cannot tell (NFSv4 without delegation, CIFS, no CAP_LEASE), a file
    rewritten after registering by a program that still holds it open is not
    published: that program's next write must never change the archive's copy."""
    data = os.urandom(20_000)
    item = env.until(env.drop("nfs.dat", data, placement="rename", verify=False), State.REGISTERED)
    work = _work(env.inbox, item)
    monkeypatch.setattr(writers, "_untrusted", {os.stat(work).st_dev})  # calibrate's verdict
    fd = os.open(work, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        touch_later(work)
        item = env.step(item, Step.PUBLISH)
        os.pwrite(fd, b"the program's next write", 0)
    finally:
        os.close(fd)
    assert item.name and item.target_name
    target = env.archive.stored_file(item.name, item.target_name)
    assert holds_the_records_bytes(target, item.sha1), (
        f"published ({item.state}) though no one could tell whether it was still held"
    )


def test_a_file_written_during_its_rehash_is_not_published_with_the_new_bytes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose mtime moved is hashed again; bytes changed after that hash and
    before the link (same size) must not be published under the record: the identity
    journaled as hashed must be the one the hash read."""
    data = os.urandom(20_000)
    item = env.until(env.drop("race.dat", data, placement="rename", verify=False), State.REGISTERED)
    work = _work(env.inbox, item)
    touch_later(work)
    real = release.copy_hashing

    def hash_then_write(src: int, dst: object, **kwargs: object) -> object:
        answer = real(src, dst, **kwargs)  # type: ignore[arg-type]
        os.pwrite(src_rw := os.open(work, os.O_WRONLY), os.urandom(len(data)), 0)
        os.close(src_rw)
        return answer

    monkeypatch.setattr(release, "copy_hashing", hash_then_write)
    item = env.step(item, Step.PUBLISH)
    assert item.name and item.target_name
    target = env.archive.stored_file(item.name, item.target_name)
    assert holds_the_records_bytes(target, item.sha1), (
        f"published ({item.state}) with bytes written after the hash"
    )


def test_a_file_swapped_for_another_inode_after_its_rehash_is_not_published(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose mtime moved is hashed again; replaced in the work folder by another
    file of the same size after that hash, the other file must not be linked into
    resources/ under the record."""
    data = os.urandom(20_000)
    item = env.until(env.drop("swap.dat", data, placement="rename", verify=False), State.REGISTERED)
    work = _work(env.inbox, item)
    touch_later(work)
    real = release.copy_hashing

    def hash_then_swap(src: int, dst: object, **kwargs: object) -> object:
        answer = real(src, dst, **kwargs)  # type: ignore[arg-type]
        other = work.with_name("other")
        other.write_bytes(os.urandom(len(data)))
        os.rename(other, work)
        return answer

    monkeypatch.setattr(release, "copy_hashing", hash_then_swap)
    item = env.step(item, Step.PUBLISH)
    assert item.name and item.target_name
    target = env.archive.stored_file(item.name, item.target_name)
    assert holds_the_records_bytes(target, item.sha1), (
        f"published ({item.state}) another inode than the one hashed"
    )


# -- the duplicate verdict -----------------------------------------------------------


@pytest.mark.parametrize("auto", [True, False])
def test_a_held_touched_file_waits_and_is_stored_under_its_record(env: Env, auto: bool) -> None:
    """A file touched and still held open at publish is not put back (deposited again,
    an automatic identifier would be refused as a duplicate of the record no copy
    serves): it waits, and once closed its bytes are stored under its record."""
    if auto:
        env = env.auto_ids()
    data = os.urandom(12_000)
    item = env.until(env.drop("held.wav", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    touch_later(work)
    with held_open(work, "r+b"):
        item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    item = env.until(item, State.DONE)
    assert item.state is State.DONE and item.name and item.target_name
    assert env.archive.stored_file(item.name, item.target_name).read_bytes() == data


# -- crash replays --------------------------------------------------------------------


@pytest.mark.parametrize("point", ["after-publish-link", "after-publish"])
def test_a_crash_around_the_publish_then_a_touch_replays_to_the_records_bytes(
    env: Env, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """Killed after the link (or after the work name's removal) and before the save, the
    entry then touched: the replay publishes, the stored copy the record's bytes."""
    data = os.urandom(15_000)
    item = env.until(env.drop("crash.dat", data, placement="rename"), State.REGISTERED)
    crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        env.steps.run(item, Step.PUBLISH)
    assert item.name and item.target_name
    target = env.archive.stored_file(item.name, item.target_name)
    work = _work(env.inbox, item)
    touch_later(work if work.exists() else target)
    item = env.until(env.journal.get(item.id) or item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert target.read_bytes() == data and not work.exists()


def test_a_crash_after_the_link_then_held_and_touched_stays_unpublished_but_whole(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the link, the entry then touched and held open for writing: the
    replay neither puts back the stored inode nor reports it deposited; it stays, whole."""
    data = os.urandom(15_000)
    item = env.until(env.drop("kept.dat", data, placement="rename"), State.REGISTERED)
    crash_at(monkeypatch, "after-publish-link")
    with pytest.raises(Crash):
        env.steps.run(item, Step.PUBLISH)
    work = _work(env.inbox, item)
    touch_later(work)
    with held_open(work, "r+b"):
        item = env.step(env.journal.get(item.id) or item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    assert work.read_bytes() == data and not (env.inbox / "kept.dat").exists()
