"""The daemon's scanning half: watching inboxes and folding each scan into the settle
tracker; the inputs a scan finds ready (and unsafe entries) go to
:meth:`~nbankd.daemon.intents.IntentJournaling._start_items` of its base
(:mod:`nbankd.daemon.intents`), which journals a new item (its whole intent) for each.
A mixin of :class:`~nbankd.daemon.service.Daemon`, whose state it uses: the
configuration, ``inboxes`` and ``specs``, the journal, the observer, the wake-up
events and the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection

import structlog

from nbankd.config import Config
from nbankd.daemon import rejected_dirs, rejected_found, setup
from nbankd.daemon.intents import CHANGE_SCAN_GAP, HELD_RECHECK, IntentJournaling
from nbankd.daemon.late_archives import LateArchives
from nbankd.daemon.registry_setup import RegistrySetup
from nbankd.daemon.view import InboxState
from nbankd.daemon.wakeup import Wakeup
from nbankd.deposit.journal import Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.names import printable
from nbankd.registry.base import Registry
from nbankd.watch import settle
from nbankd.watch.identity import Identity
from nbankd.watch.observer import InboxWatcher
from nbankd.watch.scan import scan_inbox

log = structlog.get_logger("nbankd.daemon")

#: as :data:`~nbankd.daemon.intents.CHANGE_SCAN_GAP`, for names that only left an inbox
#: (a claim moving an input into the work folder, a deletion): nothing can have become
#: ready, the scan only refreshes status
REMOVAL_SCAN_GAP = 5.0


class InboxScanning(IntentJournaling):
    """Watching and scanning inboxes (see the module's text)."""

    # the daemon's state this half uses (set by Daemon.__init__ and start)
    config: Config
    clock: Callable[[], float]
    mono: Callable[[], float]
    inboxes: dict[str, InboxState]
    specs: dict[str, InboxSpec]
    journal: Journal
    registry: Registry
    registry_setup: RegistrySetup
    late_archives: LateArchives
    observer: InboxWatcher | None
    state_problem: str | None
    _wake: Wakeup
    _scanned: threading.Condition

    def _forget_rejected_dirs(self, key: str, gone: Collection[str]) -> None:
        raise NotImplementedError  # the daemon's configuring half

    # -- watching and scanning ------------------------------------------------------

    def _watch_inboxes(self, keys: Collection[str] | None = None) -> None:
        """Watches every inbox (or those of ``keys``) as configured now."""
        if self.observer is None:
            return
        for key, state in list(self.inboxes.items()):
            if keys is not None and key not in keys:
                continue
            inbox = state.config
            self.observer.add_inbox(
                key,
                inbox.path,
                mode=inbox.watch,
                recursive=inbox.recursive or inbox.folder_resources,
                exclude=inbox.exclusions,
                ignore=inbox.ignore,
                check_every=inbox.watch_check_every,
            )

    def _on_change(
        self, inbox_key: str, relpath: str = "", *, gap: float = CHANGE_SCAN_GAP
    ) -> None:
        """A change in an inbox: scanned soon, but at most every ``gap`` seconds (a
        burst of files sends a stream of events; each scan lists the whole inbox), and
        after a long scan (a large inbox) no sooner than twice its length after its end:
        a writer trickling into an inbox of 20,000 files never keeps the daemon
        scanning back to back."""
        state = self.inboxes.get(inbox_key)
        if state is not None:
            took = state.scan_took
            last = (state.last_scan_tick or 0.0) + took
            gap = max(gap, 2 * took)
            state.next_scan = min(state.next_scan, last + gap)
        self._wake.set()

    def _on_removal(self, inbox_key: str, relpath: str = "") -> None:
        """A name left an inbox (the daemon's own claims send one per input): scanned
        within REMOVAL_SCAN_GAP seconds, for the status only."""
        self._on_change(inbox_key, relpath, gap=REMOVAL_SCAN_GAP)

    def request_rescan(self, inbox_key: str | None = None) -> None:
        for key, state in self.inboxes.items():
            if inbox_key is None or key == inbox_key:
                state.next_scan = 0.0
        self._wake.set()

    def fresh_scan(self, timeout: float, max_age: float = 2.0) -> bool:
        """Makes sure every inbox was scanned within the last ``max_age`` seconds: asks
        for a scan and waits up to ``timeout`` for it; True when they were. Scans
        younger than ``max_age`` are used as they are, so repeated requests (a reader
        asking ``queue`` in a loop) cannot keep the daemon rescanning."""
        asked = self.mono() - max_age

        def done() -> bool:
            states = list(self.inboxes.values())
            return all(s.last_scan_tick is not None and s.last_scan_tick >= asked for s in states)

        if done():
            return True
        self.request_rescan()
        with self._scanned:
            return self._scanned.wait_for(done, timeout)

    def _scan(self, key: str, state: InboxState, now: float) -> None:
        """Scans one inbox; ``now`` is on the monotonic clock (:meth:`mono`)."""
        inbox = state.config
        state.last_scan = self.clock()
        state.last_scan_tick = now
        state.scans += 1
        state.next_scan = now + inbox.rescan_every
        archive = self.config.archive_for(inbox)
        problem = setup.archive_usable(
            archive.path, self.registry.url, self.config.registry_aliases
        )
        if problem != state.archive_problem:
            if problem is None:
                log.info("archive usable again; deposits resume", inbox=key)
            else:
                log.error("archive not usable; deposits wait", inbox=key, error=problem)
        state.archive_problem = problem
        # as the registry checks found it (never asked here): its inputs wait at their
        # claim, which asks when it is not known
        registration = self.registry_setup.registration(
            self.registry, archive.name, archive.path, ask=False
        )
        if registration is None and problem is None:  # mounted since the start?
            registration = self.late_archives.problem(
                self.registry, archive.name, archive.path, ask=False
            )
        if registration != state.registration_problem:
            if registration is None:
                log.info("archive registered where configured; deposits resume", inbox=key)
            else:
                log.error("archive not registered where configured", inbox=key, error=registration)
        state.registration_problem = registration
        spec = self.specs.get(key)
        tampered, root_id = setup.inbox_folders_problem(spec) if spec is not None else (None, None)
        if tampered != state.inbox_problem:
            if tampered is None:
                log.info("inbox folders usable again; deposits resume", inbox=key)
            else:
                log.error("inbox folder tampered with; deposits wait", inbox=key, error=tampered)
        state.inbox_problem = tampered
        if (
            state.placement_problem is not None
            and spec is not None
            and problem is None
            and tampered is None
        ):
            self._prove_placement(key, state, spec)
        if self.observer is not None and spec is not None:
            self.observer.accept_root(key, root_id)
        if tampered is not None:  # nothing is listed or watched through a replaced folder
            return
        gone = [
            d
            for d in inbox.earlier_rejected_dirs
            if not rejected_dirs.present(inbox.path, d)
            or not rejected_dirs.holds_rejection(
                inbox.path, d, skip=(o for o in inbox.rejected_dirs if o.startswith(d + "/"))
            )
        ]
        gone += [d for d in inbox.former_work_dirs if not rejected_dirs.present(inbox.path, d)]
        if gone:  # removed or emptied by a person: an ordinary folder of the inbox again
            self._forget_rejected_dirs(key, gone)
            inbox = state.config
        folders: dict[int, str] | None = {} if inbox.watch == "auto" else None
        entries = scan_inbox(
            inbox.path,
            recursive=inbox.recursive,
            ignore=inbox.ignore,
            exclude=inbox.exclusions,
            directories_as_resources=inbox.folder_resources,
            markers=inbox.ready == "marker",
            folders=folders,
            known=_seen_identity(state.tracker),
            root_id=root_id,
        )
        if folders is not None and self.observer is not None:
            self.observer.verify_coverage(key, folders)
        policy = settle.SettlePolicy(
            settle_seconds=inbox.settle_seconds,
            stall_after=inbox.stall_after,
            ready_mode=settle.ReadyMode(inbox.ready),
        )
        # what the listing found, stamped when the listing ended: a file written while
        # a long listing ran never counts as settled for longer than it was
        now = self.mono()
        result = settle.step(state.tracker, entries, now, policy)
        state.tracker = result.state
        # step's own dict, not a copy: a backlog of 100,000 files needs only one
        verdicts = result.verdicts
        before = state.verdicts
        state.verdicts = verdicts if isinstance(verdicts, dict) else dict(verdicts)
        if state.open_for_writing:  # held back at an earlier scan: still why they wait
            watches = state.tracker.watches
            state.open_for_writing = {
                r: until for r, until in state.open_for_writing.items() if r in watches
            }
            held = settle.open_verdict(max(inbox.settle_seconds, HELD_RECHECK))
            for rel in state.open_for_writing:
                if state.verdicts[rel].state is settle.State.SETTLING:
                    state.verdicts[rel] = held
        state.skipped = {e.relpath: e.kind.name.lower() for e in result.unsafe}
        stalled = tuple(e.relpath for e in result.stalled)
        for rel in set(stalled) - set(state.stalled):
            why = result.verdicts[rel].reason
            if why.startswith("stalled: two sidecars"):
                log.warning("input has two sidecars", inbox=key, source=rel, reason=why)
            else:
                log.warning(
                    "file still changing", inbox=key, source=rel, stall_after=inbox.stall_after
                )
        state.stalled = stalled
        unreadable = tuple((e.relpath, e.problem or "") for e in result.problems)
        if unreadable and unreadable != state.unreadable:
            rel, why = unreadable[0]
            log.warning(
                "cannot read part of the inbox",
                inbox=key,
                count=len(unreadable),
                first=printable(rel),
                error=why,
            )
        state.unreadable = unreadable
        ready = rejected_found.not_rejected_inputs(key, state, result.ready, before, self.journal)
        if (
            state.paused
            or state.archive_problem is not None
            or state.inbox_problem is not None
            or state.placement_problem is not None
            or self.state_problem is not None
        ):
            state.open_for_writing = {}  # not asked while nothing starts: not known either
            return
        self._start_items(
            key, state, [(e, False) for e in ready] + [(e, True) for e in result.unsafe]
        )
        deadline = settle.next_deadline(state.tracker)
        if deadline is not None:
            state.next_scan = min(state.next_scan, deadline)

    def _prove_placement(self, key: str, state: InboxState, spec: InboxSpec) -> None:
        """Tries again to prove ``placement: rename`` of an inbox not proved yet (its
        archive unmounted or not made at start): nothing is claimed from it before. Found
        unable ever to work while running, it says so and its deposits wait."""
        check = setup.check_placement(spec)
        if check.shown == state.placement_problem:
            return
        if check.problem is None:
            log.info("placement: rename proved; deposits resume", inbox=key)
        elif check.refused:
            log.error("inbox's placement cannot work; deposits wait", inbox=key, error=check.shown)
        else:
            log.warning("inbox not taking deposits yet", inbox=key, error=check.shown)
        state.placement_problem = check.shown


def _seen_identity(tracker: settle.TrackerState) -> Callable[[str], Identity | None]:
    """For :func:`scan_inbox`: the identity the tracker holds for a relpath, if any."""
    watches = tracker.watches

    def seen(relpath: str) -> Identity | None:
        watch = watches.get(relpath)
        return None if watch is None else watch.identity

    return seen
