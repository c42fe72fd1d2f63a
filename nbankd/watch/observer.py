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
- A name that only leaves the inbox (deleted, or moved into the work folder by a
  claim, or out of the inbox) is reported to ``on_removed`` when one is given: it
  cannot make an input ready, so the daemon scans for it at its leisure, and a
  burst's own claims do not keep it rescanning.
- When the kernel's event queue overflows, watchdog rebuilds its watches and
  reports an ``EventsLostEvent``: the inbox is woken with relpath ``""`` (rescan
  now) and a warning is logged.
- An inbox whose folder disappears (deleted or moved away) stops being watched;
  :meth:`InboxWatcher.rearm`, which the daemon calls after each rescan, watches the
  folder again once it is back.

The proof that each watched inbox delivers events (the **liveness** canary and
the **coverage** of its folders by the kernel's watches) is :mod:`nbankd.watch.proof`.

Test seam: ``NBANKD_WATCH_DEAF=1`` in the environment drops every event before it
is looked at, so a test can show the liveness check and the fallback at work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
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

from nbankd import errors, seams
from nbankd.names import CANARY_NAME, WORK_DIR_NAME, printable
from nbankd.service.limits import descriptor_problem
from nbankd.watch.liveness import LIMITS
from nbankd.watch.proof import ProofOfLife
from nbankd.watch.wakeups import Mode, WatchStatus
from nbankd.watch.watched import Probe, WatchedInbox

log = structlog.get_logger(__name__)

DEAF_SEAM = seams.WATCH_DEAF


class _StopRaceFilter(logging.Filter):
    """Drops watchdog's message for an event read just as a watch is being stopped.

    It is harmless (a rescan is the source of truth) but would look like a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())

#: an accepted inbox folder no folder has: nothing is watched
_NOTHING = (-1, -1)

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


class InboxWatcher(ProofOfLife):
    """Wakes the daemon when an inbox changes. Thread-safe; see the module docstring.

    ``on_change`` runs on watchdog's threads: keep it short (``Wakeups.notify``) and
    never call this watcher from it (lock order). Its exceptions are logged and
    swallowed.
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        on_removed: OnChange | None = None,
        join_timeout: float = 5.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_removed = on_removed or on_change
        self._join_timeout = join_timeout
        self._lock = threading.RLock()
        self._probe_lock = threading.Lock()  # never held while calling watchdog
        self._inboxes: dict[str, WatchedInbox] = {}
        self._observer: BaseObserver | None = None
        self._started = False
        self._deaf_seam = seams.watch_deaf(environ)

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

    def accept_root(self, inbox_id: str, root_id: tuple[int, int] | None) -> None:
        """The daemon found ``root_id`` (device, inode) to be the inbox's folder: only
        that folder is watched; a watch on another (the path swapped for a link since
        it was armed) is dropped at the next :meth:`rearm`. None: what the path names
        now is not the inbox's folder (its work folder is not there): the watch is
        dropped now and none is set up until a folder is accepted again."""
        with self._lock:
            inbox = self._inboxes.get(inbox_id)
            if inbox is None:
                return
            if root_id is None:
                inbox.accepted = _NOTHING
                self._disarm(inbox)
                inbox.reason = "inbox folder replaced or gone; not watched"
                return
            inbox.accepted = root_id
            if inbox.inode != root_id or inbox.watch is None:
                inbox.rearm_wanted = True

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

    # --- internals ---------------------------------------------------------------

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
        found = (st.st_dev, st.st_ino)
        if inbox.accepted is not None and found != inbox.accepted:
            # a link or another folder in its place: never watched (nor listed) through
            inbox.reason = "inbox folder replaced since it was checked; not watched"
            return
        inbox.inode = found
        inbox.gone = False
        inbox.watch_root = os.path.realpath(inbox.root)  # a configured link: its folder
        try:
            watch = observer.schedule(
                _Handler(self, inbox),
                inbox.watch_root,
                recursive=inbox.recursive,
                event_filter=_EVENTS,
            )
        except OSError as err:
            # EMFILE: inotify's limit on instances, or nbankd's own open-file limit
            # (then not refused for good: armed again at a rescan)
            short = err.errno == errno.EMFILE and descriptor_problem() is not None
            limit = errors.process_limit_problem(err, "setting up its watch") if short else None
            why = None if short else LIMITS.get(err.errno or 0)
            if why is not None:
                inbox.refused = f"{why}; polling instead"
                log.warning(
                    "inotify refused a watch; inbox falls back to polling",
                    inbox=inbox.inbox_id,
                    path=printable(inbox.root),
                    errno=err.errno,
                )
            else:
                said = limit or f"cannot watch inbox folder ({err.strerror})"
                inbox.reason = f"{said}; re-armed on rescan"
            return
        inbox.watch = watch
        inbox.reason = ""
        try:  # swapped while the watch was being set up: dropped, armed again later
            st = os.stat(inbox.root)
            swapped = (st.st_dev, st.st_ino) != found
        except OSError:
            swapped = True
        if swapped:
            self._disarm(inbox)
            inbox.rearm_wanted = True
            inbox.reason = "inbox folder changed while its watch was set up; re-armed on rescan"
            return
        with inbox.probe.cond:
            inbox.probe.next_due = 0.0  # prove the new watch at the next check

    def _disarm(self, inbox: WatchedInbox) -> None:
        watch, inbox.watch = inbox.watch, None
        observer = self._observer
        if watch is not None and observer is not None:
            with contextlib.suppress(KeyError, OSError):  # already gone with its folder
                observer.unschedule(watch)

    def _wake(self, inbox: WatchedInbox, relpath: str, *, removed: bool = False) -> None:
        try:
            (self._on_removed if removed else self._on_change)(inbox.inbox_id, relpath)
        except Exception:
            log.exception("wake-up callback failed", inbox=inbox.inbox_id)

    def _visible(self, inbox: WatchedInbox, path: str | bytes) -> str | None:
        """The inbox-relative path of an event's path, or None when it is outside the
        inbox, excluded or ignored, or the canary (whose event proves the watch)."""
        rel = inbox.relpath(path)
        if rel == CANARY_NAME:
            self._answered(inbox)
            return None
        if rel is None or inbox.hidden(rel):
            return None
        return rel

    def _event(self, inbox: WatchedInbox, event: FileSystemEvent) -> None:
        if self._deaf_seam:
            return
        if isinstance(event, EventsLostEvent):
            log.warning("inotify lost events; rescanning the inbox", inbox=inbox.inbox_id)
            self._wake(inbox, "")
            return
        if isinstance(event, (FileMovedEvent, DirMovedEvent)) and event.dest_path:
            dest = self._visible(inbox, event.dest_path)
            src = self._visible(inbox, event.src_path)
            if dest is not None:  # something arrived (or was renamed) in the inbox
                self._wake(inbox, dest)
            elif src is not None:  # it left: claimed into the work folder, moved away
                self._wake(inbox, src, removed=True)
            return
        rel = self._visible(inbox, event.src_path)
        if rel is None:
            return
        if rel == "" and isinstance(event, DirDeletedEvent):
            inbox.gone = True
            self._wake(inbox, rel)
            return
        self._wake(inbox, rel, removed=isinstance(event, (FileDeletedEvent, DirDeletedEvent)))


class _Handler(FileSystemEventHandler):
    """Hands every event of one inbox's watch to its watcher."""

    def __init__(self, watcher: InboxWatcher, inbox: WatchedInbox) -> None:
        self.watcher = watcher
        self.inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        self.watcher._event(self.inbox, event)
