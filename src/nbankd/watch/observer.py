"""The thin shell: inotify (through watchdog) only to wake the daemon early.

An :class:`InboxWatcher` watches every ``watch: auto`` inbox recursively and calls
``on_change(inbox_id, relpath)`` when something changes there. It decides
nothing: events can be lost (the kernel drops them when its queue overflows; we
then wake every inbox with relpath ``""``, but a watch can also miss a folder
created and filled in a hurry), so the daemon's periodic full rescan stays the
source of truth and a wake-up only makes the next scan come sooner.

- ``watch: poll`` inboxes (NFS: inotify sees nothing written by other hosts) get no
  inotify watch at all; the rescan interval drives them.
- The work folder and the rejected folder (``exclude``) and folders matching an
  ignore pattern get no inotify watch, so writes inside them produce no event.
  Events whose path is excluded or ignored are dropped too (e.g. a file created
  directly in the inbox root and named by an ignore pattern). Opening or reading a
  file never wakes anyone: only creations, writes, attribute changes, closes after
  writing, moves and deletions do.
- An inbox whose folder disappears (deleted or moved away) stops being watched;
  :meth:`InboxWatcher.rearm`, which the daemon calls after each rescan, watches the
  folder again once it is back.
- When the kernel refuses a watch for lack of resources (``ENOSPC``: the
  ``fs.inotify.max_user_watches`` limit; ``EMFILE``, ``ENOMEM``), on the inbox or
  any sub-folder, at start or later, that inbox falls back to polling:
  :meth:`~InboxWatcher.status` says so with the reason, it is logged once, and
  nothing crashes. The fallback lasts until the inbox is added again (reload).
  Other refusals (an unreadable sub-folder) only leave that folder unwatched.

To see refused watches on sub-folders (watchdog swallows those) this module
extends watchdog 7's inotify classes; with another watchdog layout it falls back
to watchdog's stock observer and only refusals on the inbox folder are seen.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch

from nbankd.watch.scan import is_ignored, printable

log = structlog.get_logger(__name__)


class _StopRaceFilter(logging.Filter):
    """Drops watchdog's error for an event that arrives while a watch is being stopped.

    watchdog logs it at error level whenever an inotify event is read just as its
    emitter stops (daemon shutdown, an inbox re-armed): a harmless race, since a
    rescan is the source of truth, that would otherwise look like a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())

_LIMITS = {
    errno.ENOSPC: "inotify watch limit reached (raise fs.inotify.max_user_watches)",
    errno.EMFILE: "inotify instance limit reached (raise fs.inotify.max_user_instances)",
    errno.ENOMEM: "kernel out of memory for inotify watches",
}

OnChange = Callable[[str, str], None]
"""``on_change(inbox_id, relpath)``; relpath is ``""`` for the inbox folder itself."""

# Creations, writes, attribute changes, close-after-write, moves, deletions. Not
# opens, reads or close-without-write: the daemon's own reads must not wake it.
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
]


class Mode(enum.Enum):
    """How an inbox is actually being watched."""

    INOTIFY = "inotify"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """One inbox's watch, for ``nbankctl status``.

    ``requested`` is the configured ``watch`` option (``auto`` or ``poll``);
    ``mode`` is what happens now; ``reason`` says why it differs (empty when not).
    """

    inbox_id: str
    path: str
    requested: str
    mode: Mode
    reason: str = ""

    @property
    def degraded(self) -> bool:
        """True when inotify was wanted but the inbox is only polled."""
        return self.requested == "auto" and self.mode is Mode.POLL


class Wakeups:
    """A thread-safe mailbox of changed inboxes; its :meth:`notify` is an ``OnChange``.

    The daemon loop does ``wakeups.wait(timeout)`` then ``wakeups.take()``. Each
    inbox keeps the first ``keep`` relpaths reported since the last ``take``.
    """

    def __init__(self, keep: int = 16) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._pending: dict[str, list[str]] = {}
        self._keep = keep

    def notify(self, inbox_id: str, relpath: str = "") -> None:
        with self._lock:
            paths = self._pending.setdefault(inbox_id, [])
            if len(paths) < self._keep:
                paths.append(relpath)
            self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until something is pending or ``timeout`` passes; True if pending."""
        return self._event.wait(timeout)

    def take(self) -> dict[str, list[str]]:
        """Returns and clears what is pending: inbox id -> relpaths (first ``keep``)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._event.clear()
            return pending


@dataclass
class _Inbox:
    inbox_id: str
    root: str
    recursive: bool
    requested: str
    exclude: tuple[str, ...]
    ignore: tuple[str, ...]
    watch: ObservedWatch | None = None
    inode: tuple[int, int] | None = None
    gone: bool = False  # the watched folder was deleted: re-arm
    refused: str = ""  # the kernel refused a watch: sticky poll fallback
    reason: str = "not started"
    handler: FileSystemEventHandler | None = field(default=None, repr=False)

    def hidden(self, relpath: str) -> bool:
        """True for paths inside excluded folders or matching an ignore pattern."""
        for ex in self.exclude:
            if relpath == ex or relpath.startswith(ex + "/"):
                return True
        return bool(relpath) and is_ignored(relpath, self.ignore)

    def relpath(self, path: str | bytes) -> str | None:
        """``path`` relative to the inbox, or None when it is outside."""
        path = os.fsdecode(path)
        if path == self.root:
            return ""
        if path.startswith(self.root + "/"):
            return path[len(self.root) + 1 :]
        return None


class InboxWatcher:
    """Wakes the daemon when an inbox changes. Thread-safe; see the module docstring.

    ``on_change`` runs on watchdog's threads: keep it short (``Wakeups.notify``) and
    never call this watcher from it (lock order). Its exceptions are logged and
    swallowed.
    """

    def __init__(self, on_change: OnChange, *, join_timeout: float = 5.0) -> None:
        self._on_change = on_change
        self._join_timeout = join_timeout
        self._lock = threading.RLock()
        self._refuse_lock = threading.Lock()
        self._inboxes: dict[str, _Inbox] = {}
        self._observer: BaseObserver | None = None
        self._started = False
        self._failed = ""  # why inotify could not be started at all

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Starts the observer thread and arms every inbox added so far."""
        with self._lock:
            if self._started:
                return
            try:
                self._observer = _make_observer()
            except OSError as err:  # no inotify instance (EMFILE): every inbox polls
                self._failed = f"{_LIMITS.get(err.errno or 0, err.strerror)}; polling on rescans"
                log.warning(
                    "inotify unavailable; all inboxes fall back to polling", errno=err.errno
                )
                return
            self._failed = ""
            self._observer.start()
            self._started = True
            for inbox in self._inboxes.values():
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
                inbox.watch, inbox.handler = None, None
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
        """True while started and the observer thread (and its inotify reader) run."""
        with self._lock:
            observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        reader = getattr(observer, "inotify_reader", None)
        return reader is None or reader.is_alive()

    # --- inboxes -----------------------------------------------------------------

    def add_inbox(
        self,
        inbox_id: str,
        path: Path | str,
        *,
        mode: str = "auto",
        recursive: bool = True,
        exclude: Collection[str] = (".nbank",),
        ignore: Sequence[str] = (),
    ) -> WatchStatus:
        """Registers an inbox (``mode`` is its ``watch`` option) and arms it if started.

        ``exclude`` holds relative paths (work and rejected folders) never watched.
        Pass ``recursive=True`` for directory-resource inboxes as well, so changes
        inside a top-level folder wake the daemon. Replaces an inbox of the same id.
        """
        if mode not in ("auto", "poll"):
            raise ValueError(f"watch must be 'auto' or 'poll', not {mode!r}")
        root = os.path.abspath(os.fsdecode(path))
        inbox = _Inbox(
            inbox_id=inbox_id,
            root=root,
            recursive=recursive,
            requested=mode,
            exclude=tuple(e.strip("/") for e in exclude if e.strip("/")),
            ignore=tuple(ignore),
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
        """Re-watches inboxes whose folder vanished and came back; call after each rescan.

        Also applies a poll fallback decided on the observer thread (a refused
        watch on a new sub-folder) by dropping that inbox's remaining watches.
        Returns :meth:`status`.
        """
        with self._lock:
            if self._started:
                for inbox in self._inboxes.values():
                    if inbox.requested != "auto":
                        continue
                    if inbox.refused:
                        self._disarm(inbox)
                    elif inbox.watch is None or inbox.gone or not self._still_same(inbox):
                        self._disarm(inbox)
                        self._arm(inbox)
            return self.status()

    def status(self) -> dict[str, WatchStatus]:
        """The watch status of every inbox, by id."""
        with self._lock:
            return {i: self._status_of(inbox) for i, inbox in self._inboxes.items()}

    # --- internals ---------------------------------------------------------------

    def _status_of(self, inbox: _Inbox) -> WatchStatus:
        armed = inbox.watch is not None and not inbox.gone and not inbox.refused
        reason = inbox.reason
        if inbox.requested == "auto":
            reason = self._failed or inbox.refused or reason
        return WatchStatus(
            inbox_id=inbox.inbox_id,
            path=inbox.root,
            requested=inbox.requested,
            mode=Mode.INOTIFY if armed else Mode.POLL,
            reason="" if armed else reason,
        )

    def _still_same(self, inbox: _Inbox) -> bool:
        try:
            st = os.stat(inbox.root)
        except OSError:
            return False
        emitter = _emitter_for(self._observer, inbox.watch)
        alive = emitter is None or emitter.is_alive()
        return alive and (st.st_dev, st.st_ino) == inbox.inode

    def _arm(self, inbox: _Inbox) -> None:
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
        handler = _Handler(self, inbox)
        try:
            watch = observer.schedule(
                handler, inbox.root, recursive=inbox.recursive, event_filter=_EVENTS
            )
        except OSError as err:
            self._refused(inbox, inbox.root, err)
            if not inbox.refused:
                inbox.reason = f"cannot watch inbox folder ({err.strerror}); re-armed on rescan"
            return
        inbox.watch, inbox.handler = watch, handler
        inbox.reason = ""
        if inbox.refused:  # a sub-folder was refused while arming: free the rest now
            self._disarm(inbox)

    def _disarm(self, inbox: _Inbox) -> None:
        watch, inbox.watch, inbox.handler = inbox.watch, None, None
        observer = self._observer
        if watch is not None and observer is not None:
            with contextlib.suppress(KeyError, OSError):  # already gone with its folder
                observer.unschedule(watch)

    def _refused(self, inbox: _Inbox, path: str | bytes, err: OSError) -> None:
        """A watch was refused (observer thread or caller). Only limits are sticky."""
        why = _LIMITS.get(err.errno or 0)
        if why is None:
            return
        # No self._lock here: this runs on the inotify thread under watchdog's locks,
        # while rearm() takes self._lock then watchdog's (lock order).
        with self._refuse_lock:
            if inbox.refused:
                return
            inbox.refused = f"{why}; polling on rescans"
        log.warning(
            "inotify refused a watch; inbox falls back to polling",
            inbox=inbox.inbox_id,
            path=printable(os.fsdecode(path)),
            errno=err.errno,
        )
        self._wake(inbox, "")

    def _wake(self, inbox: _Inbox, relpath: str) -> None:
        try:
            self._on_change(inbox.inbox_id, relpath)
        except Exception:
            log.exception("wake-up callback failed", inbox=inbox.inbox_id)

    def _event(self, inbox: _Inbox, event: FileSystemEvent) -> None:
        paths = [event.src_path]
        if isinstance(event, (FileMovedEvent, DirMovedEvent)) and event.dest_path:
            paths.append(event.dest_path)
        for path in paths:
            rel = inbox.relpath(path)
            if rel is None or inbox.hidden(rel):
                continue
            if rel == "" and isinstance(event, DirDeletedEvent):
                inbox.gone = True
            self._wake(inbox, rel)
            return

    def _skip_dir(self, inbox: _Inbox, path: bytes) -> bool:
        rel = inbox.relpath(path)
        return rel is not None and rel != "" and inbox.hidden(rel)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher, inbox: _Inbox) -> None:
        self.watcher = watcher
        self.inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        self.watcher._event(self.inbox, event)


def _emitter_for(observer: BaseObserver | None, watch: ObservedWatch | None) -> Any:
    if observer is None or watch is None:
        return None
    return getattr(observer, "_emitter_for_watch", {}).get(watch)


# --- watchdog extension: see refused sub-folder watches, skip excluded folders ------


def _make_observer() -> BaseObserver:
    if _RecordingObserver is not None:
        return _RecordingObserver()
    from watchdog.observers import Observer

    return Observer()


try:
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyFD

    if not all(hasattr(InotifyWatchGroup, a) for a in ("_add_callback", "_add_all_callbacks")):
        raise ImportError("unexpected watchdog inotify layout")

    @dataclass
    class _RecordingWatchGroup(InotifyWatchGroup):
        """Reports refused watches (watchdog ignores them below the root) and skips
        excluded or ignored folders entirely."""

        on_refused: Callable[[bytes, OSError], None] | None = None
        skip: Callable[[bytes], bool] | None = None
        on_overflow: Callable[[], None] | None = None

        def on_queue_overflow(self) -> None:
            super().on_queue_overflow()  # watchdog rebuilds the watches
            if self.on_overflow is not None:
                self.on_overflow()  # events were lost: rescan now

        def _add_callback(self, path: bytes) -> None:
            if self.skip is not None and path != self.path and self.skip(path):
                return
            if path in self._active_callbacks_by_path:
                # Already watched: a new folder is met both by the walk of its parent
                # and by its own creation event (watchdog would warn). A stale entry
                # (folder replaced) is dropped by its IN_IGNORED, which inotify queues
                # before the replacement's IN_CREATE, and that event re-adds it.
                return
            try:
                wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
            except OSError as err:
                if path == self.path:
                    raise
                if self.on_refused is not None and err.errno != errno.ENOENT:
                    self.on_refused(path, err)
                return
            self._active_callbacks_by_path[path] = wd
            self._active_callbacks_by_watch[wd] = path

    class _RecordingEmitter(InotifyEmitter):
        """Builds a :class:`_RecordingWatchGroup` wired to the inbox being scheduled."""

        def __init__(self, *args: Any, observer: _RecordingObserverImpl, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._handler = observer.pending_handler

        def on_thread_start(self) -> None:
            handler = self._handler
            watcher, inbox = (handler.watcher, handler.inbox) if handler else (None, None)
            self._inotify = _RecordingWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                event_mask=self.get_event_mask_from_filter(),
                is_recursive=self.watch.is_recursive,
                follow_symlink=False,
                on_refused=(lambda p, e: watcher._refused(inbox, p, e)) if watcher else None,
                skip=(lambda p: watcher._skip_dir(inbox, p)) if watcher else None,
                on_overflow=(lambda: watcher._wake(inbox, "")) if watcher else None,
            )

    class _RecordingObserverImpl(BaseObserver):
        """watchdog's InotifyObserver with :class:`_RecordingEmitter`."""

        def __init__(self) -> None:
            self.pending_handler: _Handler | None = None
            self.inotify_reader = InotifyFD()
            self.inotify_reader.name = "nbankd-inotify"
            self.inotify_reader.start()
            super().__init__(_RecordingEmitter, inotify_fd=self.inotify_reader, observer=self)
            self.name = "nbankd-watch"

        def schedule(self, event_handler: FileSystemEventHandler, path: Any, **kw: Any) -> Any:
            # The emitter is built and started inside schedule(): hand it our handler.
            with self._lock:
                self.pending_handler = (
                    event_handler if isinstance(event_handler, _Handler) else None
                )
                try:
                    return super().schedule(event_handler, path, **kw)
                finally:
                    self.pending_handler = None

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self.inotify_reader.stop()
            self.inotify_reader.join()

    _RecordingObserver: type[BaseObserver] | None = _RecordingObserverImpl
except ImportError:  # pragma: no cover - other watchdog versions
    _RecordingObserver = None
