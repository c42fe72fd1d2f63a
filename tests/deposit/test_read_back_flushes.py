"""A read-back from storage flushes the file first (fdatasync) unless this deposit's own
fsync of it succeeded: the staged copy before publishing, and the published copy, are
read without a second flush; a copy another deposit stored is flushed first."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.steps_env import Env
from nbankd.archive import durable
from nbankd.deposit.lifecycle import State, Step


def _flushed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the path of every file fdatasync is called on from now on."""
    seen: list[str] = []
    real: Callable[[int], None] = os.fdatasync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    return seen


def test_staged_copy_is_read_back_without_a_flush(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing reads the staged copy back from storage with no fdatasync of it."""
    item = env.until(env.drop("a.dat", os.urandom(64 << 10)), State.REGISTERED)
    seen = _flushed(monkeypatch)
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    assert not [p for p in seen if "/staging/" in p or "/resources/" in p]


def test_a_copy_found_stored_is_flushed_before_it_is_read(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same input dropped again, found already deposited: the stored copy (not
    made by this deposit) is flushed before it is read back."""
    data = os.urandom(64 << 10)
    assert env.until(env.drop("take.dat", data), State.DONE).state is State.DONE
    again = env.until(env.drop("take.dat", data), State.PUBLISHED)
    assert again.already
    seen = _flushed(monkeypatch)
    again = env.step(again, Step.VERIFY)  # the found copy is read back here
    assert again.state is State.VERIFIED
    assert [p for p in seen if p.endswith("/resources/ta/take.dat")]


def test_bytes_written_after_the_sync_are_what_a_synced_read_back_sees(tmp_path: Path) -> None:
    """Skipping the flush never hides a later write: a file changed (unsynced) after its
    fsync does not verify against the old SHA-1, nor does it against the new one fail."""
    path = tmp_path / "f"
    old = os.urandom(8192)
    with open(path, "wb") as f:
        f.write(old)
        os.fsync(f.fileno())
    new = bytes([old[0] ^ 1]) + old[1:]
    with open(path, "r+b") as f:
        f.write(new[:1])  # dirty in the page cache, not synced
    assert not durable.verify_from_storage(path, hashlib.sha1(old).hexdigest(), synced=True)
    assert durable.verify_from_storage(path, hashlib.sha1(new).hexdigest(), synced=True)
