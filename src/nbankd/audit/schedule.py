"""Audits inside the daemon: one background thread, on schedule, on request, and to resume.

- **Schedule.** The next audit is due ``audit.every`` after the start of the last
  one (kept in the audit cache, so restarts do not postpone it); with no audit yet,
  ``audit.every`` after the daemon started. After an audit that failed (registry
  down, say) the next try comes within an hour.
- **Resume.** A run that was interrupted (daemon stopped or killed) is resumed
  first thing after start-up, with its start time, so what it read is not read again.
- **Requests.** ``nbankctl audit [--full]`` queues a request and gets a ticket to
  wait on; requests waiting together are served by one run (full if any asked).
  A request never joins a run already under way: that run may have walked past
  the change the user wants checked.

The thread runs at a lower CPU priority, never touches the deposit workers, and
turns every failure into a report with an error: an audit cannot stop the daemon.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from nbankd.audit.cache import CACHE_NAME, AuditCache, RunRecord
from nbankd.audit.model import AuditReport, iso
from nbankd.audit.reader import Cancelled
from nbankd.audit.report import AUDITS_DIR, find_report, latest_report, write_report
from nbankd.audit.run import (
    Auditor,
    AuditSettings,
    AuditTarget,
    InFlight,
    lower_priority,
    new_run_id,
)
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


class AuditScheduler:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        registry: Callable[[], Registry],
        in_flight: Callable[[], InFlight],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry
        self.in_flight = in_flight
        self.clock = clock
        self.folder = config().state_dir / AUDITS_DIR
        self.cache = AuditCache(self.folder / CACHE_NAME)
        self.last: AuditReport | None = latest_report(self.folder)
        self._started = clock()
        last = self.cache.last_finished()
        self._last_started = last.started if last is not None else None
        self._last_finished = last.finished if last is not None else None
        self._last_failed = self.last is not None and self.last.error is not None
        self._resume = self.cache.unfinished_run()
        self._queued: list[tuple[str, bool]] = []
        self._running: Job | None = None
        self._running_since: float | None = None
        self._auditor: Auditor | None = None
        self._done: OrderedDict[str, AuditReport] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._resume is not None:
            log.info("resuming an interrupted audit", audit=self._resume.id, full=self._resume.full)
        self._thread = threading.Thread(target=self._loop, name="audit", daemon=True)
        self._thread.start()

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
        self.cache.close()

    # -- requests and status ------------------------------------------------------------

    def next_due(self) -> float:
        every = self.config().audit.every
        if self._last_started is None:
            return self._started + every
        if self._last_failed:
            return (self._last_finished or self._last_started) + min(every, RETRY_AFTER_ERROR)
        return self._last_started + every

    def request(self, full: bool) -> str:
        """Queues an audit now; returns the ticket to :meth:`wait` on."""
        ticket = secrets.token_hex(6)
        with self._cond:
            self._queued.append((ticket, full))
            self._cond.notify_all()
        return ticket

    def wait(self, ticket: str, timeout: float) -> dict[str, Any] | None:
        """The state of a request after waiting up to ``timeout`` s for it; None if unknown."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                state = self._state(ticket)
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
        """Why the last audit makes the daemon degraded (empty when it was clean)."""
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
        if self.clock() >= self.next_due():
            return Job((), False, "schedule")
        return None

    def _loop(self) -> None:
        lower_priority()
        while not self._stop.is_set():
            with self._cond:
                job = self._next_job()
                if job is None:
                    self._cond.wait(max(0.05, min(self.next_due() - self.clock(), MAX_SLEEP)))
                    continue
                self._running, self._running_since = job, self.clock()
            report = None
            try:
                report = self._execute(job)
            except Exception:  # never let the audit thread die
                log.exception("audit could not run", trigger=job.trigger)
            with self._cond:
                self._running = self._auditor = None
                if report is not None:
                    self._record(job, report)
                self._cond.notify_all()

    def _record(self, job: Job, report: AuditReport) -> None:
        self.last = report
        self._last_started, self._last_finished = report.started, report.finished
        self._last_failed = report.error is not None
        for ticket in job.tickets:
            self._done[ticket] = report
        while len(self._done) > KEEP_TICKETS:
            self._done.popitem(last=False)

    def _execute(self, job: Job) -> AuditReport | None:
        cfg = self.config()
        auditor = Auditor(
            self.registry(),
            self.cache,
            settings=AuditSettings.from_config(cfg.audit),
            in_flight=self.in_flight,
            clock=self.clock,
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
        except Exception as err:  # a bug or an unexpected failure: report it, keep running
            log.exception("audit failed", trigger=job.trigger)
            now = self.clock()
            self.cache.abandon_unfinished(now)
            report = AuditReport(
                id=new_run_id(now),
                started=self._running_since or now,
                finished=now,
                full=job.full,
                trigger=job.trigger,
                error=f"{type(err).__name__}: {err}",
            )
            try:
                path = write_report(self.folder, report)
            except OSError:
                return report
            return AuditReport.from_json({**report.to_json(), "report": str(path)})


__all__ = ["AuditScheduler"]
