"""Journaling the intent of every input a scan found ready (or unsafe), and handing
each new item to a worker: the inputs some program still holds open for writing are
held back first (asked of the kernel with :func:`open_for_writing`), and each row
records everything decided for the input at that moment (archive, placement, verify,
the identity that settled, its sidecar and marker). The base of
:class:`~nbankd.daemon.scanning.InboxScanning`, whose scans call
:meth:`IntentJournaling._start_items`; it uses the daemon's configuration, ``specs``,
journal and clocks, and its workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from nbankd import seams
from nbankd.config import Config
from nbankd.daemon.view import InboxState
from nbankd.deposit import folderproof
from nbankd.deposit.identity import MARKER_KEY, marker_seen, tree_seen
from nbankd.deposit.inboxfs import Escape, InboxFS, Tampered
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.spec import InboxSpec
from nbankd.names import MARKER_SUFFIX, SIDECAR_SUFFIXES, printable
from nbankd.watch import settle, writers
from nbankd.watch.identity import Identity
from nbankd.watch.scan import EntryKind

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


class IntentJournaling:
    """Journaling the intent of the inputs found ready (see the module's text)."""

    # the daemon's state this half uses (set by Daemon.__init__ and start)
    config: Config
    clock: Callable[[], float]
    mono: Callable[[], float]
    specs: dict[str, InboxSpec]
    journal: Journal

    def _submit(self, item: Item) -> None:
        raise NotImplementedError  # the daemon's workers

    def _journal_ok(self) -> None:
        raise NotImplementedError  # the daemon's journal health

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
