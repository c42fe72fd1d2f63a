"""Reading an archive's resources for an audit: a pool of readers fed while the audit
goes on.

The audit hands over what its provisional plan names as soon as the walk is done
(the registry may still be listing), and the rest once the listing is in. Each
result is committed to the cache in batches as it comes, so an interrupted run
resumes from there; judging hashes against the registry is the caller's, at the end.

A SHA-1 is cached before it is judged. That is safe: a cached hash that differs
from the registered one makes the next run read the file again (``unverified`` in
:func:`~nbankd.audit.plan.hash_reason`) and report it, so a kill between reading
and judging never loses a mismatch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from nbankd import seams
from nbankd.audit.cache import AuditCache
from nbankd.audit.model import CacheEntry
from nbankd.audit.reader import Cancelled
from nbankd.audit.walk import Stored


@dataclass(frozen=True)
class Read:
    """One resource read: its SHA-1, the bytes read, and whether it stayed the same
    while read (if not, it gets no verdict this run)."""

    sha1: str
    size: int
    unchanged: bool


ReadOutcome = Read | OSError


class HashRun:
    """Reads resources on ``workers`` threads; :meth:`submit` adds work while it runs,
    :meth:`finish` waits for everything and returns {name: Read or the OSError}.

    ``read(stored)`` gives (sha1, bytes, unchanged) and raises
    :class:`~nbankd.audit.reader.Cancelled` when the audit is stopped; ``cancelled()``
    tells the feeder to stop handing out work. ``progress`` is updated in place.
    """

    def __init__(
        self,
        archive: str,
        cache: AuditCache,
        read: Callable[[Stored], tuple[str, int, bool]],
        *,
        workers: int,
        run_id: str,
        batch: int,
        batch_seconds: float,
        cancelled: Callable[[], bool],
        clock: Callable[[], float] = time.time,
        progress: dict[str, Any] | None = None,
    ) -> None:
        self.archive = archive
        self.cache = cache
        self.read = read
        self.workers = max(1, workers)
        self.run_id = run_id
        self.batch_size = batch
        self.batch_seconds = batch_seconds
        self.cancelled = cancelled
        self.clock = clock
        self.progress = progress if progress is not None else {}
        self.results: dict[str, ReadOutcome] = {}
        self.submitted: set[str] = set()
        self.hashed = 0
        self.bytes = 0
        self._queue: queue.SimpleQueue[Stored | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._batch: list[CacheEntry] = []
        self._last_commit = time.monotonic()
        self._thread = threading.Thread(target=self._drive, name="audit-hash", daemon=True)
        self._thread.start()

    def submit(self, items: Iterable[Stored]) -> None:
        """Adds resources to read (each name at most once per run)."""
        added = 0
        for stored in items:
            if stored.name not in self.submitted:
                self.submitted.add(stored.name)
                self._queue.put(stored)
                added += 1
        self.progress["planned"] = self.progress.get("planned", 0) + added

    def finish(self) -> dict[str, ReadOutcome]:
        """Waits for every submitted read (or, once cancelled, for the reads under way);
        commits the last batch; re-raises what broke the feeder (a cache error)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.results

    # -- the feeder thread -------------------------------------------------------------

    def _drive(self) -> None:
        try:
            # the readers inherit the audit's priority (see AuditScheduler._in_own_thread)
            with ThreadPoolExecutor(self.workers, thread_name_prefix="audit-read") as pool:
                try:
                    self._feed(pool)
                finally:
                    self._commit()
        except BaseException as err:  # handed to finish(): the caller's thread reports it
            self._error = err

    def _feed(self, pool: ThreadPoolExecutor) -> None:
        pending: dict[Future[tuple[str, int, bool]], Stored] = {}
        limit = self.workers * 4
        closed = False
        while True:
            while not closed and len(pending) < limit and not self.cancelled():
                try:
                    item = self._queue.get(block=not pending)
                except queue.Empty:
                    break
                if item is None:
                    closed = True
                    break
                pending[pool.submit(self.read, item)] = item
            if not pending:
                if closed or self.cancelled():
                    return
                continue
            if self.cancelled():  # reads not started yet are dropped; those under way end
                for fut in pending:
                    fut.cancel()
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                self._take(pending.pop(fut), fut)
            if len(self._batch) >= self.batch_size or (
                time.monotonic() - self._last_commit >= self.batch_seconds
            ):
                self._commit()

    def _take(self, stored: Stored, fut: Future[tuple[str, int, bool]]) -> None:
        try:
            sha1, n, unchanged = fut.result()
        except (Cancelled, CancelledError):
            return
        except OSError as err:
            self.results[stored.name] = err
            return
        self.results[stored.name] = Read(sha1, n, unchanged)
        self.hashed += 1
        self.bytes += n
        self.progress.update(hashed=self.hashed, bytes=self.bytes)
        if unchanged:  # changed while read: no verdict; read again next run
            st = stored.stat
            self._batch.append(
                CacheEntry(
                    stored.name,
                    st.size,
                    st.mtime_ns,
                    st.inode,
                    st.ctime_ns,
                    sha1,
                    self.clock(),
                    self.run_id,
                )
            )

    def _commit(self) -> None:
        if self._batch:
            self.cache.store(self.archive, self._batch)
            self._batch = []
            seams.reached("audit-committed")
        self._last_commit = time.monotonic()


__all__ = ["HashRun", "Read", "ReadOutcome"]
