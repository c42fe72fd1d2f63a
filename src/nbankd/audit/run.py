"""Running an audit: the thin I/O layer around :mod:`nbankd.audit.plan`.

Per archive, in this order (the order is what makes an audit right during ingest):

1. read the journal's in-flight items; list the archive's resources in the registry;
2. walk the archive (:mod:`.walk`);
3. list the registry again; read the journal's in-flight items again;
4. compare (:func:`~nbankd.audit.plan.categorise`) leaving out everything in
   flight at either read; re-check each candidate on disk (and the unregistered
   ones in the registry, in bulk) so a deposit or prune that finished meanwhile
   is not reported;
5. re-hash what the plan asks for, in parallel, under the rate cap, committing
   results to the cache in batches (so an interrupted run resumes);
6. report ``staging/`` entries no in-flight item owns; keep only the permission
   findings that still hold (a folder just made gets its mode a moment later).

Nothing in the archive or the registry is ever written. :meth:`Auditor.run`
audits several archives, lists the registry's other archives (tape, offline,
elsewhere) without reading them, writes the JSON report and logs each finding.

Test seams: ``NBANKD_AUDIT_PAUSE_AT=<point>`` with ``NBANKD_AUDIT_PAUSE_UNTIL=<path>``
holds the audit at ``listed`` (after the first listing), ``walked`` (after the walk)
or ``hashing`` (before the first read) until the path exists; ``NBANKD_CRASH_AT=
audit-committed[:n]`` kills the process after the n-th cache commit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.archive.layout import Archive, open_archive
from nbankd.audit import plan as planner
from nbankd.audit.cache import AuditCache, RunRecord
from nbankd.audit.checks import permission_findings
from nbankd.audit.listing import list_registered, not_audited
from nbankd.audit.model import (
    HASH_MISMATCH,
    INCOMPLETE,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    PERMISSION,
    REGISTERED_ELSEWHERE,
    UNAVAILABLE,
    UNREADABLE,
    ArchiveResult,
    AuditReport,
    CacheEntry,
    Finding,
)
from nbankd.audit.reader import Cancelled, RateLimiter, list_dir, sha1_of_resource, vanished
from nbankd.audit.report import log_report, write_report
from nbankd.audit.walk import Stored, Walk, walk_archive
from nbankd.config.model import AuditConfig
from nbankd.deposit import crashpoints
from nbankd.registry.base import Registry

MB = 1_000_000
NICE = 10  # audit threads yield the CPU (and, with CFQ/BFQ, the disk) to deposits


@dataclass(frozen=True)
class AuditTarget:
    """An archive to audit: its registry name and its folder."""

    name: str
    path: Path


@dataclass(frozen=True)
class InFlight:
    """What the deposit journal shows in flight: identifiers and staging tokens."""

    names: frozenset[str] = frozenset()
    tokens: frozenset[str] = frozenset()

    def __or__(self, other: InFlight) -> InFlight:
        return InFlight(self.names | other.names, self.tokens | other.tokens)


def journal_in_flight(journal: Any) -> Callable[[], InFlight]:
    """An in-flight reader over a :class:`~nbankd.deposit.journal.Journal`."""

    def read() -> InFlight:
        items = journal.unfinished()
        return InFlight(
            frozenset(i.name for i in items if i.name), frozenset(i.token for i in items)
        )

    return read


@dataclass(frozen=True)
class AuditSettings:
    scrub_days: int = 30
    every: float = 86400.0
    max_mb_per_s: float = 200.0
    #: reading threads: I/O-bound (small files, NFS) gains from more than one per core
    workers: int = field(default_factory=lambda: min(32, max(16, 2 * (os.cpu_count() or 1))))
    staging_grace: float = 3600.0  # younger unowned staging entries may be another host's
    batch: int = 256  # cache commit after this many reads...
    batch_seconds: float = 2.0  # ...or this long

    @classmethod
    def from_config(cls, audit: AuditConfig, **overrides: Any) -> AuditSettings:
        base = cls(scrub_days=audit.scrub_days, every=audit.every, max_mb_per_s=audit.max_mb_per_s)
        return replace(base, **overrides)


def new_run_id(now: float) -> str:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def _seam(point: str) -> None:
    if os.environ.get("NBANKD_AUDIT_PAUSE_AT") == point:
        until = os.environ.get("NBANKD_AUDIT_PAUSE_UNTIL", "")
        waiter = threading.Event()
        while until and not os.path.exists(until):
            waiter.wait(0.05)


def lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


class Auditor:
    """Audits archives against a registry with a cache (see the module docstring).

    ``stop`` (an event) interrupts a run between reads or blocks: :meth:`run` then
    raises :class:`~nbankd.audit.reader.Cancelled` and the run resumes next time.
    ``progress`` shows what the running audit is doing (for status).
    """

    def __init__(
        self,
        registry: Registry,
        cache: AuditCache,
        *,
        settings: AuditSettings | None = None,
        in_flight: Callable[[], InFlight] = InFlight,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.settings = settings or AuditSettings()
        self.in_flight = in_flight
        self.clock = clock
        self.stop = stop or threading.Event()
        rate = self.settings.max_mb_per_s * MB if self.settings.max_mb_per_s > 0 else None
        self.limiter = RateLimiter(rate, sleep=self.stop.wait)
        self.progress: dict[str, Any] = {}

    # -- one run over several archives -----------------------------------------------

    def run(
        self,
        targets: Sequence[AuditTarget],
        *,
        full: bool = False,
        trigger: str = "request",
        resume: RunRecord | None = None,
        report_dir: Path | None = None,
    ) -> AuditReport:
        """Audits each target; writes the report into ``report_dir`` (if given), logs it.

        ``resume`` continues an interrupted run (its id, start time and ``full`` flag).
        Registry and archive failures become the report's (or an archive's) error.
        """
        if resume is not None:
            run = resume
        else:
            started = self.clock()
            run = RunRecord(new_run_id(started), started, full, trigger)
            self.cache.begin_run(run)
        policy = planner.HashPolicy(
            run_started=run.started,
            full=run.full,
            scrub_days=self.settings.scrub_days,
            every=self.settings.every,
        )
        results: list[ArchiveResult] = []
        for target in targets:
            results.append(self._archive_safely(target, policy))
        error = None
        offline: list[Any] = []
        try:
            offline = not_audited(self.registry.list_archives(), [t.name for t in targets])
        except errors.NbankdError as err:
            error = f"cannot list the registry's archives: {err}"
        report = AuditReport(
            id=run.id,
            started=run.started,
            finished=self.clock(),
            full=run.full,
            trigger=run.trigger if resume is None else "resume",
            resumed=resume is not None,
            error=error,
            archives=tuple(results),
            not_audited=tuple(offline),
        )
        path = None
        if report_dir is not None:
            path = write_report(report_dir, report)
            report = replace(report, report_path=str(path))
        self.cache.finish_run(run.id, report.finished or self.clock(), str(path) if path else None)
        log_report(report)
        self.progress = {}
        return report

    def _archive_safely(self, target: AuditTarget, policy: planner.HashPolicy) -> ArchiveResult:
        try:
            return self.audit_archive(target, policy)
        except Cancelled:
            raise
        except errors.NbankdError as err:
            return ArchiveResult(target.name, str(target.path), error=str(err))
        except OSError as err:
            return ArchiveResult(
                target.name, str(target.path), error=f"{err.strerror or err} ({err.filename})"
            )

    # -- one archive ------------------------------------------------------------------

    def audit_archive(self, target: AuditTarget, policy: planner.HashPolicy) -> ArchiveResult:
        """Audits one archive (steps 1-6 of the module docstring)."""
        self.progress = {"archive": target.name, "phase": "listing"}
        try:
            archive = open_archive(target.path)
        except errors.NbankdError as err:
            return ArchiveResult(target.name, str(target.path), UNAVAILABLE, error=str(err))
        timings: dict[str, float] = {}
        clock = _Stopwatch(timings)
        flight = self.in_flight()
        before = list_registered(self.registry, target.name)
        clock.lap("list_before")
        _seam("listed")
        self.progress["phase"] = "walking"
        walk = walk_archive(archive, stop=self.stop)
        clock.lap("walk")
        self.progress["phase"] = "walked"
        _seam("walked")
        self.progress["phase"] = "listing again"
        clock.lap()
        after = list_registered(self.registry, target.name)
        flight = flight | self.in_flight()
        clock.lap("list_after")
        cats = planner.categorise(walk.stored, before, after, flight.names)
        findings = list(walk.layout)
        for name, found in walk.by_resource.items():
            if name not in flight.names:
                findings += found
        findings += self._missing(archive, cats.missing)
        findings += self._unregistered(target, walk, cats.unregistered)
        cached = self.cache.load(target.name)
        stats = {n: s.stat for n, s in walk.stored.items()}
        todo = planner.plan_hashes(stats, cats.expected, cached, now=self.clock(), policy=policy)
        clock.lap("compare")
        _seam("hashing")
        clock.lap()
        hashed, nbytes, read_findings = self._hash(target.name, walk, todo, cats.expected)
        findings += read_findings
        clock.lap("hash")
        self.cache.forget(
            target.name, [n for n in cached if n not in walk.stored and n not in flight.names]
        )
        findings += self._leftovers(archive, walk, flight)
        findings = [f for f in findings if f.kind != PERMISSION or _still_wrong(archive, f)]
        clock.lap("finish")
        return ArchiveResult(
            name=target.name,
            path=str(archive.path),
            registered_before=len(before),
            registered_after=len(after),
            stored=len(walk.stored),
            hashed=hashed,
            bytes_hashed=nbytes,
            skipped_in_flight=len(cats.in_flight),
            findings=tuple(findings),
            timings=timings,
        )

    def _missing(self, archive: Archive, candidates: Sequence[str]) -> list[Finding]:
        """Registered in both listings, not walked: reported unless it is there now."""
        return [
            Finding(MISSING_FROM_ARCHIVE, n, None) for n in candidates if not _stored(archive, n)
        ]

    def _unregistered(
        self, target: AuditTarget, walk: Walk, candidates: Sequence[str]
    ) -> list[Finding]:
        """Walked, in neither listing: looked up in bulk; pruned meanwhile = no finding."""
        if not candidates:
            return []
        known = {r.name: r for r in self.registry.get_resources(candidates)}
        out = []
        for name in candidates:
            path = walk.stored[name].path
            if not os.path.lexists(path):
                continue
            record = known.get(name)
            if record is None:
                out.append(Finding(MISSING_FROM_REGISTRY, name, path))
            elif target.name not in record.locations:
                where = ", ".join(record.locations) or "no archive"
                out.append(Finding(REGISTERED_ELSEWHERE, name, path, f"registered in {where}"))
        return out

    def _leftovers(self, archive: Archive, walk: Walk, flight: InFlight) -> list[Finding]:
        names = planner.staging_leftovers(
            walk.staging, flight.tokens, now=self.clock(), grace=self.settings.staging_grace
        )
        return [
            Finding(
                INCOMPLETE,
                None,
                archive.staging_dir / n,
                "left in staging/ by an interrupted transfer; safe to delete",
            )
            for n in names
            if os.path.lexists(archive.staging_dir / n)
        ]

    # -- reading ------------------------------------------------------------------------

    def _throttle(self, n: int) -> None:
        if self.stop.is_set():
            raise Cancelled("audit stopped")
        self.limiter(n)

    def _read(self, stored: Stored) -> tuple[str, int, bool]:
        """(sha1, bytes, unchanged while read) of one resource."""
        sha1, n = sha1_of_resource(stored.path, self._throttle, is_dir=stored.is_dir)
        try:
            st = os.lstat(stored.path)
        except OSError:
            return sha1, n, False
        same = st.st_ino == stored.stat.inode and (
            stored.is_dir
            or (st.st_size, st.st_mtime_ns) == (stored.stat.size, stored.stat.mtime_ns)
        )
        return sha1, n, same

    def _hash(
        self, archive: str, walk: Walk, todo: dict[str, str], expected: dict[str, str | None]
    ) -> tuple[int, int, list[Finding]]:
        """Reads every planned resource; returns (resources read, bytes, findings)."""
        names = sorted(todo)
        self.progress.update(phase="hashing", planned=len(names), hashed=0, bytes=0)
        findings: list[Finding] = []
        batch: list[CacheEntry] = []
        last_commit = time.monotonic()
        hashed = nbytes = 0
        pending: dict[Future[tuple[str, int, bool]], str] = {}
        queue = iter(names)
        limit = self.settings.workers * 4

        def commit() -> None:
            nonlocal batch, last_commit
            if batch:
                self.cache.store(archive, batch)
                batch = []
                crashpoints.reached("audit-committed")
            last_commit = time.monotonic()

        with ThreadPoolExecutor(
            self.settings.workers, thread_name_prefix="audit-hash", initializer=lower_priority
        ) as pool:
            try:
                while True:
                    while len(pending) < limit and not self.stop.is_set():
                        name = next(queue, None)
                        if name is None:
                            break
                        pending[pool.submit(self._read, walk.stored[name])] = name
                    if not pending:
                        break
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        name = pending.pop(fut)
                        stored = walk.stored[name]
                        try:
                            sha1, n, unchanged = fut.result()
                        except Cancelled:
                            continue
                        except OSError as err:
                            if not vanished(err):
                                detail = err.strerror or str(err)
                                findings.append(Finding(UNREADABLE, name, stored.path, detail))
                            continue
                        hashed += 1
                        nbytes += n
                        self.progress.update(hashed=hashed, bytes=nbytes)
                        if unchanged:
                            st = stored.stat
                            batch.append(
                                CacheEntry(name, st.size, st.mtime_ns, st.inode, sha1, self.clock())
                            )
                        want = expected.get(name)
                        if want is not None and sha1 != want:
                            findings.append(
                                Finding(
                                    HASH_MISMATCH,
                                    name,
                                    stored.path,
                                    f"sha1 {sha1}, registered {want}",
                                )
                            )
                    if len(batch) >= self.settings.batch or (
                        time.monotonic() - last_commit >= self.settings.batch_seconds
                    ):
                        commit()
            finally:
                commit()
        if self.stop.is_set():
            raise Cancelled("audit stopped")
        return hashed, nbytes, findings


def _still_wrong(archive: Archive, finding: Finding) -> bool:
    """A permission finding holds at the end of the audit too (a stub folder a deposit
    just made gets its mode a moment after mkdir; that is not a problem)."""
    if finding.path is None:
        return True
    try:
        st = os.lstat(finding.path)
    except OSError:
        return False
    return any(True for _ in permission_findings(archive, finding.path, st, finding.resource))


class _Stopwatch:
    """Records the seconds between laps into ``timings`` (an unnamed lap is not kept)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.monotonic()

    def lap(self, name: str | None = None) -> None:
        now = time.monotonic()
        if name is not None:
            self.timings[name] = now - self.last
        self.last = now


def _stored(archive: Archive, name: str) -> bool:
    """True if ``resources/`` holds an entry for ``name`` (any extension), as
    ``Archive.stored_path`` decides, listing the stub folder without touching its atime."""
    try:
        names = list_dir(archive.resource_path(name).parent)
    except FileNotFoundError:
        return False
    return any(n == name or n.startswith(name + ".") for n, _ in names)


__all__ = [
    "AuditSettings",
    "AuditTarget",
    "Auditor",
    "InFlight",
    "journal_in_flight",
    "lower_priority",
    "new_run_id",
]
