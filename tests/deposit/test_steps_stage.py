"""The stage step's copy: which copy it makes and what it leaves."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest

from fixtures.steps_env import Env
from nbankd import hashing, streaming
from nbankd.archive import staging
from nbankd.deposit.lifecycle import State, Step


def test_a_large_file_is_staged_by_the_overlapped_copy(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file past OVERLAP_FROM is read, hashed and written at once (streaming), and
    its staged copy holds its bytes and SHA-1."""
    data = os.urandom(staging.OVERLAP_FROM + 12345)
    item = env.step(env.drop("big.dat", data), Step.CLAIM)
    used: list[int] = []
    overlapped = streaming.copy_hashing_overlapped

    def noting(*args: object, **kwargs: object) -> tuple[str, int]:
        result = overlapped(*args, **kwargs)  # type: ignore[arg-type]
        used.append(result[1])
        return result

    monkeypatch.setattr(staging, "copy_hashing_overlapped", noting)
    item = env.step(item, Step.STAGE)
    assert item.state is State.STAGED and used == [len(data)]
    assert item.sha1 == hashlib.sha1(data).hexdigest() and item.size == len(data)
    staged = env.archive.staging_dir / env.steps.staged_name(item)
    assert staged.read_bytes() == data


def test_a_small_file_is_staged_by_the_plain_copy(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file is copied in one loop (threads would cost more than they save)."""
    item = env.step(env.drop("small.dat", b"a few bytes"), Step.CLAIM)
    used: list[object] = []
    monkeypatch.setattr(staging, "copy_hashing_overlapped", lambda *a, **k: used.append(a))
    item = env.step(item, Step.STAGE)
    assert item.state is State.STAGED and used == []
    assert item.sha1 == hashlib.sha1(b"a few bytes").hexdigest()


def _ends_early(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Reads of the input report its end after ``after`` bytes, its size unchanged (as
    a flaky network filesystem can)."""
    real = hashing.read_into
    done = [0]

    def early(src: object, view: memoryview) -> int:
        if done[0] >= after:
            return 0
        n = real(src, view[: after - done[0]])  # type: ignore[arg-type]
        done[0] += n
        return n

    monkeypatch.setattr(hashing, "read_into", early)
    monkeypatch.setattr(staging, "read_into", early)


@pytest.mark.parametrize(
    ("size", "placement"),
    [(50_000, "copy"), (staging.OVERLAP_FROM + (1 << 20), "copy"), (50_000, "rename")],
)
def test_a_read_ending_early_is_never_staged_as_the_file(
    env: Env, monkeypatch: pytest.MonkeyPatch, size: int, placement: str
) -> None:
    """The input's reads end before its size: the stage fails (transient) with no staged
    copy left, and stages the whole file once reads work again."""
    data = os.urandom(size)
    item = env.step(
        dataclasses.replace(env.drop("short.dat", data), placement=placement), Step.CLAIM
    )
    with monkeypatch.context() as faults:
        _ends_early(faults, size // 2)
        failed = env.step(item, Step.STAGE)
    assert failed.state is State.CLAIMED and failed.error_code == "os-error"
    assert f"after {size // 2} of its {size} bytes" in (failed.error_message or "")
    assert [p for p in env.archive.staging_dir.iterdir()] == []
    item = env.step(failed, Step.STAGE)
    assert item.state is State.STAGED and item.sha1 == hashlib.sha1(data).hexdigest()
    assert item.size == size


def test_a_file_still_open_for_writing_goes_back_uncopied(env: Env) -> None:
    """A claimed file a program still holds open for writing (quiet, not finished) is
    not copied: it goes back to the inbox with code open-for-writing."""
    data = os.urandom(20_000)
    item = env.until(env.drop("open.dat", data), State.CLAIMED)
    with open(env.inbox / ".nbank" / item.token, "ab"):  # the recording program's descriptor
        item = env.step(item, Step.STAGE)
        assert (item.state, item.error_code) == (State.RETURNING, "open-for-writing")
        assert list(env.archive.staging_dir.iterdir()) == []
        item = env.step(item, Step.PUT_BACK)
    assert item.state is State.RETURNED
    assert (env.inbox / "open.dat").read_bytes() == data


def test_a_file_open_for_reading_only_is_staged(env: Env) -> None:
    """A program that only reads the claimed file does not hold up its copy."""
    item = env.until(env.drop("read.dat", os.urandom(20_000)), State.CLAIMED)
    with open(env.inbox / ".nbank" / item.token, "rb"):
        item = env.step(item, Step.STAGE)
    assert item.state is State.STAGED


@pytest.mark.parametrize("placement", ["copy", "rename"])
def test_a_refused_member_of_a_folder_input_is_named_by_its_path_in_the_inbox(
    tmp_path: os.PathLike[str], placement: str
) -> None:
    """The reason a folder input is refused names the member by its path in the inbox
    (what a user finds), not by the daemon's work folder and token."""
    from pathlib import Path

    from fixtures.inplace_env import make_env

    root = Path(tmp_path)
    env = make_env(root / "data", root / "state", placement=placement)
    try:
        item, _ = env.drop_folder("rec1", files={"top.dat": b"top"})
        os.mkfifo(env.inbox / "rec1" / "pipe")
        item, outcome = env.steps.run(item, Step.CLAIM)
        item = env.journal.save(item.changed(state=State.CLAIMED))
        item, outcome = env.steps.run(item, Step.STAGE)
    finally:
        env.journal.close()
        env.registry.close()
    assert outcome.kind == "permanent", outcome
    assert f"'{env.inbox / 'rec1' / 'pipe'}' is a FIFO" in outcome.message, outcome.message
    assert item.token not in outcome.message
