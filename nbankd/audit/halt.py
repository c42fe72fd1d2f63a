"""Stopping an audit's work early: the whole archive's run, or the read of one resource.

:class:`Halt` is what the walk and the reads of one archive look at between blocks:
set when the audit is stopped or the archive's registry listing failed. It also
holds the resources whose read is no longer wanted (:meth:`Halt.drop`): files the
registry places nowhere, whose hash nothing needs, so a huge stray file (a 1 TiB
sparse file, say) does not hold the audit for hours. A dropped read stops before its
next block; its first block is read either way, so a file of one block is hashed
whole however fast the registry answered (what an audit reads does not depend on a
race).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import Any

from nbankd.audit.reader import Cancelled


class Halt:
    """Set when the audit is stopped, or this archive's run must end early (its
    registry listing failed); and the names whose reads are dropped."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.abort = threading.Event()
        self.dropped: frozenset[str] = frozenset()

    def is_set(self) -> bool:
        return self.stop.is_set() or self.abort.is_set()

    def on_failure(self, future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.abort.set()

    def drop(self, names: Iterable[str]) -> None:
        """Reads of ``names`` (queued or under way) stop before their next block."""
        self.dropped = self.dropped | frozenset(names)  # one swap: readers see either

    def throttle(self, name: str, limit: Callable[[int], None]) -> Callable[[int], None]:
        """The throttle of one read of ``name``: ``limit`` (the audit's, which raises
        :class:`~nbankd.audit.reader.Cancelled` once the audit is stopped), and after
        the first block, Cancelled as soon as ``name`` is dropped."""
        blocks = 0

        def throttle(n: int) -> None:
            nonlocal blocks
            if blocks and name in self.dropped:
                raise Cancelled(f"{name}: registered nowhere, its hash is not needed")
            blocks += 1
            limit(n)

        return throttle


def listing_result(listing: Future[dict[str, str | None]], halt: Halt) -> dict[str, str | None]:
    """The listing, once it is in; Cancelled as soon as the audit is stopped."""
    while not listing.done():
        if halt.stop.is_set():
            raise Cancelled("audit stopped")
        wait([listing], timeout=0.2)
    return listing.result()


class Stopwatch:
    """Records the seconds between laps into ``timings`` (an unnamed lap is not kept)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.monotonic()

    def lap(self, name: str | None = None) -> None:
        now = time.monotonic()
        if name is not None:
            self.timings[name] = now - self.last
        self.last = now


__all__ = ["Halt", "Stopwatch", "listing_result"]
