"""Audits inside the daemon: one background thread, on schedule, on request, and to resume.

- **Schedule.** The next audit is due ``audit.every`` after the start of the last
  one (kept in the audit cache, so restarts do not postpone it), counted from now
  if that start lies ahead (it ran while the clock was ahead); with no audit yet,
  ``audit.every`` after the daemon started. After an audit that failed (registry
  down, cache not writable, say) the next try comes ``min(every, 1h)`` after the
  failure, never at once.
- **Resume.** A run that was interrupted (daemon stopped or killed) is resumed
  first thing after start-up, with its id, so what it read is not read again.
- **Requests.** ``nbankctl audit [--full]`` queues a request and gets a ticket to
  wait on; requests waiting together are served by one run (full if any asked).
  A request never joins a run already under way: that run may have walked past
  the change the user wants checked.

Each run has a thread of its own: a scheduled or resumed one at a lower CPU
priority (nice 10), one someone asked for at the daemon's. The scheduler never
touches the deposit workers and turns every failure into a report with an
error: an audit cannot stop the daemon.
- **Disabled.** When the audit cache cannot be used at start (a newer nbankd's
  cache, no permission, an I/O error) audits are disabled with the reason, which
  status shows and ``nbankctl audit`` answers (exit 2); a damaged cache is moved
  aside (``cache.sqlite3.bad-<time>``) and a new one started instead.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.audit.cache import (
    CACHE_NAME,
    AuditCache,
    AuditCacheError,
    RunRecord,
    move_aside,
    open_or_reset,
)
from nbankd.audit.model import AuditReport, iso
from nbankd.audit.reader import Cancelled
from nbankd.audit.report import AUDITS_DIR, find_report, latest_report, write_report
from nbankd.audit.run import Auditor
from nbankd.audit.settings import AuditSettings, AuditTarget, InFlight, lower_priority, new_run_id
from nbankd.config import Config
from nbankd.registry.base import Registry

log = structlog.get_logger("nbankd.audit")

RETRY_AFTER_ERROR = 3600.0
MAX_SLEEP = 60.0
KEEP_TICKETS = 100


@dataclass(frozen=True)
class Job:
    tickets: tuple[str, ...]
    full: bool
    trigger: str
    resume: RunRecord | None = None


class AuditsDisabled(errors.ConfigError):
    """Audits cannot run in this daemon (its audit cache cannot be used): ``nbankctl
    audit`` exits 2 with the reason, which names the cache file and the fix."""


class AuditScheduler:
    """The daemon's audit thread (see the module docstring).

    Never raises from its constructor or :meth:`start`: when the audit cache cannot
    be used, audits are *disabled* (:attr:`disabled` says why; status shows it,
    ``nbankctl audit`` answers with it) and the daemon carries on depositing.
    """

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        registry: Callable[[], Registry],
        in_flight: Callable[[], InFlight],
        ours: Callable[[Iterable[str]], set[str]] = lambda names: set(),
        clock: Callable[[], float] = time.time,
        clock_ahead: Callable[[str], float] = lambda archive: 0.0,
    ) -> None:
        self.config = config
        self.clock_ahead = clock_ahead
        self.registry = registry
        self.in_flight = in_flight
        self.ours = ours
        self.clock = clock
        self.folder = Path(AUDITS_DIR)
        self.cache: AuditCache | None = None
        self.last: AuditReport | None = None
        self._disabled: str | None = None
        self._started = clock()
        self._last_started: float | None = None
        self._last_finished: float | None = None
        self._last_failed = False
        self._resume: RunRecord | None = None
        self._queued: list[tuple[str, bool]] = []
        self._running: Job | None = None
        self._running_since: float | None = None
        self._auditor: Auditor | None = None
        self._done: OrderedDict[str, AuditReport] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wanted = False  # start() was called
        try:
            self.folder = config().state_dir / AUDITS_DIR
            self.last = latest_report(self.folder)
            self._open()
        except Exception as err:  # an audit problem must never stop the daemon
            self._disable(err)

    @property
    def cache_path(self) -> Path:
        return self.folder / CACHE_NAME

    @property
    def disabled(self) -> str | None:
        """Why audits are disabled (``audits disabled: <reason>``), or None."""
        return None if self._disabled is None else f"audits disabled: {self._disabled}"

    def _open(self) -> None:
        """Opens the cache (a damaged one is moved aside) and reads where audits stand."""
        cache, bad = open_or_reset(self.cache_path)
        if bad is not None:
            log.warning(
                "audit cache was damaged: moved aside, a new one started (the next audit"
                " re-reads every resource)",
                cache=str(self.cache_path),
                moved_to=str(bad),
            )
        try:
            last = cache.last_finished()
            resume = cache.unfinished_run()
        except BaseException:
            cache.close()
            raise
        self.cache, self._disabled = cache, None
        self._last_failed = self.last is not None and self.last.error is not None
        if last is not None:
            self._remember(last.started, last.finished)
        self._resume = resume

    def _remember(self, started: float, finished: float | None) -> None:
        """Keeps when the last audit started and finished, as the schedule counts from
        them: never later than now (an audit that ran while the clock was ahead must not
        put the next one off until the clock catches up)."""
        now = self.clock()
        self._last_started = min(started, now)
        self._last_finished = None if finished is None else min(finished, now)

    def _disable(self, err: BaseException) -> None:
        reason = str(err) if isinstance(err, errors.NbankdError) else f"{type(err).__name__}: {err}"
        self._disabled = reason
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        log.error("audits disabled", reason=reason, cache=str(self.cache_path))

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Starts the audit thread (not while audits are disabled; a request that finds
        the cache usable again starts it)."""
        self._wanted = True
        if self._disabled is not None:
            return
        if self._resume is not None:
            log.info("resuming an interrupted audit", audit=self._resume.id, full=self._resume.full)
        try:
            self._thread = threading.Thread(target=self._loop, name="audit", daemon=True)
            self._thread.start()
        except RuntimeError as err:  # no more threads: audits wait for a restart
            self._thread = None
            self._disable(err)

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupts a running audit (it resumes at the next start) and ends the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("audit thread still busy at shutdown; it resumes at next start")
                return
        if self.cache is not None:
            self.cache.close()

    # -- requests and status ------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next scheduled audit runs (None while audits are disabled)."""
        if self._disabled is not None:
            return None
        every = self.config().audit.every
        now = self.clock()  # times kept while the clock was ahead count from now
        if self._last_started is None:
            return min(self._started, now) + every
        if self._last_failed:
            failed = min(self._last_finished or self._last_started, now)
            return failed + min(every, RETRY_AFTER_ERROR)
        return min(self._last_started, now) + every

    def request(self, full: bool) -> str:
        """Queues an audit now; returns the ticket to :meth:`wait` on. While audits are
        disabled, first tries the cache again (the user may have fixed it), else raises
        :class:`AuditsDisabled`."""
        if self._disabled is not None:
            self._try_enable()
        ticket = secrets.token_hex(6)
        with self._cond:
            self._queued.append((ticket, full))
            self._cond.notify_all()
        return ticket

    def _try_enable(self) -> None:
        with self._cond:
            if self._disabled is not None:
                try:
                    self._open()
                except Exception as err:
                    self._disable(err)
                    raise self._disabled_error() from err
                log.info("audit cache usable again: audits enabled", cache=str(self.cache_path))
        if self._wanted and self._thread is None:
            self.start()

    def _disabled_error(self) -> AuditsDisabled:
        reason = self._disabled or ""
        where = "" if str(self.cache_path) in reason else f" (audit cache {self.cache_path})"
        return AuditsDisabled(
            f"audits are disabled: {reason}{where}",
            hint="once that is fixed, nbankctl audit tries again",
        )

    def wait(self, ticket: str, timeout: float) -> dict[str, Any] | None:
        """The state of a request after waiting up to ``timeout`` s for it; None if unknown."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                state = self._state(ticket)
                if self._disabled is not None and state is not None and state["state"] != "done":
                    raise self._disabled_error()
                remaining = deadline - time.monotonic()
                if state is None or state["state"] == "done" or remaining <= 0:
                    return state
                if self._stop.is_set():
                    return {"request": ticket, "state": "cancelled"}
                self._cond.wait(min(remaining, 1.0))

    def _state(self, ticket: str) -> dict[str, Any] | None:
        if ticket in self._done:
            return {"request": ticket, "state": "done", "report": self._done[ticket].to_json()}
        if self._running is not None and ticket in self._running.tickets:
            return {"request": ticket, "state": "running", "progress": self._progress()}
        if any(t == ticket for t, _ in self._queued):
            return {"request": ticket, "state": "queued"}
        report = find_report(self.folder, ticket)  # a report id also works
        if report is not None:
            return {"request": ticket, "state": "done", "report": report.to_json()}
        return None

    def _progress(self) -> dict[str, Any]:
        auditor = self._auditor
        return dict(auditor.progress) if auditor is not None else {}

    def status(self) -> dict[str, Any]:
        with self._cond:
            running = self._running
            out: dict[str, Any] = {
                "last_audit": self.last.summary_json() if self.last is not None else None,
                "next_audit": iso(self.next_due()),
                "audit_running": None,
                "audit_disabled": self.disabled,
            }
            if running is not None:
                out["audit_running"] = {
                    "trigger": running.trigger,
                    "full": running.full,
                    "since": iso(self._running_since),
                    **self._progress(),
                }
        return out

    def problems(self) -> list[str]:
        """Why audits make the daemon degraded: disabled, or the last one was not clean."""
        disabled = self.disabled
        if disabled is not None:
            path = str(self.cache_path)
            return [disabled if path in disabled else f"{disabled} (cache {path})"]
        last = self.last
        if last is None or last.ok:
            return []
        where = f" (nbankctl audit, or {last.report_path})" if last.report_path else ""
        if last.error is not None and not last.findings:
            return [f"last audit ({iso(last.finished)}) failed: {last.error}{where}"]
        return [
            f"last audit ({iso(last.finished)}) found problems: "
            + "; ".join(last.problems())
            + where
        ]

    # -- the thread -----------------------------------------------------------------------

    def _next_job(self) -> Job | None:
        if self._resume is not None:
            resume, self._resume = self._resume, None
            return Job((), resume.full, "resume", resume)
        if self._queued:
            tickets = tuple(t for t, _ in self._queued)
            full = any(f for _, f in self._queued)
            self._queued = []
            return Job(tickets, full, "request")
        due = self.next_due()
        if due is not None and self.clock() >= due:
            return Job((), False, "schedule")
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if self._disabled is not None:
                    self._thread = None  # a request that finds the cache usable restarts it
                    return
                job = self._next_job()
                if job is None:
                    due = self.next_due()
                    delay = MAX_SLEEP if due is None else due - self.clock()
                    self._cond.wait(max(0.05, min(delay, MAX_SLEEP)))
                    continue
                self._running, self._running_since = job, self.clock()
            report = None
            try:
                report = self._in_own_thread(job)
            except Exception as err:  # never let the audit thread die, nor spin
                log.exception("audit could not run", trigger=job.trigger)
                report = self._failed(job, err)
            with self._cond:
                self._running = self._auditor = None
                if report is not None:
                    self._record(job, report)
                self._cond.notify_all()

    def _record(self, job: Job, report: AuditReport) -> None:
        self.last = report
        self._remember(report.started, report.finished)
        if report.error is not None:  # the next try comes min(every, 1h) from now
            self._last_finished = self.clock()
        self._last_failed = report.error is not None
        for ticket in job.tickets:
            self._done[ticket] = report
        while len(self._done) > KEEP_TICKETS:
            self._done.popitem(last=False)

    def _in_own_thread(self, job: Job) -> AuditReport | None:
        """Runs the job in a thread of its own, whose priority every thread it starts
        (walk, listing, reads) inherits: a scheduled or resumed audit at nice
        :data:`~nbankd.audit.settings.NICE`, so deposits come first; one someone asked
        for (``nbankctl audit``), and is waiting for, at the daemon's own priority.
        (A thread cannot take back a priority it gave up, hence a thread per job.)"""
        out: dict[str, Any] = {}

        def run() -> None:
            if job.trigger != "request":
                lower_priority()
            try:
                out["report"] = self._execute(job)
            except BaseException as err:  # re-raised in the scheduler's thread
                out["error"] = err
            finally:  # this thread ends: its registry connection with it
                release = getattr(self.registry(), "release_thread", None)
                if release is not None:
                    with contextlib.suppress(Exception):
                        release()

        thread = threading.Thread(target=run, name=f"audit-{job.trigger}", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out.get("report")

    def _execute(self, job: Job) -> AuditReport | None:
        cfg = self.config()
        auditor = Auditor(
            self.registry(),
            self.cache,
            settings=AuditSettings.from_config(cfg.audit),
            in_flight=self.in_flight,
            ours=self.ours,
            clock=self.clock,
            clock_ahead=self.clock_ahead,
            stop=self._stop,
        )
        self._auditor = auditor
        targets = [AuditTarget(a.name, a.path) for a in cfg.archives]
        log.info("audit started", trigger=job.trigger, full=job.full, archives=len(targets))
        try:
            return auditor.run(
                targets,
                full=job.full,
                trigger=job.trigger,
                resume=job.resume,
                report_dir=self.folder,
            )
        except Cancelled:
            log.info("audit interrupted; it resumes at the next start")
            return None

    def _failed(self, job: Job, err: Exception) -> AuditReport:
        """The report of a run that could not complete (the registry or the cache
        failed, or a bug): recorded so that the next try waits (see :meth:`next_due`)."""
        now = self.clock()
        cache = self.cache
        if cache is not None:
            with contextlib.suppress(Exception):  # the cache may be what failed
                cache.abandon_unfinished(now)
        if isinstance(err, AuditCacheError) and err.corrupt:
            self._reset_cache()
        code = err.code if isinstance(err, errors.NbankdError) else "internal"
        message = (
            str(err) if isinstance(err, errors.NbankdError) else f"{type(err).__name__}: {err}"
        )
        report = AuditReport(
            id=new_run_id(now),
            started=self._running_since or now,
            finished=now,
            full=job.full,
            trigger=job.trigger,
            error=message,
            error_code=code,
        )
        try:
            path = write_report(self.folder, report)
        except OSError:
            return report
        return replace(report, report_path=str(path))

    def _reset_cache(self) -> None:
        """A cache found damaged during a run: moved aside, a new one opened (or, if
        that fails too, audits disabled)."""
        with self._cond:
            if self.cache is not None:
                self.cache.close()
                self.cache = None
            try:
                bad = move_aside(self.cache_path)
                log.warning("audit cache was damaged: moved aside", moved_to=str(bad))
                self._open()
            except Exception as err:
                self._disable(err)


__all__ = ["AuditScheduler", "AuditsDisabled"]
