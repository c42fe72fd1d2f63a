"""The daemon's one capability (CAP_LEASE, granted by the systemd unit as an ambient
capability, see :mod:`nbankd.watch.writers`) stays the daemon's: the programs it starts
(metadata readers) must not inherit it."""

from __future__ import annotations

import ctypes

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def keep_capabilities_to_self() -> bool:
    """Clears this process's ambient capability set: the programs it starts from now on
    run without capabilities, while its own stay. False when the kernel refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0)


__all__ = ["keep_capabilities_to_self"]
