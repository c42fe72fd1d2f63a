"""The stage step's copy: which copy it makes and what it leaves."""

from __future__ import annotations

import hashlib
import os

import pytest

from fixtures.steps_env import Env
from nbankd import streaming
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
