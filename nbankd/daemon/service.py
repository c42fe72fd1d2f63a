"""The daemon: watches inboxes, schedules deposit items, and reports its state.

One main thread scans inboxes (woken by inotify, or by the rescan timer), folds
each scan into the settle tracker, and journals a new item for every input that
is ready. A small pool of worker threads drives items through their steps.
Items that must wait (backoff after a transient failure) are handed back to the
main thread, which resubmits them when their time comes.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from nbankd import __version__, errors
from nbankd.archive.probe import Capabilities
from nbankd.audit.run import journal_in_flight
from nbankd.audit.schedule import AuditScheduler
from nbankd.config import Config
from nbankd.config.model import EMBEDDED_DB_NAME, JOURNAL_NAME
from nbankd.daemon import adopt, pauses, setup, statelock
from nbankd.daemon import status as status_mod
from nbankd.daemon.configuring import Configuring
from nbankd.daemon.lane import Lane
from nbankd.daemon.late_archives import LateArchives
from nbankd.daemon.registry_setup import RegistrySetup, open_configured_registry
from nbankd.daemon.scanning import InboxScanning
from nbankd.daemon.tally import Tally, last_deposits
from nbankd.daemon.view import DaemonView, InboxState, Service, Snapshot
from nbankd.daemon.wakeup import Request, Wakeup, install_handlers
from nbankd.daemon.workers import JOURNAL_RETRY, DepositWorkers
from nbankd.deposit import manual
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.registry.base import Registry
from nbankd.service import logwriter
from nbankd.service.limits import descriptor_problem, start_all_threads
from nbankd.versions import dependency_versions
from nbankd.watch.observer import InboxWatcher

log = structlog.get_logger("nbankd.daemon")

WORKERS = 4


class Daemon(Configuring, DepositWorkers, InboxScanning):
    def __init__(
        self,
        config: Config,
        *,
        notifier: Any = None,
        clock: Callable[[], float] = time.time,
        adopt_archives: bool = False,
        serve: Callable[[DaemonView], Service] | None = None,
        serve_metrics: Callable[[DaemonView], Service | None] | None = None,
        serve_alerts: Callable[[DaemonView], Service | None] | None = None,
    ) -> None:
        """``serve`` starts the control socket once the daemon is running (the program's
        start-up passes :func:`nbankd.control.start_control_server`; the daemon package
        never imports the control package that reads it)."""
        self.config = config
        self._serve = serve
        self._serve_metrics = serve_metrics
        self.metrics: Service | None = None
        self._serve_alerts = serve_alerts
        self.alerts: Service | None = None
        self.clock = clock
        #: what settling and scanning are timed by (:class:`~.view.InboxState`)
        self.mono: Callable[[], float] = time.monotonic
        self.adopt_archives = adopt_archives
        self.notifier = notifier
        self.started = clock()
        self._stop = threading.Event()
        self._wake = Wakeup()  # other threads and signal handlers wake the main loop
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time
        self._pause_lock = threading.Lock()  # one pause/resume at a time (set_paused)
        self._paused = pauses.Record(config.state_dir)  # paused.json as last read or written
        self._scanned = threading.Condition()  # notified after each inbox scan
        self._running: dict[int, Future[Item]] = {}
        self._waiting: dict[int, Item] = {}
        #: item id -> (its state, bugs in a row there, its path, the last error)
        self._bugs: dict[int, tuple[str, int, str, str]] = {}
        self._working: dict[str, str] = {}  # a pool worker's thread -> the input it moves
        self.inboxes: dict[str, InboxState] = {}
        self.specs: dict[str, InboxSpec] = {}
        self.retired: dict[str, InboxSpec] = {}  # removed by a reload; items in flight finish
        self.registry_problem: str | None = None  # seen by deposit steps
        self.registry_setup = RegistrySetup(clock)
        #: archives not opened at start, checked for a lost state_dir once they are
        self.late_archives = LateArchives()
        self.last_error: dict[str, Any] | None = None
        self.reload_problem: str | None = None  # why the last reload kept the old setup
        self.last_deposit: dict[str, Any] | None = None
        self.tally = Tally()  # what finished since the start (metrics)
        self.capabilities: dict[str, Capabilities] = {}  # archive name -> what its fs can do
        self.heartbeat = clock()
        self.journal: Journal
        self.registry: Registry
        self.steps: Steps
        self.observer: InboxWatcher | None = None
        self.control: Service | None = None
        self.auditor: AuditScheduler | None = None
        self.state_lock: statelock.StateLock | None = None
        self._state_ids: tuple[tuple[int, int], ...] = ()
        self._state_files: tuple[str, ...] = (JOURNAL_NAME,)
        #: archive name -> seconds this host's clock runs ahead of its file server's
        self.clock_ahead: dict[str, float] = {}
        self._linked: dict[str, bool] = {}  # inbox key -> its path was a link when prepared
        self.state_problem: str | None = None  # state_dir removed or replaced: nothing moves
        self.journal_problem: str | None = None  # the journal could not be written
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="deposit")
        self.lane: Lane | None = None  # small files, in rounds (started with the steps)

    # -- start-up -----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        setup.prepare_state_dir(cfg.state_dir)
        self.state_lock = statelock.acquire(cfg.state_dir)  # before the journal is opened
        self.journal = Journal(cfg.state_dir / JOURNAL_NAME)
        self.registry = open_configured_registry(cfg)
        # the files in use, watched for a replacement (a restore under a running daemon)
        # or a removal: the journal's write-ahead log too (removed, the commits go to a
        # file no one will read again: a claimed input would be stranded by a crash)
        files = (JOURNAL_NAME, EMBEDDED_DB_NAME) if cfg.embedded else (JOURNAL_NAME,)
        wal = JOURNAL_NAME + "-wal"
        self._state_files = (*files, wal) if (cfg.state_dir / wal).exists() else files
        self._state_ids = statelock.identities(cfg.state_dir, *self._state_files)
        for warning in cfg.warnings:  # check-config lists them too
            log.warning("configuration warning", problem=str(warning))
        # each inbox with its earlier rejected folders, never scanned
        self.config = cfg = self._apply_config(cfg)
        # the last deposit of each inbox, as its receipts say (silent-inbox alerts, metrics)
        self.tally.last_deposit.update(last_deposits(cfg.state_dir / "receipts", self.inboxes))
        self.steps = Steps(
            journal=self.journal,
            registry=self.registry,
            inboxes=self._inbox_spec,
            receipts_dir=cfg.state_dir / "receipts",
            clock=self.clock,
            retired=self.retired.get,
            archives=self._archive_path,
            archive_at=self._archive_at,
            registration=self._registration,
        )
        start_all_threads(self.pool, WORKERS, "deposit workers")
        self._start_lane()
        for held in manual.held_rejections(self.journal):  # a stop came before the hand-back
            try:
                manual.return_rejected(held)
            except Exception as err:  # it stays in the rejected folder: never a failed start
                log.error(
                    "a rejected manual deposit could not be put back; it stays in the "
                    "rejected folder",
                    item=held.token,
                    error=repr(err),
                )
        self._prepare_registry()
        self._probe_archives(cfg)
        try:
            self._prove_waiting_placements()  # an archive created by the setup just now
            if self.adopt_archives:
                adopted = adopt.adopt(cfg, self.registry, keep_alive=self._more_start_time)
                log.info(
                    "archives adopted into the registry",
                    resources=adopted.registered,
                    not_adopted=adopted.skipped,
                )
            else:
                adopt.check_not_orphaned(cfg, self.registry)
            self.late_archives = LateArchives(cfg)
            self.late_archives.check_at_start(self.registry, cfg)
        except BaseException:
            self.shutdown()  # the lane too: nbankd does not start, and says only why
            raise
        for item in self.journal.unfinished():
            log.info("resuming", item=item.token, state=str(item.state), inbox=item.inbox)
            self._submit(item)
        self.observer = InboxWatcher(self._on_change, on_removed=self._on_removal)
        self._watch_inboxes()
        self.observer.start()
        self._start_auditor()
        log.info(
            "started",
            version=__version__,
            dependencies=dependency_versions(),
            registry=self.registry.url,
            inboxes=len(self.inboxes),
        )
        try:
            if self._serve is not None:
                self.control = self._serve(self)
            if self._serve_metrics is not None:
                self.metrics = self._serve_metrics(self)
            if self._serve_alerts is not None:
                self.alerts = self._serve_alerts(self)
        except BaseException:
            self.shutdown()
            raise

    def _more_start_time(self, status: str) -> None:
        """Asks the service manager for more time to start (a long adoption), saying
        how far it got (``status``)."""
        if self.notifier is not None:
            self.notifier.extend_timeout(adopt.EXTEND_BY_USEC, status)

    def _start_auditor(self) -> None:
        """Starts scheduled audits in their own thread; a failure here only disables them."""
        try:
            self.auditor = AuditScheduler(
                config=lambda: self.config,
                registry=lambda: self.registry,
                in_flight=journal_in_flight(self.journal),
                ours=self.journal.deposited_names,
                clock=self.clock,
                clock_ahead=lambda name: self.clock_ahead.get(name, 0.0),
            )
            self.auditor.start()
        except (errors.NbankdError, OSError) as err:
            self.auditor = None
            log.error("audits disabled: cannot open the audit cache", error=str(err))

    def _archive_path(self, name: str) -> Path | None:
        """The path of the configured archive called ``name``, if there is one."""
        archive = self.config.archive_named(name)
        return None if archive is None else archive.path

    def _archive_at(self, path: Path) -> str | None:
        """The name of the archive configured at ``path``, if there is one."""
        return next((a.name for a in self.config.archives if a.path == path), None)

    def archive_held(self, name: str, path: Path) -> str | None:
        """Why nothing, not even a manual deposit, may go into archive ``name`` at
        ``path`` now: mounted after the start over a lost state_dir (LateArchives)."""
        return self.late_archives.problem(self.registry, name, path)

    def _registration(self, name: str, path: Path) -> str | None:
        """Why deposits into archive ``name`` at ``path`` wait (the registry records that
        name at another root, or not at all: RegistrySetup.registration; or it was
        mounted after the start over a lost state_dir: LateArchives), or None."""
        return self.registry_setup.registration(
            self.registry, name, path
        ) or self.late_archives.problem(self.registry, name, path)

    # -- main loop ----------------------------------------------------------------

    def _check_state_dir(self) -> None:
        """Notices a state directory (or journal) removed or replaced while running:
        its journal and registry would no longer be the ones on disk, so nothing is
        claimed or driven any more; status says so (see :mod:`.statelock`)."""
        problem = statelock.changed(self.config.state_dir, self._state_files, self._state_ids)
        if problem != self.state_problem:
            if problem is not None:
                log.error("state directory changed under the daemon; deposits stop", error=problem)
            self.state_problem = problem

    def _inbox_spec(self, key: str) -> InboxSpec | None:
        """A configured inbox, or the folder of a manual deposit that an interrupted
        ``nbankctl deposit`` left in this state directory (finished here too)."""
        return self.specs.get(key) or manual.spec_for_key(key)

    def run(self) -> None:
        """Runs until :meth:`stop` or a stop signal; call :meth:`start` first."""
        self._take(self._wake.pending())  # a signal that came during start()
        while not self._stop.is_set():
            now = self.clock()
            tick = self.mono()  # scans and settling: never the wall clock
            self.heartbeat = now if not self._running else self.heartbeat
            self._check_state_dir()
            for key, state in list(self.inboxes.items()):
                if state.next_scan <= tick:
                    started = self.mono()  # its own: an earlier inbox's scan may be long
                    try:
                        self._scan(key, state, started)
                        state.scan_took = self.mono() - started
                    except OSError as err:
                        limit = errors.process_limit_problem(err, f"scanning inbox {key}")
                        log.error("cannot scan inbox", inbox=key, error=limit or str(err))
                        retry = JOURNAL_RETRY if limit is not None else 60.0  # soon: a burst
                        state.next_scan = tick + min(retry, state.config.rescan_every)
                    except sqlite3.Error as err:  # journaling a new item failed
                        self._journal_failed(err)
                        state.next_scan = tick + min(JOURNAL_RETRY, state.config.rescan_every)
                    except Exception as err:  # a bug: that inbox waits, the others go on
                        log.exception("unexpected error scanning an inbox", inbox=key)
                        self.last_error = {"time": now, "inbox": key, "error": repr(err)}
                        state.next_scan = tick + min(60.0, state.config.rescan_every)
                    with self._scanned:
                        self._scanned.notify_all()
            watch_due = self._check_watches(tick)
            next_due = self._resubmit_due(now)
            ticks = [s.next_scan for s in self.inboxes.values()]
            if watch_due is not None:
                ticks.append(watch_due)
            setup_due = self.registry_setup.retry_if_due(
                now, lambda: self._prepare_registry(retry=True)
            )
            walls = [t for t in (next_due, setup_due) if t is not None]
            timeout = max(
                0.05,
                min(
                    min(ticks, default=tick + 60) - self.mono(),
                    min(walls, default=now + 60) - self.clock(),
                ),
            )
            if self.notifier is not None:
                timeout = min(timeout, self.notifier.tick(self))
            self._take(self._wake.wait(min(timeout, 60.0)))

    def _take(self, requests: list[tuple[Request, int | None]]) -> None:
        """Acts on what signal handlers asked for, here in the main loop (see wakeup.py)."""
        for request, signum in requests:
            name = signal.Signals(signum).name if signum is not None else None
            if request is Request.STOP and not self._stop.is_set():
                log.info("stopping", signal=name)
                self._stop.set()
            elif request is Request.RELOAD:
                self._start_reload()

    def _start_reload(self) -> None:
        """Starts a reload (SIGHUP) in a thread of its own; when no thread can be
        started, the reload fails: logged, and status says so until one succeeds."""
        try:
            threading.Thread(target=self.reload, name="reload", daemon=True).start()
        except RuntimeError as err:
            if not errors.thread_refused(err):
                raise
            problem = str(errors.thread_limit("starting the reload"))
            log.error("reload failed; the running configuration is kept", error=problem)
            with self._lock:
                self.reload_problem = problem

    def _check_watches(self, tick: float) -> float | None:
        """Re-arms watches, runs their liveness checks, and polls every inbox whose
        watch failed at ``fallback_poll_every``; returns when to check again (all
        times on the monotonic clock)."""
        if self.observer is None:
            return None
        due = self.observer.check()
        for key, watch in self.observer.rearm().items():
            state = self.inboxes.get(key)
            if state is not None and watch.degraded:
                last = state.last_scan_tick if state.last_scan_tick is not None else tick
                poll_at = last + state.config.fallback_poll_every
                state.next_scan = min(state.next_scan, poll_at)
        return None if due is None else max(tick, due)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self, grace: float = 5.0) -> None:
        """Stops watching and waits up to ``grace`` seconds for running steps.

        A step still running after that is abandoned: its item resumes from the
        journal at the next start, so nothing is lost.
        """
        if self.alerts is not None:
            self.alerts.stop()
            self.alerts = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.observer is not None:
            self.observer.stop()
        if self.auditor is not None:
            self.auditor.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.lane is not None:
            self.lane.stop()
        deadline = time.monotonic() + grace
        for future in list(self._running.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(Exception):
                future.result(timeout=remaining)
        self.registry.close()

    # -- reporting ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything status and control read, at one instant (under the lock)."""
        watches = self.observer.status() if self.observer is not None else {}
        setup = self.registry_setup.last
        try:
            switch = pauses.unfinished_switch(self.config.state_dir)
        except OSError:  # out of descriptors: not known now; told by descriptor_problem
            switch = None
        paused_problem = pauses.problem(self.config.state_dir)
        lane = self.lane.problem(self.clock()) if self.lane is not None else None
        liveness = self.notifier
        beats = getattr(liveness, "heartbeat", None)
        wedge_after = getattr(liveness, "wedge_after", None)
        stale = beats.stale(time.monotonic(), wedge_after) if beats and wedge_after else []
        limits = descriptor_problem()
        log_output = logwriter.OUTPUT.status()
        with self._lock:
            return Snapshot(
                now=self.clock(),
                started=self.started,
                config=self.config,
                inboxes=dict(self.inboxes),
                specs=dict(self.specs),
                paused_problem=paused_problem,
                running=frozenset(self._running),
                waiting=tuple(self._waiting.values()),
                watches=watches,
                registry_backend=self.registry.backend,
                registry_url=self.registry.url,
                registry_problem=self.registry_problem,
                setup_problem=setup.registry_problem,
                setup_problems=tuple(self.registry_setup.problems()),
                state_problem=self.state_problem,
                journal_problem=self.journal_problem,
                last_deposit=self.last_deposit,
                last_error=self.last_error,
                unfinished_switch=switch,
                tally=self.tally.copy(),
                capabilities=dict(self.capabilities),
                lane_problem=lane,
                bug_problem=status_mod.bug_problem(self._bugs.values()),
                worker_problem=status_mod.worker_problem(
                    {n: self._working[n] for n in stale if n in self._working}, wedge_after
                ),
                reload_problem=self.reload_problem,
                limits_problem=limits,
                log_output=log_output,
            )

    def status_line(self) -> str:
        """One line for systemd's STATUS=: queue depth and the last deposit."""
        return status_mod.status_line(self.snapshot())

    def status(self) -> dict[str, Any]:
        """The status document (see :mod:`nbankd.daemon.status`)."""
        snap = self.snapshot()
        return status_mod.build_status(snap, self.journal.counts(), self.journal.unfinished())


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM/SIGINT stop the daemon, SIGHUP reloads it, acted on by its main loop."""
    install_handlers(daemon._wake)


def state_paths(state_dir: Path) -> dict[str, Path]:
    return {"journal": state_dir / JOURNAL_NAME, "receipts": state_dir / "receipts"}
