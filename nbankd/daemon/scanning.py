"""The daemon's scanning half: watching inboxes, folding each scan into the settle
tracker, and journaling a new item (its whole intent) for every input that is
ready. A mixin of :class:`~nbankd.daemon.service.Daemon`, whose state it uses: the
configuration, ``inboxes`` and ``specs``, the journal, the observer, the wake-up
events and the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import structlog

from nbankd import seams
from nbankd.config import Config
from nbankd.daemon import rejected_dirs, rejected_found, setup
from nbankd.daemon.late_archives import LateArchives
from nbankd.daemon.registry_setup import RegistrySetup
from nbankd.daemon.view import InboxState
from nbankd.daemon.wakeup import Wakeup
from nbankd.deposit import folderproof
from nbankd.deposit.identity import MARKER_KEY, marker_seen, tree_seen
from nbankd.deposit.inboxfs import Escape, InboxFS, Tampered
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.names import MARKER_SUFFIX, SIDECAR_SUFFIXES, printable
from nbankd.registry.base import Registry
from nbankd.watch import settle, writers
from nbankd.watch.identity import Identity
from nbankd.watch.observer import InboxWatcher
from nbankd.watch.scan import EntryKind, scan_inbox

log = structlog.get_logger("nbankd.daemon")

UNSAFE_WHAT = {
    "SYMLINK": "a symbolic link",
    "HARDLINK": "a hard link (the file has other names)",
    "FIFO": "a FIFO",
    "SOCKET": "a socket",
    "DEVICE": "a device file",
}


#: seconds: a file held open for writing is asked about again after settle_seconds,
#: but never sooner than this (settle_seconds may be 0: no rescan loop for one file)
HELD_RECHECK = 5.0
#: the inputs asked whether a program still holds them open for writing
_ASKED = frozenset({EntryKind.FILE, EntryKind.DIRECTORY_RESOURCE})
#: seconds between two scans of one inbox that changes arrive for (explicit rescans
#: and settle deadlines are not held back)
CHANGE_SCAN_GAP = 0.2
#: the same for names that only left an inbox (a claim moving an input into the work
#: folder, a deletion): nothing can have become ready, the scan only refreshes status
REMOVAL_SCAN_GAP = 5.0


class InboxScanning:
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

    def _submit(self, item: Item) -> None:
        raise NotImplementedError  # the daemon's workers

    def _journal_ok(self) -> None:
        raise NotImplementedError  # the daemon's journal health

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

    def _not_open_for_writing(
        self, key: str, state: InboxState, todo: list[tuple[Any, bool]], now: float
    ) -> list[tuple[Any, bool]]:
        """The entries to start (entry, unsafe) but the files some program holds open
        for writing (quiet for longer than the settle time, not finished): each of those
        settles again, and is asked about again once it has stayed unchanged that long.
        Only entries about to be journaled are asked: never those already in flight."""
        waiting = state.open_for_writing
        if waiting:  # held at an earlier scan: asked again only once their time comes
            todo = [(e, u) for e, u in todo if waiting.get(e.relpath, 0.0) <= now]
            later = [until for until in waiting.values() if until > now]
            if later:
                state.next_scan = min(state.next_scan, min(later))
        inputs = [e for e, unsafe in todo if not unsafe and e.kind in _ASKED]
        spec = self.specs.get(key)
        if not inputs or spec is None:
            return todo
        asked = [e.relpath for e in inputs]
        pairs = [(e.relpath, e.kind is EntryKind.DIRECTORY_RESOURCE) for e in inputs]
        # a sidecar some program still writes holds its input back too
        owner = {
            e.relpath + suffix: e.relpath
            for e in inputs
            for suffix in SIDECAR_SUFFIXES
            if e.relpath + suffix in state.tracker.watches
        }
        held, unknown = open_for_writing(spec, pairs + [(car, False) for car in owner])
        held = list(dict.fromkeys(owner.get(rel, rel) for rel in held))
        unknown = [rel for rel in unknown if rel not in owner]
        if unknown and not state.writers_unknown:
            log.info(
                "cannot tell whether files are still open for writing: settling alone "
                "decides (leases need the files' owner or CAP_LEASE, and a local filesystem)",
                inbox=key,
                first=printable(unknown[0]),
            )
        state.writers_unknown = bool(unknown)
        for rel in sorted(set(held) - set(waiting)):
            log.info("input still open for writing; it waits until closed", inbox=key, source=rel)
        # asked again after settle_seconds, but never more often than HELD_RECHECK
        again = max(state.config.settle_seconds, HELD_RECHECK)
        # those asked now are known; those held earlier and not asked now still are
        asked_now = set(asked)
        kept = {r: until for r, until in waiting.items() if r not in asked_now}
        state.open_for_writing = {**kept, **{rel: now + again for rel in held}}
        if not held:
            return todo
        state.tracker = settle.hold_open(state.tracker, held, now, again)
        verdict = settle.open_verdict(again)
        for rel in held:
            state.verdicts[rel] = verdict
        state.next_scan = min(state.next_scan, now + again)
        return [(e, unsafe) for e, unsafe in todo if e.relpath not in state.open_for_writing]

    def _start_items(self, key: str, state: InboxState, entries: list[tuple[Any, bool]]) -> None:
        """Journals the intent of every entry found ready (or unsafe) in one transaction,
        then hands each to a worker. Entries with an item in flight are left alone."""
        if not entries:
            return
        active = self.journal.active_relpaths(key)
        todo = [(e, unsafe) for e, unsafe in entries if os.fsencode(e.relpath) not in active]
        now, wall = self.mono(), self.clock()
        todo = self._not_open_for_writing(key, state, todo, now)
        if not todo:
            return
        seams.reached("before-intent")
        rows: list[dict[str, Any]] = []
        relpaths: list[str] = []
        for e, u in todo:
            row = self._intent(key, state, e, u, wall)
            if row is None:  # a sidecar came or changed since the scan: settles first
                state.next_scan = min(state.next_scan, now + CHANGE_SCAN_GAP)
                continue
            rows.append(row)
            relpaths.append(e.relpath)
        if not rows:
            return
        items = self.journal.add_many(rows)
        self._journal_ok()
        state.tracker = settle.forget(state.tracker, relpaths)
        for rel in relpaths:
            state.verdicts.pop(rel, None)  # an item now: no longer waiting
        for item in items:
            self._submit(item)

    def _intent(
        self, key: str, state: InboxState, entry: Any, unsafe: bool, now: float
    ) -> dict[str, Any] | None:
        """The journal row of a new item: everything decided for the input at this
        moment (archive, placement, verify), never read from the live configuration
        again (the identifier, datatype and metadata are decided by the claim). None
        when a sidecar appeared or changed since the scan: the input waits for it."""
        reason = None
        if unsafe:
            what = UNSAFE_WHAT.get(entry.kind.name, entry.kind.name.lower())
            reason = json.dumps(
                {
                    "code": "unsupported",
                    "message": f"{entry.relpath!r} is {what}; nbankd never follows, reads "
                    "or archives such entries",
                    "hint": "copy the real file's bytes into the inbox instead",
                }
            )
        archive = self.config.archive_for(state.config)
        seen: dict[str, Any] = {}
        if entry.identity is not None:
            seen = {"dev": entry.identity.dev, "ino": entry.identity.ino}
            if not unsafe and entry.kind is EntryKind.FILE:  # what settled: the claim checks
                seen = _identity_json(entry.identity)
            elif not unsafe and entry.kind is EntryKind.DIRECTORY_RESOURCE:
                seen["tree"] = tree_seen(entry.identity)  # the tree that settled: likewise
        sidecar = None
        found = _sidecars_now(state.config.path, entry.relpath)
        chosen = settle.sidecar_for(found.items(), state.tracker.watches)
        if chosen == settle.HOLD:
            return None
        if chosen is not None:
            sidecar = os.fsencode(chosen)
            if seen:
                seen["sidecar"] = _identity_json(found[chosen])
        if seen:
            seen["paired"] = 1  # its sidecars were looked for: the claim looks again
        marker = (
            os.fsencode(entry.relpath + MARKER_SUFFIX) if state.config.ready == "marker" else None
        )
        if seen and marker is not None:  # the marker that made it ready (see claim.py)
            seen[MARKER_KEY] = marker_seen(state.config.path / os.fsdecode(marker))
        kind = "file"
        if unsafe:
            kind = "unsafe"
        elif entry.kind is EntryKind.DIRECTORY_RESOURCE:
            kind = "dir"
        return {
            "token": secrets.token_hex(16),
            "inbox": key,
            "relpath": os.fsencode(entry.relpath),
            "kind": kind,
            "reason_json": reason,
            "archive": archive.name,
            "archive_path": str(archive.path),
            "placement": state.config.placement,
            "verify": int(state.config.verify),
            "sidecar_relpath": sidecar,
            "marker_relpath": marker,
            "seen_identity": json.dumps(seen) if seen else None,
            "created": now,
            "updated": now,
        }


def _sidecars_now(inbox: Path, relpath: str) -> dict[str, Identity | None]:
    """{relpath of each sidecar name of ``relpath``: its identity now}; None when
    nothing is there, or a folder (walked as a folder, never a sidecar), or it cannot
    be reached (as absent, as the scan saw it)."""
    found: dict[str, Identity | None] = {}
    for suffix in SIDECAR_SUFFIXES:
        candidate = relpath + suffix
        try:
            st = os.lstat(inbox / candidate)
        except OSError:
            found[candidate] = None
            continue
        found[candidate] = None if stat.S_ISDIR(st.st_mode) else Identity.of(st)
    return found


def _identity_json(ident: Identity | None) -> dict[str, int]:
    """What the claim compares a file or sidecar with before taking it (device, inode,
    size, modification and change times)."""
    assert ident is not None
    return {
        "dev": ident.dev,
        "ino": ident.ino,
        "size": ident.size,
        "mtime_ns": ident.mtime_ns,
        "ctime_ns": ident.ctime_ns,
    }


def _seen_identity(tracker: settle.TrackerState) -> Callable[[str], Identity | None]:
    """For :func:`scan_inbox`: the identity the tracker holds for a relpath, if any."""
    watches = tracker.watches

    def seen(relpath: str) -> Identity | None:
        watch = watches.get(relpath)
        return None if watch is None else watch.identity

    return seen


def open_for_writing(
    spec: InboxSpec, inputs: list[tuple[str, bool]]
) -> tuple[list[str], list[str]]:
    """(the relpaths of the inputs, (relpath, is a folder), some program holds open for
    writing (a folder: one of its files), those the kernel could not tell about), each
    reached from the inbox's descriptor, one folder descriptor at a time, never through
    a link."""
    held: list[str] = []
    unknown: list[str] = []
    try:
        fs = spec.open_fs()
    except OSError:
        return held, [rel for rel, _ in inputs]
    with fs:
        if writers.untrusted(fs.dev):  # its answers may be worth trusting again
            _calibrate(fs)
        for rel, is_dir in inputs:
            try:
                fd, name = fs.parent(rel)
            except (OSError, Escape):
                unknown.append(rel)
                continue
            ask = writers.tree_open_for_writing_at if is_dir else writers.open_for_writing_at
            try:
                answer = ask(fd, name)
            except Exception as err:  # never a reason to stop scanning: "cannot tell"
                log.warning(
                    "cannot ask whether an input is open for writing", source=rel, error=repr(err)
                )
                answer = None
            finally:
                fs.release(fd)
            if answer is None:
                unknown.append(rel)
            elif answer:
                held.append(rel)
        if held:
            _calibrate(fs)
            if writers.untrusted(fs.dev):
                unknown += held
                held = []
    return held, unknown


def _calibrate(fs: InboxFS) -> None:
    """A filesystem may answer "open for writing" for every file (NFSv4 without a read
    delegation, CIFS without an oplock): asked about the daemon's own token in the work
    folder, which nothing holds open (:func:`nbankd.watch.writers.calibrate`)."""
    with contextlib.suppress(OSError, Escape, Tampered):
        writers.calibrate(fs.work, folderproof.PROOF_NAME.encode())
