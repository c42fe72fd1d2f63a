"""Inboxes: what is in them (scan), when it is finished (settle), and waking up (observer).

- :mod:`nbankd.watch.scan`: one pass over an inbox, lstat only, never following links.
- :mod:`nbankd.watch.settle`: pure settle/stall/marker logic with time passed in.
- :mod:`nbankd.watch.observer`: inotify (watchdog) only to wake the daemon early;
  :mod:`nbankd.watch.liveness` proves the watch alive (canary) and complete (the
  kernel's list of watches); :mod:`nbankd.watch.wakeups` holds what it reports.
"""

from __future__ import annotations

from nbankd.lazy import lazy_exports

# name -> module, imported on first use (the observer pulls in watchdog)
_EXPORTS = {
    "InboxWatcher": "nbankd.watch.observer",
    "Mode": "nbankd.watch.wakeups",
    "OnChange": "nbankd.watch.observer",
    "Wakeups": "nbankd.watch.wakeups",
    "WatchStatus": "nbankd.watch.wakeups",
    "Entry": "nbankd.watch.scan",
    "EntryKind": "nbankd.watch.scan",
    "Identity": "nbankd.watch.scan",
    "TreeSummary": "nbankd.watch.scan",
    "identity_of_path": "nbankd.watch.scan",
    "is_ignored": "nbankd.watch.scan",
    "owner_of": "nbankd.watch.scan",
    "printable": "nbankd.watch.scan",
    "scan_inbox": "nbankd.watch.scan",
    "tree_identity": "nbankd.watch.scan",
    "tree_summary": "nbankd.watch.scan",
    "ReadyMode": "nbankd.watch.settle",
    "SettlePolicy": "nbankd.watch.settle",
    "State": "nbankd.watch.settle",
    "Step": "nbankd.watch.settle",
    "TrackerState": "nbankd.watch.settle",
    "Verdict": "nbankd.watch.settle",
    "Watch": "nbankd.watch.settle",
    "forget": "nbankd.watch.settle",
    "next_deadline": "nbankd.watch.settle",
    "observe": "nbankd.watch.settle",
    "step": "nbankd.watch.settle",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
