"""The names nbankd gives and recognises in an inbox folder: the one home of each.

- :data:`WORK_DIR_NAME`: the daemon's work folder, where claimed inputs wait;
- :data:`CANARY_NAME`: the file rewritten to prove an inotify watch alive;
- :data:`SIDECAR_SUFFIXES`: ``NAME.nbank.yaml`` / ``NAME.nbank.json`` belong to ``NAME``;
- :data:`MARKER_SUFFIX`: ``NAME.done`` says ``NAME`` is finished (``ready: marker``);
- :data:`REASON_SUFFIX`: ``NAME.reason`` beside a rejected input says why.
"""

from __future__ import annotations

WORK_DIR_NAME = ".nbank"
CANARY_NAME = ".nbankd-canary"
SIDECAR_SUFFIXES = (".nbank.yaml", ".nbank.json")
MARKER_SUFFIX = ".done"
REASON_SUFFIX = ".reason"

__all__ = ["CANARY_NAME", "MARKER_SUFFIX", "REASON_SUFFIX", "SIDECAR_SUFFIXES", "WORK_DIR_NAME"]
