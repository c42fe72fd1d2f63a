"""What the daemon shows of itself: its per-inbox state, a snapshot of everything
status and control read (taken under the daemon's lock, so they never read its
private fields), and the surface the control handlers may use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nbankd.archive.probe import Capabilities
from nbankd.config import Config, InboxConfig
from nbankd.daemon.tally import Tally
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.watch import settle

if TYPE_CHECKING:
    from nbankd.audit.schedule import AuditScheduler
    from nbankd.deposit.manual import ManualInbox
    from nbankd.registry.base import Registry
    from nbankd.watch.wakeups import WatchStatus


class Service(Protocol):
    """What the daemon starts last and stops first: its control socket's server, the
    metrics endpoint, the alert service."""

    def stop(self) -> None: ...


@dataclass
class InboxState:
    """What the main thread knows about one inbox between scans."""

    config: InboxConfig
    tracker: settle.TrackerState = field(default_factory=settle.TrackerState)
    paused: bool = False
    # scans are timed by the monotonic clock (a wall clock step neither makes a file
    # settled nor silences an inbox); last_scan is the wall time, for people
    next_scan: float = 0.0  # time.monotonic()
    last_scan: float | None = None  # time.time()
    last_scan_tick: float | None = None  # time.monotonic()
    scan_took: float = 0.0  # seconds the last scan took (a large inbox: a long one)
    scans: int = 0  # since the daemon started
    archive_problem: str | None = None  # the archive cannot be written: nothing is claimed
    #: the registry records the archive's name at another root, or not at all: inputs
    #: are journaled and wait at their claim, untouched (see RegistrySetup.registration)
    registration_problem: str | None = None
    inbox_problem: str | None = None  # its work or rejected folder was tampered with
    #: why nothing is claimed from it: ``placement: rename`` not proved (or, found while
    #: running, never able to work: see :func:`~nbankd.daemon.setup.check_placement`)
    placement_problem: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # relpath -> why it is left alone
    stalled: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()  # (relpath, why) the scan could not read
    verdicts: dict[str, Any] = field(default_factory=dict)  # relpath -> settle verdict
    #: ready inputs a program held open for writing at their last check (they wait),
    #: with when they are asked again
    open_for_writing: dict[str, float] = field(default_factory=dict)
    writers_unknown: bool = False  # the kernel could not tell for some file (no lease)
    #: ready inputs held, never deposited, for a NAME.reason nbankd wrote beside each
    #: (a rejected folder renamed or moved: :mod:`~nbankd.daemon.rejected_found`)
    held_for_reason: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """The daemon at one instant: taken under its lock by :meth:`DaemonView.snapshot`."""

    now: float
    started: float
    config: Config
    inboxes: Mapping[str, InboxState]  # the states themselves: read, never changed
    running: frozenset[int]  # ids of items a worker is driving
    waiting: tuple[Item, ...]  # items backing off until their next attempt
    watches: Mapping[str, WatchStatus]
    registry_backend: str
    registry_url: str
    registry_problem: str | None  # seen by deposit steps
    setup_problem: str | None  # from the registry's start-up checks
    setup_problems: tuple[str, ...]  # every line the start-up checks report
    state_problem: str | None
    journal_problem: str | None
    last_deposit: dict[str, Any] | None
    last_error: dict[str, Any] | None
    unfinished_switch: dict[str, Any] | None = None  # nbankctl registry switch under way
    tally: Tally = field(default_factory=Tally)  # what finished since the start
    #: archive name -> what its filesystem can do (probed at start and reload)
    capabilities: Mapping[str, Capabilities] = field(default_factory=dict)
    #: the lane of small files stuck in a round, or long waiting for the registry
    lane_problem: str | None = None
    #: inputs failing again and again outside their steps' own error handling (a bug)
    bug_problem: str | None = None
    #: pool workers that have shown no progress for ``wedge_after`` (a step stuck)
    worker_problem: str | None = None
    #: why state_dir/paused.json cannot be read (its pauses not in force), or None
    paused_problem: str | None = None
    #: each configured inbox as deposits see it (its folders as recorded at start)
    specs: Mapping[str, InboxSpec] = field(default_factory=dict)
    #: why the last reload (SIGHUP or ``nbankctl reload``) failed, the running setup
    #: kept; None once a reload succeeds (or since the start)
    reload_problem: str | None = None
    limits_problem: str | None = None  # the process short of file descriptors
    #: the log output: lines dropped since the start, and its problem now (logwriter)
    log_output: Mapping[str, Any] = field(default_factory=lambda: {"dropped": 0, "problem": None})

    @property
    def queue(self) -> int:
        return len(self.running) + len(self.waiting)


class DaemonView(Protocol):
    """What the control handlers use of the daemon: public methods and records."""

    config: Config
    journal: Journal
    registry: Registry
    auditor: AuditScheduler | None
    control: Service | None
    alerts: Service | None
    metrics: Service | None

    def clock(self) -> float: ...
    def snapshot(self) -> Snapshot: ...
    def status(self) -> dict[str, Any]: ...
    def fresh_scan(self, wait: float, *, max_age: float = ...) -> bool: ...
    def request_rescan(self, key: str | None = None) -> None: ...
    def set_paused(self, keys: list[str], paused: bool) -> None: ...
    def reload(self) -> str | None: ...
    def archive_held(self, name: str, path: Path) -> str | None: ...
    def submit_manual(
        self,
        inbox: ManualInbox,
        names: list[str],
        checked: Mapping[str, tuple[int, int]] | None = None,
    ) -> tuple[list[int], list[tuple[str, str]]]: ...


__all__ = ["DaemonView", "InboxState", "Snapshot"]
