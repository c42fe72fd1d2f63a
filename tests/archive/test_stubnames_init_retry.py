"""StubNames without an inotify instance (the descriptor limit reached) lists as
before, and tries again later: a moment of exhaustion is not for the daemon's life."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

from stubnames_helpers import ask, listed, watched

from nbankd.archive import stubnames
from nbankd.archive.stubnames import StubNames


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Within, this process can open no new file descriptor (EMFILE)."""
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)  # the lowest free number: every new descriptor would be this or above
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_instance_to_be_had_answers_not_known(names: StubNames, stub: Path) -> None:
    """With no descriptor left for an inotify instance, every answer is "not known"."""
    with no_descriptor_left():
        assert ask(names, stub, "abc") is None
    assert not watched(stub)


def test_an_instance_is_tried_again_after_init_retry_calls(names: StubNames, stub: Path) -> None:
    """Once descriptors are free again, the folder's names are kept within INIT_RETRY
    calls of the failure, and answers equal a listing."""
    with no_descriptor_left():
        assert ask(names, stub, "abc") is None
    answers = [ask(names, stub, "abc") for _ in range(stubnames.INIT_RETRY + 2)]
    assert answers[-1] == listed(stub, "abc") == ["abc.wav"]
    assert watched(stub)
    assert all(a is None or a == ["abc.wav"] for a in answers)
