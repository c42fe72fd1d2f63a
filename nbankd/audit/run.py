"""Running an audit: the thin I/O layer around :mod:`nbankd.audit.plan`.

Per archive, in this order (the order is what makes an audit right during ingest):

1. read the journal's in-flight items; start listing the archive's resources in
   the registry (in a thread beside steps 2 and 3; if it fails, the walk and the
   reads stop at once and its error is the archive's);
2. walk the archive (:mod:`.walk`);
3. start reading what the cache says needs reading (:mod:`.hashrun`), the
   registered hashes still unknown; wait for the listing; a file it shows registered
   nowhere is read no further than its first block (:mod:`.halt`);
4. read the journal's in-flight items again; ask the registry about the names
   where the walk and the listing disagree, which gives its view after the walk
   (:func:`~nbankd.audit.plan.listing_after`); compare
   (:func:`~nbankd.audit.plan.categorise`) leaving out everything in flight at
   either read;
5. read what the comparison adds (the rolling slice; a cached hash that differs
   from the registered one is confirmed by a fresh read; every resource, as in a full
   audit, on a filesystem whose stat cannot show an in-place change:
   :data:`~.walk.STAT_BLIND`). Results go to the cache
   in batches as they come (an interrupted run resumes); a file that changed
   while it was read gets no verdict now (it is read again next run);
6. once the reads are done: re-check each missing candidate on disk (a deposit
   by another host that finished meanwhile is not reported, nor one another host
   registered within the grace: it registers, then copies; unless an earlier run
   found it stored); judge every read (a hash that
   differs, a file that cannot be read); look up what was found unregistered
   (files placed within the grace, such as a tape import or an ``nbank``
   transfer registering after it copies, are not reported yet);
7. report ``staging/`` entries no in-flight item owns; keep only the permission
   findings that still hold (a folder just made gets its mode a moment later).

The timings of a result overlap: ``list`` runs beside ``walk`` and the first reads.

Nothing in the archive or the registry is ever written. :meth:`Auditor.run`
audits several archives, checks the registry for resources no archive holds,
lists the registry's other archives (tape, offline, elsewhere) without reading
them, writes the JSON report and logs each finding.

Test seams: :mod:`.seams` (``NBANKD_AUDIT_PAUSE_AT``); ``NBANKD_CRASH_AT=
audit-committed[:n]`` kills the process after the n-th cache commit.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors, seams
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.audit import compare
from nbankd.audit import plan as planner
from nbankd.audit.cache import AuditCache, RunRecord
from nbankd.audit.checks import still_wrong
from nbankd.audit.halt import Halt, Stopwatch, listing_result
from nbankd.audit.hashrun import HashRun, Read, ReadOutcome
from nbankd.audit.listing import list_registered, not_audited, without_location
from nbankd.audit.model import (
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    NO_LOCATION,
    PERMISSION,
    UNAVAILABLE,
    ArchiveResult,
    AuditReport,
    Finding,
)
from nbankd.audit.reader import Cancelled, RateLimiter, sha1_of_resource
from nbankd.audit.report import log_report, write_report
from nbankd.audit.settings import (
    AuditSettings,
    AuditTarget,
    InFlight,
    journal_in_flight,
    lower_priority,
    new_run_id,
)
from nbankd.audit.walk import Stored, Walk, stat_blind, walk_archive
from nbankd.registry.base import Registry, ResourceRecord

MB = 1_000_000

log = structlog.get_logger("nbankd.audit")


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
        ours: Callable[[Iterable[str]], set[str]] = lambda names: set(),
        clock: Callable[[], float] = time.time,
        clock_ahead: Callable[[str], float] = lambda archive: 0.0,
        stop: threading.Event | None = None,
    ) -> None:
        """``clock_ahead``: seconds this host's clock runs ahead of the clock stamping an
        archive's files (by name): what others write there (a rig's staged copy, a
        transfer's file) is aged by the archive's clock, never called old too soon."""
        self.registry = registry
        self.cache = cache
        self.settings = settings or AuditSettings()
        self.in_flight = in_flight
        self.ours = ours
        self.clock = clock
        self.clock_ahead = clock_ahead
        self.stop = stop or threading.Event()
        rate = self.settings.max_mb_per_s * MB if self.settings.max_mb_per_s > 0 else None
        self.limiter = RateLimiter(rate, sleep=self.stop.wait)
        self.progress: dict[str, Any] = {}
        self._halt = Halt(self.stop)  # replaced for each archive

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
        Registry and archive failures become the report's (or an archive's) error;
        a cache that cannot be written raises :class:`~.cache.AuditCacheError`.
        """
        if resume is not None:
            run = resume
        else:
            started = self.clock()
            run = RunRecord(new_run_id(started), started, full, trigger)
            self.cache.begin_run(run)
        policy = planner.HashPolicy(
            run_started=run.started,
            run_id=run.id,
            full=run.full,
            scrub_days=self.settings.scrub_days,
            every=self.settings.every,
        )
        flight = self.in_flight()
        # the first registry-wide check runs beside the archives' audits
        asking = ThreadPoolExecutor(1, thread_name_prefix="audit-registry")
        try:
            first_homeless = asking.submit(self._without_location)
            results = [self._archive_safely(target, policy) for target in targets]
            homeless = first_homeless.result()
        finally:
            asking.shutdown(wait=False, cancel_futures=True)
        error = error_code = None
        offline: list[Any] = []
        try:
            offline = not_audited(self.registry.list_archives(), [t.name for t in targets])
        except errors.NbankdError as err:
            error, error_code = f"cannot list the registry's archives: {err}", err.code
        flight = flight | self.in_flight()
        if homeless:  # in both checks, not in flight: not a deposit or prune under way
            homeless &= self._without_location() or set()
        report = AuditReport(
            id=run.id,
            started=run.started,
            finished=self.clock(),
            full=run.full,
            trigger=run.trigger if resume is None else "resume",
            resumed=resume is not None,
            error=error,
            error_code=error_code,
            archives=tuple(results),
            not_audited=tuple(offline),
            registry_findings=tuple(
                Finding(NO_LOCATION, name, None, "registered, but no archive holds it")
                for name in sorted((homeless or set()) - flight.names)
            ),
        )
        path = None
        if report_dir is not None:
            path = write_report(report_dir, report)
            report = replace(report, report_path=str(path))
        self.cache.finish_run(run.id, report.finished or self.clock(), str(path) if path else None)
        log_report(report)
        self.progress = {}
        return report

    def _without_location(self) -> set[str] | None:
        """Resources no archive holds (None: not known; the archives report outages)."""
        try:
            return without_location(self.registry)
        except Exception:  # not known; a registry outage is reported by the archives
            return None

    def _archive_safely(self, target: AuditTarget, policy: planner.HashPolicy) -> ArchiveResult:
        try:
            return self.audit_archive(target, policy)
        except Cancelled:
            raise
        except errors.NbankdError as err:
            return ArchiveResult(target.name, str(target.path), error=str(err), error_code=err.code)
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            return ArchiveResult(
                target.name,
                str(target.path),
                error=f"{err.strerror or err}{where} while auditing; is the archive mounted?",
                error_code="archive-io",
            )

    # -- one archive ------------------------------------------------------------------

    def audit_archive(self, target: AuditTarget, policy: planner.HashPolicy) -> ArchiveResult:
        """Audits one archive (steps 1-7 of the module docstring)."""
        self.progress = {"archive": target.name, "phase": "listing, walking"}
        try:
            archive = open_archive(target.path)
        except errors.NbankdError as err:
            return ArchiveResult(
                target.name, str(target.path), UNAVAILABLE, error=str(err), error_code=err.code
            )
        blind = stat_blind(archive)
        if blind is not None and not policy.full:  # only a read can show a change here
            log.info(
                "audit reads every resource: a stat cannot show changes",
                fs=blind,
                archive=target.name,
            )
            policy = replace(policy, full=True)
        timings: dict[str, float] = {}
        clock = Stopwatch(timings)
        flight = self.in_flight()
        cached = self.cache.load(target.name)
        halt = self._halt = Halt(self.stop)
        lister = ThreadPoolExecutor(1, thread_name_prefix="audit-list")
        listing = lister.submit(self._listing, target.name, timings)
        listing.add_done_callback(halt.on_failure)  # a listing that fails ends the run now
        reads: HashRun | None = None
        try:
            walk = walk_archive(archive, stop=halt)
            clock.lap("walk")
            stats = {n: s.stat for n, s in walk.stored.items()}
            provisional = {n: None for n in stats if n not in flight.names}
            first = planner.plan_hashes(stats, provisional, cached, now=self.clock(), policy=policy)
            seams.audit_pause("hashing")
            self.progress["phase"] = "hashing, listing"
            reads = self._reads(target.name, policy, halt)
            # the rolling slice waits for the listing (it is a share of what is registered)
            reads.submit(walk.stored[n] for n in sorted(first) if first[n] != planner.SLICE)
            before = listing_result(listing, halt)
            clock.lap()
            self.progress["phase"] = "walked"
            seams.audit_pause("walked")
            self.progress["phase"] = "hashing, checking"
            flight = flight | self.in_flight()
            asked = planner.disagreements(
                walk.stored.keys() | walk.misplaced.keys(), before, flight.names
            )
            if halt.is_set():
                raise Cancelled("audit stopped")
            answers = compare.by_name(self.registry.get_resources(asked)) if asked else {}
            after = planner.listing_after(before, target.name, answers, asked)
            now = self.clock()
            # what others wrote is aged by the archive filesystem's clock too: this
            # host's running ahead never makes a live copy or a transfer look old
            aged = now - self.clock_ahead(target.name)
            cats = planner.categorise(walk.stored, before, after, flight.names)
            grace = self.settings.staging_grace
            findings = compare.walk_findings(walk, skip=flight.names, now=aged, grace=grace)
            registered = before.keys() | after.keys()
            placed, lookup = compare.misplaced(walk, registered, skip=flight.names)
            findings += placed
            lookup += [walk.stored[n] for n in cats.unregistered]
            # registered nowhere: nothing needs its hash (a huge stray must not hold the run)
            halt.drop(n for n in cats.unregistered if n not in answers)
            todo = planner.plan_hashes(stats, cats.expected, cached, now=now, policy=policy)
            reads.submit(walk.stored[n] for n in sorted(todo))
            clock.lap("compare")
            results = reads.finish()
        except BaseException as err:
            halt.abort.set()
            if reads is not None:
                with contextlib.suppress(Exception):
                    reads.finish()
            lister.shutdown(wait=False, cancel_futures=True)
            failed = listing.exception() if listing.done() and not listing.cancelled() else None
            if isinstance(err, Cancelled) and failed is not None and not self.stop.is_set():
                raise failed from None  # the listing's error is the archive's error
            raise
        lister.shutdown(wait=False)
        if self.stop.is_set():
            raise Cancelled("audit stopped")
        clock.lap("hash")
        # checked last: a deposit from another host registers before it places the file
        findings += self._missing(archive, walk, cats.missing, answers, self.clock(), cached)
        findings += compare.judge_reads(results, cats.expected, walk)
        findings += self._unregistered(target, lookup, answers, aged, results)
        self.cache.forget(
            target.name,
            [
                n
                for n in cached
                if n not in walk.stored and n not in flight.names and walk.complete(n)
            ],
        )
        findings += self._leftovers(archive, walk, flight, aged)
        findings = [f for f in findings if f.kind != PERMISSION or still_wrong(archive, f)]
        clock.lap("finish")
        return ArchiveResult(
            name=target.name,
            path=str(archive.path),
            registered_before=len(before),
            registered_after=len(after),
            stored=len(walk.stored),
            hashed=reads.hashed,
            bytes_hashed=reads.bytes,
            skipped_in_flight=len(cats.in_flight),
            findings=tuple(findings),
            timings=timings,
        )

    def _listing(self, archive: str, timings: dict[str, float]) -> dict[str, str | None]:
        """The registry's listing of ``archive`` (runs beside the walk and the reads)."""
        t0 = time.monotonic()
        listed = list_registered(self.registry, archive)
        timings["list"] = time.monotonic() - t0
        seams.audit_pause("listed")
        return listed

    def _reads(self, archive: str, policy: planner.HashPolicy, halt: Halt) -> HashRun:
        return HashRun(
            archive,
            self.cache,
            self._read,
            workers=self.settings.workers,
            run_id=policy.run_id,
            batch=self.settings.batch,
            batch_seconds=self.settings.batch_seconds,
            cancelled=halt.is_set,
            clock=self.clock,
            progress=self.progress,
        )

    def _missing(
        self,
        archive: Archive,
        walk: Walk,
        candidates: Sequence[str],
        records: Mapping[str, ResourceRecord],
        now: float,
        seen: Container[str],
    ) -> list[Finding]:
        """Listed and still registered here after the walk, not walked: reported unless
        it is there now, is misplaced (reported as such), its stub folder could not be
        listed (that is the finding), or someone else registered it within the grace
        (another host's deposit registers first, then copies: a later run judges it).
        What this daemon deposited itself is reported at once, and so is what an
        earlier run found stored here (``seen``: the cache), as it was placed already."""
        grace = self.settings.staging_grace
        gone = [
            n
            for n in candidates
            if n not in walk.misplaced and walk.complete(n) and not compare.stored_now(archive, n)
        ]
        mine = self.ours(gone) if gone else set()
        return [
            Finding(MISSING_FROM_ARCHIVE, n, None)
            for n in gone
            if n in mine
            or n in seen
            or not compare.registered_within(records.get(n), now=now, grace=grace)
        ]

    def _unregistered(
        self,
        target: AuditTarget,
        candidates: Sequence[Stored],
        records: Mapping[str, ResourceRecord],
        now: float,
        read: Mapping[str, ReadOutcome],
    ) -> list[Finding]:
        """Walked, registered here neither before nor after the walk (``records``: the
        registry's answers after it): gone meanwhile, or placed within the grace (a
        transfer that registers after it copies) = no finding. Registered elsewhere:
        compared with the registered hash (the one read this run, if it was read
        unchanged)."""
        grace = self.settings.staging_grace
        out = []
        for stored in candidates:
            changed = max(stored.stat.mtime_ns, stored.stat.ctime_ns) / 1e9
            if planner.young(changed, now=now, grace=grace) or not os.path.lexists(stored.where):
                continue
            record = records.get(stored.name)
            if record is None:
                out.append(Finding(MISSING_FROM_REGISTRY, stored.name, stored.path))
            elif target.name not in record.locations:
                found = compare.elsewhere(record, stored, partial(self._sha1, read))
                if found is not None:
                    out.append(found)
        return out

    def _leftovers(
        self, archive: Archive, walk: Walk, flight: InFlight, now: float
    ) -> list[Finding]:
        names = planner.staging_leftovers(
            walk.staging, flight.tokens, now=now, grace=self.settings.staging_grace
        )
        return [
            compare.staging_finding(archive.staging_dir / n)
            for n in names
            if os.path.lexists(archive.staging_dir / n)
        ]

    # -- reading ------------------------------------------------------------------------

    def _throttle(self, n: int) -> None:
        if self._halt.is_set():
            raise Cancelled("audit stopped")
        self.limiter(n)

    def _sha1(self, read: Mapping[str, ReadOutcome], stored: Stored) -> str:
        done = read.get(stored.name)
        if isinstance(done, Read) and done.unchanged:
            return done.sha1
        return sha1_of_resource(stored.path, self._throttle, is_dir=stored.is_dir)[0]

    def _read(self, stored: Stored) -> tuple[str, int, bool]:
        """(sha1, bytes, unchanged while read) of one resource; Cancelled after its first
        block once it turns out registered nowhere (:meth:`Halt.drop`)."""
        throttle = self._halt.throttle(stored.name, self._throttle)
        sha1, n = sha1_of_resource(stored.path, throttle, is_dir=stored.is_dir)
        try:
            st = os.lstat(stored.path)
        except OSError:
            return sha1, n, False
        was = stored.stat
        same = st.st_ino == was.inode and (
            stored.is_dir
            or (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            == (was.size, was.mtime_ns, was.ctime_ns)
        )
        return sha1, n, same


__all__ = [
    "AuditSettings",
    "AuditTarget",
    "Auditor",
    "InFlight",
    "journal_in_flight",
    "lower_priority",
    "new_run_id",
]
