"""Inboxes: what is in them (scan), when it is finished (settle), and waking up (observer).

- :mod:`nbankd.watch.scan`: one pass over an inbox, lstat only, never following links.
- :mod:`nbankd.watch.settle`: pure settle/stall/marker logic with time passed in.
- :mod:`nbankd.watch.observer`: inotify (watchdog) only to wake the daemon early.
"""

from nbankd.watch.observer import InboxWatcher, Mode, OnChange, Wakeups, WatchStatus
from nbankd.watch.scan import (
    Entry,
    EntryKind,
    Identity,
    TreeSummary,
    identity_of_path,
    is_ignored,
    owner_of,
    printable,
    scan_inbox,
    tree_identity,
    tree_summary,
)
from nbankd.watch.settle import (
    ReadyMode,
    SettlePolicy,
    State,
    Step,
    TrackerState,
    Verdict,
    Watch,
    forget,
    format_duration,
    next_deadline,
    observe,
    step,
)

__all__ = [
    "Entry",
    "EntryKind",
    "Identity",
    "InboxWatcher",
    "Mode",
    "OnChange",
    "ReadyMode",
    "SettlePolicy",
    "State",
    "Step",
    "TrackerState",
    "TreeSummary",
    "Verdict",
    "Wakeups",
    "Watch",
    "WatchStatus",
    "forget",
    "format_duration",
    "identity_of_path",
    "is_ignored",
    "next_deadline",
    "observe",
    "owner_of",
    "printable",
    "scan_inbox",
    "step",
    "tree_identity",
    "tree_summary",
]
