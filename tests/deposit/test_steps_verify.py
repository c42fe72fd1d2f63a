"""Verification reads each stored copy back from storage once, driven step by step."""

from __future__ import annotations

import os

from fixtures.steps_env import Env
from nbankd.deposit.lifecycle import State, Step

SIZE = 4 << 20


def _read_bytes() -> int:
    """Bytes this process has fetched from storage so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def test_copy_read_back_before_publish_is_not_read_again(env: Env) -> None:
    """The staged copy is read back from storage before it is published; the verify
    step then finds the same inode in resources/ and reads nothing more."""
    item = env.until(env.drop("big.dat", os.urandom(SIZE)), State.CHECKED)
    item = env.step(item, Step.REGISTER)
    before = _read_bytes()
    item = env.step(item, Step.PUBLISH)
    assert item.state is State.PUBLISHED
    after_publish = _read_bytes()
    item = env.step(item, Step.VERIFY)
    assert item.state is State.VERIFIED
    assert after_publish - before >= SIZE  # read back from storage, not the page cache
    assert _read_bytes() - after_publish < SIZE


def test_published_copy_replaced_is_read_again_and_caught(env: Env) -> None:
    """A stored copy that is no longer the inode read back before publishing (replaced
    by other bytes) is read again by the verify step, which catches it."""
    item = env.until(env.drop("swap.dat", os.urandom(SIZE)), State.PUBLISHED)
    [name] = env.stored()
    stored = env.archive.resources_dir / name
    os.chmod(stored.parent, 0o755)
    replacement = stored.with_name("other")
    replacement.write_bytes(os.urandom(SIZE))
    os.replace(replacement, stored)
    item = env.step(item, Step.VERIFY)
    assert item.state is State.CLAIMED  # copied again from the claimed input
    assert "did not match its sha1" in (item.error_message or "")
