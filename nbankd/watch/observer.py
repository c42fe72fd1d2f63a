"""The thin shell: inotify (watchdog's public API) only to wake the daemon early.

An :class:`InboxWatcher` watches every ``watch: auto`` inbox recursively and calls
``on_change(inbox_id, relpath)`` when something changes there. It decides
nothing: the daemon's periodic full rescan stays the source of truth and a
wake-up only makes the next scan come sooner. What it does not assume is that
the wake-ups work: each watched inbox is *proved* to deliver events.

- ``watch: poll`` inboxes (NFS: inotify sees nothing written by other hosts) get no
  inotify watch at all; the rescan interval drives them.
- Events whose path lies in an excluded folder (the work and rejected folders) or
  matches an ignore pattern wake nobody. watchdog's public API cannot leave a
  sub-folder unwatched, so those folders do hold watches (and use up some of
  ``fs.inotify.max_user_watches``); their events are dropped here. Opening or
  reading a file never wakes anyone: only creations, writes, attribute changes,
  closes after writing, moves and deletions do.
- When the kernel's event queue overflows, watchdog rebuilds its watches and
  reports an ``EventsLostEvent``: the inbox is woken with relpath ``""`` (rescan
  now) and a warning is logged.
- An inbox whose folder disappears (deleted or moved away) stops being watched;
  :meth:`InboxWatcher.rearm`, which the daemon calls after each rescan, watches the
  folder again once it is back.

**Liveness** (:meth:`InboxWatcher.check`). Every ``check_every`` seconds the watcher
rewrites a canary file, ``.nbankd-canary`` in the inbox folder (the daemon's scans
never list it), and expects the event that write causes within
``min(10 s, check_every)``. When it does not come, the inbox is *deaf*: its
status is POLL (degraded) with the reason, this is logged once, its watch is
re-armed, and the daemon polls it every ``poll_every`` seconds. The next canary
event that does arrive ends the fallback (logged once too). A canary that cannot
be written (inbox not writable) means the same fallback, with that reason.

**Coverage** (:meth:`InboxWatcher.verify_coverage`). watchdog does not tell its
caller when the kernel refuses a watch on a sub-folder (``ENOSPC``: the
``fs.inotify.max_user_watches`` limit); it logs and carries on. Instead, after each
scan the daemon hands over the folders the scan walked, and the watcher compares
them with the watches the kernel itself lists for this process's inotify
instances (``/proc/self/fdinfo``, by inode number). A folder that still has no
watch once the same grace has passed puts the inbox in the poll fallback, with
the reason; it lasts until the inbox is added again (reload). A refused watch on
the inbox folder itself, and a refused inotify instance (``EMFILE``), are seen at
once. Where the kernel lists no watches (``/proc`` not mounted), coverage is not
checked; the canary still is.

Test seam: ``NBANKD_WATCH_DEAF=1`` in the environment drops every event before it
is looked at, so a test can show the liveness check and the fallback at work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from nbankd.names import CANARY_NAME, WORK_DIR_NAME, printable
from nbankd.watch.liveness import LIMITS, kernel_watches, write_canary
from nbankd.watch.wakeups import Mode, WatchStatus
from nbankd.watch.watched import Probe, WatchedInbox, same_folder

log = structlog.get_logger(__name__)

DEAF_SEAM = "NBANKD_WATCH_DEAF"


class _StopRaceFilter(logging.Filter):
    """Drops watchdog's message for an event read just as a watch is being stopped.

    It is harmless (a rescan is the source of truth) but would look like a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())

OnChange = Callable[[str, str], None]
"""``on_change(inbox_id, relpath)``; relpath is ``""`` for the inbox folder itself."""

# Creations, writes, attribute changes, close-after-write, moves, deletions, lost
# events. Not opens, reads or close-without-write: the daemon's own reads must not
# wake it.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    EventsLostEvent,
]


class InboxWatcher:
    """Wakes the daemon when an inbox changes. Thread-safe; see the module docstring.

    ``on_change`` runs on watchdog's threads: keep it short (``Wakeups.notify``) and
    never call this watcher from it (lock order). Its exceptions are logged and
    swallowed.
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        join_timeout: float = 5.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._on_change = on_change
        self._join_timeout = join_timeout
        self._lock = threading.RLock()
        self._probe_lock = threading.Lock()  # never held while calling watchdog
        self._inboxes: dict[str, WatchedInbox] = {}
        self._observer: BaseObserver | None = None
        self._started = False
        env = os.environ if environ is None else environ
        self._deaf_seam = env.get(DEAF_SEAM) == "1"

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Starts the observer thread and arms every inbox added so far."""
        with self._lock:
            if self._started:
                return
            from watchdog.observers.inotify import InotifyObserver

            self._observer = InotifyObserver()
            self._observer.name = "nbankd-watch"
            self._observer.start()
            self._started = True
            for inbox in self._inboxes.values():
                if inbox.requested == "auto":
                    self._arm(inbox)

    def stop(self, timeout: float | None = None) -> bool:
        """Stops watching and joins the threads; True if they ended within ``timeout``.

        ``timeout`` defaults to ``join_timeout``. Safe to call more than once.
        """
        limit = self._join_timeout if timeout is None else timeout
        with self._lock:
            observer, self._observer = self._observer, None
            self._started = False
            for inbox in self._inboxes.values():
                inbox.watch = None
                inbox.reason = "stopped"
        if observer is None:
            return True
        stopper = threading.Thread(target=observer.stop, name="nbankd-watch-stop", daemon=True)
        stopper.start()
        stopper.join(limit)
        if observer.is_alive():
            observer.join(max(0.0, limit))
        done = not stopper.is_alive() and not observer.is_alive()
        if not done:
            log.warning("inotify observer did not stop in time", timeout=limit)
        return done

    def is_alive(self) -> bool:
        """True while started, the observer thread runs and every watch's emitter too."""
        with self._lock:
            observer = self._observer
            watches = [i.watch for i in self._inboxes.values() if i.watch is not None]
        if observer is None or not observer.is_alive():
            return False
        emitters = {e.watch: e for e in list(observer.emitters)}
        return all(w in emitters and emitters[w].is_alive() for w in watches)

    # --- inboxes -----------------------------------------------------------------

    def add_inbox(
        self,
        inbox_id: str,
        path: Path | str,
        *,
        mode: str = "auto",
        recursive: bool = True,
        exclude: Collection[str] = (WORK_DIR_NAME,),
        ignore: Sequence[str] = (),
        check_every: float = 30.0,
    ) -> WatchStatus:
        """Registers an inbox (``mode`` is its ``watch`` option) and arms it if started.

        ``exclude`` holds relative paths (work and rejected folders) whose events are
        dropped. Pass ``recursive=True`` for directory-resource inboxes as well, so
        changes inside a top-level folder wake the daemon. ``check_every`` is the
        liveness check's period. Replaces an inbox of the same id.
        """
        if mode not in ("auto", "poll"):
            raise ValueError(f"watch must be 'auto' or 'poll', not {mode!r}")
        if check_every <= 0:
            raise ValueError(f"check_every must be positive, not {check_every!r}")
        root = os.path.abspath(os.fsdecode(path))
        inbox = WatchedInbox(
            inbox_id=inbox_id,
            root=root,
            recursive=recursive,
            requested=mode,
            exclude=tuple(e.strip("/") for e in exclude if e.strip("/")),
            ignore=tuple(ignore),
            probe=Probe(every=check_every),
        )
        with self._lock:
            if inbox_id in self._inboxes:
                self._disarm(self._inboxes.pop(inbox_id))
            self._inboxes[inbox_id] = inbox
            if mode == "poll":
                inbox.reason = "watch: poll"
            elif self._started:
                self._arm(inbox)
            return self._status_of(inbox)

    def remove_inbox(self, inbox_id: str) -> None:
        """Stops watching an inbox (no error if unknown)."""
        with self._lock:
            inbox = self._inboxes.pop(inbox_id, None)
            if inbox is not None:
                self._disarm(inbox)

    def rearm(self) -> dict[str, WatchStatus]:
        """Re-watches inboxes whose folder vanished and came back, or whose watch went
        deaf; call after each rescan. Returns :meth:`status`."""
        with self._lock:
            if self._started:
                for inbox in self._inboxes.values():
                    if inbox.requested != "auto" or inbox.refused:
                        continue
                    if (
                        inbox.rearm_wanted
                        or inbox.watch is None
                        or inbox.gone
                        or not self._still_same(inbox)
                    ):
                        inbox.rearm_wanted = False
                        self._disarm(inbox)
                        self._arm(inbox)
            return self.status()

    def status(self) -> dict[str, WatchStatus]:
        """The watch status of every inbox, by id."""
        with self._lock:
            return {i: self._status_of(inbox) for i, inbox in self._inboxes.items()}

    # --- proof of life -----------------------------------------------------------

    def check(self, now: float | None = None) -> float | None:
        """Runs the liveness checks that are due (see the module docstring).

        Judges each outstanding canary and unwatched folder whose grace has passed,
        then writes the canaries that are due. ``now`` is :func:`time.monotonic`
        time (tests pass a later one). Returns the monotonic time of the next
        check, or None when nothing is watched.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            inboxes = [i for i in self._inboxes.values() if i.requested == "auto"]
            armed = [i for i in inboxes if i.watch is not None and not i.gone]
        due: list[float] = []
        for inbox in inboxes:
            self._judge_coverage(inbox, now)
        for inbox in armed:
            probe = inbox.probe
            with probe.cond:
                if probe.sent is not None and not probe.answered:
                    if now - probe.sent < probe.timeout:
                        due.append(probe.sent + probe.timeout)
                        continue
                    self._went_deaf(
                        inbox,
                        f"no inotify event within {probe.timeout:g}s of the liveness "
                        "check (the watch is deaf)",
                    )
                    probe.sent = None
                if now >= probe.next_due:
                    self._send_probe(inbox, now)
                due.append(probe.sent + probe.timeout if probe.sent else probe.next_due)
        for inbox in inboxes:
            due += [seen + inbox.probe.timeout for _, seen in list(inbox.unwatched.values())]
        return min(due, default=None)

    def wait_answered(self, inbox_id: str, timeout: float) -> bool:
        """Blocks until the inbox's outstanding canary is answered (True), or ``timeout``."""
        with self._lock:
            inbox = self._inboxes.get(inbox_id)
        if inbox is None:
            return False
        probe = inbox.probe
        with probe.cond:
            return probe.cond.wait_for(lambda: probe.answered, timeout)

    def verify_coverage(self, inbox_id: str, folders: Mapping[int, str]) -> None:
        """Compares the folders a scan walked (inode -> relpath) with the kernel's watches.

        A folder without a watch is remembered; if it still has none when
        :meth:`check` runs after the grace, the inbox falls back to polling.
        """
        with self._lock:
            inbox = self._inboxes.get(inbox_id)
            if inbox is None or inbox.requested != "auto" or inbox.watch is None:
                return
            if not inbox.recursive:
                folders = {k: v for k, v in folders.items() if v == ""}
        watched = kernel_watches()
        if watched is None:
            return
        now = time.monotonic()
        missing = {ino: rel for ino, rel in folders.items() if ino not in watched}
        with self._probe_lock:
            inbox.unwatched = {
                ino: (rel, inbox.unwatched.get(ino, (rel, now))[1]) for ino, rel in missing.items()
            }

    # --- internals ---------------------------------------------------------------

    def _judge_coverage(self, inbox: WatchedInbox, now: float) -> None:
        with self._probe_lock:
            late = {
                ino: rel
                for ino, (rel, seen) in inbox.unwatched.items()
                if now - seen >= inbox.probe.timeout
            }
        if not late:
            return
        watched = kernel_watches()
        if watched is None:
            return
        still = sorted(
            rel for ino, rel in late.items() if ino not in watched and same_folder(inbox, rel, ino)
        )
        with self._probe_lock:
            for ino in late:
                inbox.unwatched.pop(ino, None)
            if not still or inbox.refused:
                return
            inbox.refused = (
                f"{len(still)} folder(s) have no inotify watch (first: "
                f"{printable(still[0]) or '.'}): the kernel refused them, most likely the "
                "inotify watch limit (raise fs.inotify.max_user_watches); polling instead"
            )
        log.warning(
            "inotify does not watch every folder; inbox falls back to polling",
            inbox=inbox.inbox_id,
            folders=len(still),
            first=printable(still[0]),
        )
        self._wake(inbox, "")

    def _send_probe(self, inbox: WatchedInbox, now: float) -> None:
        """Rewrites the canary. Called with ``probe.cond`` held; released around the
        write, so a slow inbox filesystem never holds up the watchdog thread that
        delivers other inboxes' events."""
        probe = inbox.probe
        probe.seq += 1
        probe.next_due = now + probe.every
        probe.answered = False
        probe.sent = now  # before the write: its event may come at once
        seq = probe.seq
        probe.cond.release()
        try:
            write_canary(inbox.root, seq)
        except OSError as err:
            failed: OSError | None = err
        else:
            failed = None
        finally:
            probe.cond.acquire()
        if failed is not None and probe.seq == seq:
            probe.sent = None
            self._went_deaf(
                inbox,
                f"cannot write the liveness canary {CANARY_NAME}: {failed.strerror or failed}",
            )

    def _went_deaf(self, inbox: WatchedInbox, why: str) -> None:
        """Enters the poll fallback (call with ``probe.cond`` held); logs once."""
        probe = inbox.probe
        if probe.deaf:
            return
        probe.deaf = why
        inbox.rearm_wanted = True
        log.warning(
            "inbox watch failed its liveness check; polling instead",
            inbox=inbox.inbox_id,
            reason=why,
        )
        self._wake(inbox, "")

    def _answered(self, inbox: WatchedInbox) -> None:
        probe = inbox.probe
        with probe.cond:
            if probe.sent is None:
                return
            probe.answered = True
            probe.sent = None
            probe.cond.notify_all()
            if probe.deaf:
                log.info("inbox watch delivers events again", inbox=inbox.inbox_id, was=probe.deaf)
                probe.deaf = ""

    def _status_of(self, inbox: WatchedInbox) -> WatchStatus:
        deaf = inbox.probe.deaf
        armed = inbox.watch is not None and not inbox.gone and not inbox.refused and not deaf
        reason = inbox.reason
        if inbox.requested == "auto":
            reason = inbox.refused or deaf or reason
        return WatchStatus(
            inbox_id=inbox.inbox_id,
            path=inbox.root,
            requested=inbox.requested,
            mode=Mode.INOTIFY if armed else Mode.POLL,
            reason="" if armed else reason,
        )

    def _still_same(self, inbox: WatchedInbox) -> bool:
        try:
            st = os.stat(inbox.root)
        except OSError:
            return False
        observer = self._observer
        if observer is not None and inbox.watch is not None:
            emitters = [e for e in list(observer.emitters) if e.watch == inbox.watch]
            if not emitters or not emitters[0].is_alive():
                return False
        return (st.st_dev, st.st_ino) == inbox.inode

    def _arm(self, inbox: WatchedInbox) -> None:
        """Schedules a watch for ``inbox``; on failure records why (poll fallback)."""
        observer = self._observer
        if observer is None or inbox.refused:
            return
        try:
            st = os.stat(inbox.root)
        except OSError as err:
            inbox.reason = f"inbox folder unavailable ({err.strerror}); re-armed on rescan"
            return
        inbox.inode = (st.st_dev, st.st_ino)
        inbox.gone = False
        try:
            watch = observer.schedule(
                _Handler(self, inbox), inbox.root, recursive=inbox.recursive, event_filter=_EVENTS
            )
        except OSError as err:
            why = LIMITS.get(err.errno or 0)
            if why is not None:
                inbox.refused = f"{why}; polling instead"
                log.warning(
                    "inotify refused a watch; inbox falls back to polling",
                    inbox=inbox.inbox_id,
                    path=printable(inbox.root),
                    errno=err.errno,
                )
            else:
                inbox.reason = f"cannot watch inbox folder ({err.strerror}); re-armed on rescan"
            return
        inbox.watch = watch
        inbox.reason = ""
        with inbox.probe.cond:
            inbox.probe.next_due = 0.0  # prove the new watch at the next check

    def _disarm(self, inbox: WatchedInbox) -> None:
        watch, inbox.watch = inbox.watch, None
        observer = self._observer
        if watch is not None and observer is not None:
            with contextlib.suppress(KeyError, OSError):  # already gone with its folder
                observer.unschedule(watch)

    def _wake(self, inbox: WatchedInbox, relpath: str) -> None:
        try:
            self._on_change(inbox.inbox_id, relpath)
        except Exception:
            log.exception("wake-up callback failed", inbox=inbox.inbox_id)

    def _event(self, inbox: WatchedInbox, event: FileSystemEvent) -> None:
        if self._deaf_seam:
            return
        if isinstance(event, EventsLostEvent):
            log.warning("inotify lost events; rescanning the inbox", inbox=inbox.inbox_id)
            self._wake(inbox, "")
            return
        paths = [event.src_path]
        if isinstance(event, (FileMovedEvent, DirMovedEvent)) and event.dest_path:
            paths.append(event.dest_path)
        for path in paths:
            rel = inbox.relpath(path)
            if rel == CANARY_NAME:
                self._answered(inbox)
                continue
            if rel is None or inbox.hidden(rel):
                continue
            if rel == "" and isinstance(event, DirDeletedEvent):
                inbox.gone = True
            self._wake(inbox, rel)
            return


class _Handler(FileSystemEventHandler):
    """Hands every event of one inbox's watch to its watcher."""

    def __init__(self, watcher: InboxWatcher, inbox: WatchedInbox) -> None:
        self.watcher = watcher
        self.inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        self.watcher._event(self.inbox, event)
