"""Third hostile review of in-place publishing (a9c6c6e): ``placement: rename``, an
input a program holds open for writing is never published (it waits, whole); a
touched input whose writers cannot be told is journaled with its new identity and
published at the next attempt if it stays unchanged.

Each test names a defect the review found (since mended) or a case it checked."""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from pathlib import Path

import pytest

from fixtures.holders import held_open, holding
from fixtures.inplace_env import FolderEnv, holds_the_records_bytes, touch_later
from fixtures.steps_env import Env
from nbankd.archive.verify import stored_sha1
from nbankd.deposit import release
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.deposit.release import ReleaseSteps
from nbankd.watch import writers


def _work(inbox: Path, item: Item) -> Path:
    return inbox / ".nbank" / item.token


def _target(env: Env, item: Item) -> Path:
    assert item.name and item.target_name
    return env.archive.stored_file(item.name, item.target_name)


# -- check 2: the identity adopted when whether a program holds it cannot be told -------


def test_a_file_rewritten_between_the_rehash_and_its_journaled_identity_is_never_published(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers untold, a touched file hashed again (same bytes, unchanged during the
    hash) then rewritten (same size, other bytes) before its new identity is read must
    not be published at the next attempt: the identity journaled must be the one the
    hash was checked against, not a later stat that already shows the rewrite."""
    data = os.urandom(20_000)
    item = env.until(env.drop("late.dat", data, placement="rename", verify=False), State.REGISTERED)
    work = _work(env.inbox, item)
    monkeypatch.setattr(writers, "_untrusted", {os.stat(work).st_dev})  # calibrate's verdict
    touch_later(work)
    real = release.stat_fields
    looks = itertools.count(1)

    def look_then_rewrite(st: os.stat_result) -> dict[str, int]:
        seen = real(st)
        if next(looks) == 2:  # the check's closing look, after the re-hash
            with open(work, "r+b") as program:  # same size, other bytes; closed again
                program.write(os.urandom(len(data)))
        return seen

    monkeypatch.setattr(release, "stat_fields", look_then_rewrite)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    monkeypatch.setattr(release, "stat_fields", real)
    item = env.step(item, Step.PUBLISH)  # "published if it stays unchanged": it did not
    assert holds_the_records_bytes(_target(env, item), item.sha1), (
        f"published ({item.state}) bytes written before this attempt, not the record's"
    )


def test_a_folder_rewritten_between_the_rehash_and_its_journaled_identity_is_never_published(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a folder: a file of it rewritten (same size, other bytes) right after
    the re-hash's closing walk must not have the folder published with those bytes at
    the next attempt."""
    item, files = folder_env.drop_folder("late", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    work = _work(folder_env.inbox, item)
    monkeypatch.setattr(writers, "_untrusted", {os.stat(work).st_dev})
    touch_later(work / "a.dat")
    real = release.identity_fields
    looks = itertools.count(1)

    def look_then_rewrite(folder: Path) -> dict[str, int]:
        seen = real(folder)
        if next(looks) == 2:  # the check's closing walk, after the re-hash
            with open(work / "a.dat", "r+b") as program:
                program.write(os.urandom(len(files["a.dat"])))
        return seen

    monkeypatch.setattr(release, "identity_fields", look_then_rewrite)
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert outcome.kind == "transient", outcome
    item = folder_env.journal.save(item)
    monkeypatch.setattr(release, "identity_fields", real)
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert holds_the_records_bytes(folder_env.stored_folder(item), item.sha1), (
        f"published ({outcome.kind}) a folder with bytes written before this attempt"
    )


def test_an_untold_touched_file_left_alone_is_published_at_the_next_attempt(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers untold, a touched file with the same bytes waits one attempt (transient,
    not put back) and, unchanged meanwhile, is then stored with its record's bytes."""
    data = os.urandom(20_000)
    item = env.until(env.drop("calm.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    monkeypatch.setattr(writers, "_untrusted", {os.stat(work).st_dev})
    touch_later(work)
    item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed") and work.exists()
    item = env.until(item, State.DONE)
    assert item.state is State.DONE, (item.error_code, item.error_message)
    assert _target(env, item).read_bytes() == data


# -- check 1: held open for writing, on every path -------------------------------------


def test_an_unchanged_file_held_open_for_writing_waits_and_is_published_once_closed(
    env: Env,
) -> None:
    """A file unchanged since its claim (SAME) but held open for writing by another
    process at publish is not published; once closed, it is, with its record's bytes."""
    data = os.urandom(20_000)
    item = env.until(env.drop("same.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    with held_open(work, "r+b"):
        item = env.step(item, Step.PUBLISH)
        assert (item.state, item.error_code) == (State.REGISTERED, "changed")
        assert env.stored() == [] and work.read_bytes() == data
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    assert _target(env, item).read_bytes() == data


def test_a_file_whose_ctime_alone_moved_and_held_open_for_writing_waits(env: Env) -> None:
    """A file whose ctime alone moved (UNSURE: a mode change) and held open for writing
    by another process is not published."""
    data = os.urandom(20_000)
    item = env.until(env.drop("mode.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    os.chmod(work, 0o640)
    with held_open(work, "r+b"):
        item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    assert env.stored() == [] and work.read_bytes() == data


def test_a_file_mapped_writable_by_a_program_that_closed_its_descriptor_waits(
    env: Env,
) -> None:
    """A program that mapped the file shared and writable, then closed its descriptor,
    can still change it: the file is not published while the mapping lives."""
    data = os.urandom(20_000)
    item = env.until(env.drop("mapped.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    script = (
        "import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
        "m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE); "
        "os.close(fd); print('open', flush=True); sys.stdin.read()"
    )
    with holding([sys.executable, "-c", script, str(work)]):
        item = env.step(item, Step.PUBLISH)
    assert (item.state, item.error_code) == (State.REGISTERED, "changed")
    assert env.stored() == []


def test_the_daemons_own_read_descriptor_does_not_keep_a_file_waiting(env: Env) -> None:
    """A read-only descriptor of this process on the input (as a hashing read, or one
    a previous attempt would have left) does not count as a writer: it is published."""
    data = os.urandom(20_000)
    item = env.until(env.drop("ours.dat", data, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    fd = os.open(work, os.O_RDONLY)
    try:
        item = env.step(item, Step.PUBLISH)
    finally:
        os.close(fd)
    assert item.state is State.PUBLISHED, (item.error_code, item.error_message)
    assert _target(env, item).read_bytes() == data


def test_held_answers_through_the_inboxfs_descriptor_path(env: Env) -> None:
    """``_held`` of a work entry named through /proc/self/fd/N (InboxFS.at) tells a
    file held open for writing by another process (True) from a closed one (False)."""
    data = os.urandom(4_000)
    item = env.until(env.drop("fdpath.dat", data, placement="rename"), State.REGISTERED)
    with env.spec.open_fs() as fs:
        work = fs.at(fs.work, item.token)
        assert str(work).startswith("/proc/self/fd/")
        assert ReleaseSteps._held(work, False) is False
        with held_open(_work(env.inbox, item), "ab"):
            assert ReleaseSteps._held(work, False) is True


def test_held_of_a_fifo_or_link_at_the_work_name_cannot_tell_and_does_not_block(
    env: Env, tmp_path: Path
) -> None:
    """A FIFO or a symbolic link at the work name: ``_held`` answers None (cannot tell)
    at once, never blocking on the FIFO nor following the link."""
    item = env.until(env.drop("odd.dat", b"x" * 100, placement="rename"), State.REGISTERED)
    work = _work(env.inbox, item)
    outside = tmp_path / "outside"
    outside.write_bytes(b"y")
    with held_open(outside, "ab"):  # followed, the link would answer True
        for make in (lambda p: os.mkfifo(p), lambda p: os.symlink(outside, p)):
            odd = work.with_name(work.name + ".odd")
            make(odd)
            try:
                assert ReleaseSteps._held(odd, False) is None
            finally:
                odd.unlink()
        assert ReleaseSteps._held(work.with_name("gone"), False) is None


def test_a_folder_unchanged_whose_deep_file_is_held_open_for_writing_waits(
    folder_env: FolderEnv,
) -> None:
    """A folder unchanged since its claim, a file in its sub-folder held open for
    writing by another process, is not published; once closed, it is, whole."""
    item, files = folder_env.drop_folder("deep", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    work = _work(folder_env.inbox, item)
    with held_open(work / "sub" / "b.dat", "ab"):
        item, outcome = folder_env.steps.run(item, Step.PUBLISH)
        assert outcome.kind == "transient" and outcome.code == "changed", outcome
        assert not folder_env.stored_folder(item).exists()
    item = folder_env.journal.save(item)
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert outcome.kind == "ok", outcome
    stored = folder_env.stored_folder(item)
    for rel, data in files.items():
        assert hashlib.sha1((stored / rel).read_bytes()).digest() == hashlib.sha1(data).digest()


def test_an_untold_touched_folder_left_alone_is_published_at_the_next_attempt(
    folder_env: FolderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers untold, a folder one of whose files was touched (same bytes) waits one
    attempt and, unchanged meanwhile, is then stored with its record's bytes."""
    item, _files = folder_env.drop_folder("calm", verify=False)
    item = folder_env.until(item, State.REGISTERED)
    work = _work(folder_env.inbox, item)
    monkeypatch.setattr(writers, "_untrusted", {os.stat(work).st_dev})
    touch_later(work / "a.dat")
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert outcome.kind == "transient", outcome
    item = folder_env.journal.save(item)
    item, outcome = folder_env.steps.run(item, Step.PUBLISH)
    assert outcome.kind == "ok", outcome
    assert stored_sha1(folder_env.stored_folder(item)) == item.sha1
