"""The registry's part of start-up (datatypes, archive creation and registration), retried.

:func:`~nbankd.daemon.setup.ensure_datatypes` and
:func:`~nbankd.daemon.setup.ensure_archives` run at start and at every reload.
When they cannot finish for a reason that may pass by itself (the registry
unreachable or answering 5xx, an archive's filesystem not mounted yet),
:class:`RegistrySetup` keeps a due time and the daemon's main loop runs them again,
in a thread of their own, on a capped exponential backoff until they succeed: a
daemon first started during an outage recovers without a restart. Problems only
the operator can fix (a refused login, an archive registered under another name)
wait for a reload instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from nbankd import errors
from nbankd.config import Config
from nbankd.daemon import setup
from nbankd.deposit.lifecycle import backoff_delay
from nbankd.registry.base import Registry
from nbankd.registry.factory import open_registry

log = structlog.get_logger("nbankd.daemon")

# seconds between attempts at most (or an inbox's rescan_every, if shorter)
RETRY_MAX = 60.0


def open_configured_registry(config: Config) -> Registry:
    """The registry ``config`` names, with its credentials."""
    return open_registry(
        config.registry,
        embedded_db=config.embedded_db_path,
        served_url=config.registry_url,
        registry_auth=config.registry_auth,
    )


#: (registry URL, archive name, archive root) -> why deposits into that archive wait
#: (its registry record missing or at another root), or None: checked, registered there
Registrations = Mapping[tuple[str, str, str], str | None]


@dataclass(frozen=True)
class SetupResult:
    """What one run of the start-up checks left undone."""

    registry_problem: str | None = None  # the registry was unreachable or refused the checks
    registry_transient: bool = False
    archive_problems: tuple[setup.ArchiveProblem, ...] = ()
    missing_datatypes: tuple[str, ...] = ()
    #: what the run found of each archive's registration (those it could check)
    registrations: Registrations = field(default_factory=dict)

    @property
    def retry(self) -> bool:
        """True when running the checks again later may succeed."""
        if self.registry_problem is not None:
            return self.registry_transient
        return any(p.transient for p in self.archive_problems)


def check(config: Config, registry: Registry) -> SetupResult:
    """Runs the start-up checks once; never raises for registry or archive problems."""
    try:
        missing = setup.ensure_datatypes(config, registry)
        problems = setup.ensure_archives(config, registry)
    except errors.RegistryError as err:
        return SetupResult(registry_problem=str(err), registry_transient=err.transient)
    # an archive without a problem was found registered; one with a problem of another
    # kind (unmounted, the registry's answer lost) is not known: a deposit asks
    found = {p.archive: p for p in problems}
    registrations = {
        (registry.url, a.name, a.root): found[a.name].message if a.name in found else None
        for a in config.archives
        if a.name not in found or found[a.name].unregistered
    }
    return SetupResult(
        archive_problems=tuple(problems),
        missing_datatypes=tuple(missing),
        registrations=registrations,
    )


class RegistrySetup:
    """Runs the start-up checks, and again on a backoff while they fail transiently."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # one run at a time (main loop's retry vs. reload)
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.due: float | None = None  # when to run again; None: nothing to retry
        self.last = SetupResult()
        self._asked: dict[tuple[str, str, str], str | None] = {}  # see registration()
        self._asked_lock = threading.Lock()

    def run(self, config: Config, registry: Registry, *, retry: bool = False) -> SetupResult:
        """Runs the checks now, logs their problems, and schedules a retry if needed.

        A ``retry`` logs only what changed since the previous run.
        """
        with self._lock:
            result = check(config, registry)
            self._log(result, self.last if retry else SetupResult(), retrying=self.failures > 0)
            if result.retry:
                self.failures += 1
                cap = min([RETRY_MAX, *(i.rescan_every for i in config.inboxes)])
                self.due = self._clock() + min(cap, backoff_delay(self.failures))
            else:
                self.failures, self.due = 0, None
            with self._asked_lock:
                self.last = result
                self._asked = {}
            return result

    def registration(
        self, registry: Registry, name: str, path: Path, *, ask: bool = True
    ) -> str | None:
        """Why deposits into archive ``name`` at ``path`` wait (``registry`` has no
        record of that name with that root: :func:`~nbankd.daemon.setup.registration_problem`),
        or None: as the last run of the checks found it, else (an archive configured
        since, or one the run could not check) asked now and remembered until the next
        run; with ``ask`` false, never asked (None when not known). A registry that does
        not answer raises (the deposit step waits)."""
        key = (registry.url, name, str(path))
        with self._asked_lock:
            last, asked = self.last.registrations, self._asked
            if key in last:
                return last[key]
            if key in asked or not ask:
                return asked.get(key)
        problem = setup.registration_problem(registry, name, path)
        with self._asked_lock:
            if asked is self._asked:  # not a run's since: it found what is true now
                asked[key] = problem
        return problem

    def retry_if_due(self, now: float, run: Callable[[], object]) -> float | None:
        """Starts ``run`` in a thread when a retry is due; returns the next due time."""
        due = self.due
        if due is None or due > now:
            return due
        if self._thread is not None and self._thread.is_alive():
            return now + 1.0
        # a placeholder until the run reschedules (or clears) it: no busy loop meanwhile
        self.due = now + RETRY_MAX
        self._thread = threading.Thread(
            target=self._guarded, args=(run,), name="registry-setup", daemon=True
        )
        self._thread.start()
        return self.due

    def _guarded(self, run: Callable[[], object]) -> None:
        try:
            run()
        except Exception:  # a bug: keep retrying at the slowest pace, and say so
            log.exception("unexpected error in the registry start-up checks")

    def problems(self) -> list[str]:
        """Status lines for what the last run left undone (empty when all is set up)."""
        last = self.last
        out = []
        if last.registry_problem is not None:
            out.append(f"registry: start-up checks failed: {last.registry_problem}")
        for p in last.archive_problems:
            retry = " (retrying)" if p.transient else ""
            out.append(f"archive {p.archive} not ready: {p.message}{retry}")
        return out

    @staticmethod
    def _log(result: SetupResult, previous: SetupResult, *, retrying: bool) -> None:
        if result.registry_problem is not None:
            if result.registry_problem == previous.registry_problem:
                log.debug("registry still unreachable", error=result.registry_problem)
            elif result.registry_transient:
                log.warning(
                    "registry unreachable; deposits wait for it and start-up checks retry",
                    error=result.registry_problem,
                )
            else:
                log.error("registry refused start-up checks", error=result.registry_problem)
            return
        if retrying and not result.retry:
            log.info("registry start-up checks done; deposits resume")
        for name in result.missing_datatypes:
            if name not in previous.missing_datatypes:
                log.error(
                    "datatype missing in the registry",
                    dtype=name,
                    hint="create it with 'nbankctl dtype add'",
                )
        seen = {(p.archive, p.message) for p in previous.archive_problems}
        for p in result.archive_problems:
            if (p.archive, p.message) not in seen:
                log.error("archive not usable", archive=p.archive, error=p.message)
