"""The watcher's record of one inbox: its folder, exclusions and liveness probe.

:class:`WatchedInbox` and its :class:`Probe` are plain data guarded by the
watcher's locks (:mod:`nbankd.watch.observer` says which); nothing here starts a
thread or arms a watch.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from watchdog.observers.api import ObservedWatch

from nbankd.watch.scan import is_excluded, is_hidden

CHECK_TIMEOUT_MAX = 10.0  # seconds a canary event may take, at most


@dataclass
class Probe:
    """The liveness check of one inbox (guarded by the watcher's probe lock)."""

    every: float
    sent: float | None = None  # monotonic time of the outstanding canary write
    answered: bool = False  # an event came for it
    next_due: float = 0.0
    deaf: str = ""  # why the inbox is in the poll fallback, "" while alive
    seq: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def timeout(self) -> float:
        return min(CHECK_TIMEOUT_MAX, self.every)


@dataclass
class WatchedInbox:
    inbox_id: str
    root: str
    recursive: bool
    requested: str
    exclude: tuple[str, ...]
    ignore: tuple[str, ...]
    probe: Probe
    watch: ObservedWatch | None = None
    inode: tuple[int, int] | None = None
    #: the folder the watch is set on: the inbox's path with links resolved (watchdog
    #: never follows a link at the top of a watch)
    watch_root: str = ""
    #: the (device, inode) the daemon last found to be this inbox's folder (its work
    #: folder checked through it): a folder the path names otherwise is never watched
    accepted: tuple[int, int] | None = None
    gone: bool = False  # the watched folder was deleted: re-arm
    refused: str = ""  # the kernel refused a watch: sticky poll fallback
    unwatched: dict[int, tuple[str, float]] = field(default_factory=dict)  # ino -> (rel, seen)
    rearm_wanted: bool = False
    reason: str = "not started"

    def hidden(self, relpath: str) -> bool:
        """True for paths inside excluded folders or matching an ignore pattern."""
        if relpath and is_excluded(relpath, self.exclude):
            return True
        return bool(relpath) and is_hidden(relpath, self.ignore)

    def relpath(self, path: str | bytes) -> str | None:
        """``path`` (under the inbox's path, or under the folder watched for it when
        that path is a configured link) relative to the inbox, or None when outside."""
        path = os.fsdecode(path)
        for root in (self.watch_root, self.root):
            if not root:
                continue
            if path == root:
                return ""
            if path.startswith(root + "/"):
                return path[len(root) + 1 :]
        return None


def same_folder(inbox: WatchedInbox, rel: str, ino: int) -> bool:
    """True while ``rel`` is still the folder with inode ``ino`` (not gone or replaced)."""
    try:
        # the inbox's own folder through its path (a configured link is followed: the
        # folder was accepted by its device and inode), the ones below it never
        st = os.lstat(os.path.join(inbox.root, rel)) if rel else os.stat(inbox.root)
    except OSError:
        return False
    return st.st_ino == ino
