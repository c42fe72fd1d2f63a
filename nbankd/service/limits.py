"""The process's own limits: open files (``RLIMIT_NOFILE``) and threads.

- :func:`check_open_file_limit`, first thing at start-up: below
  :data:`MIN_OPEN_FILES` nbankd refuses to start (exit 2, naming ``LimitNOFILE=`` and
  the current value) instead of failing somewhere in its set-up.
- :data:`SPARE`, a descriptor (``/dev/null``) opened at start-up, before anything else,
  so that its number is low: when ``accept()`` on the control socket fails for want of
  a descriptor, the control server closes it, accepts into its number and answers,
  then takes it back (see :mod:`nbankd.control.server`).
- :func:`start_all_threads`: a pool's threads started at start-up, so that it never
  has to grow (and find no thread to be had) while the daemon runs.
- :func:`descriptor_problem`, asked by status: the process is short of descriptors
  now (fewer than :data:`LOW_DESCRIPTORS` below its soft limit, or none at all).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor

from nbankd import errors

#: the soft RLIMIT_NOFILE below which nbankd does not start: its state folder, lock,
#: journal, registry, inotify, control socket, and a few files per deposit worker
MIN_OPEN_FILES = 64
#: free descriptors under the soft limit below which status is degraded
LOW_DESCRIPTORS = 16
#: seconds a pool's threads are given to start (:func:`start_all_threads`)
STARTING_THREADS = 30.0


def check_open_file_limit(minimum: int = MIN_OPEN_FILES) -> None:
    """Raises ConfigError (exit 2) naming LimitNOFILE= when the soft open-file limit
    is below ``minimum``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < minimum:
        raise errors.ConfigError(
            f"nbankd's open-file limit (RLIMIT_NOFILE) is {soft}, below the {minimum} "
            f"it needs (hard limit {'unlimited' if hard == resource.RLIM_INFINITY else hard})",
            hint=f"raise LimitNOFILE= in nbankd's systemd unit (or ulimit -n) to at least "
            f"{minimum}, then start nbankd again",
        )


def descriptor_problem() -> str | None:
    """The status line of a process short of descriptors now, or None."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError as err:
        if errors.out_of_descriptors(err):
            return str(errors.open_file_limit(err, "answering status: none is free"))
        return None  # no /proc: not known
    if soft == resource.RLIM_INFINITY:
        return None
    free = soft - sum(1 for fd in open_fds if fd < soft)
    if free >= LOW_DESCRIPTORS:
        return None
    return (
        f"nbankd is short of file descriptors: {free} of its open-file limit "
        f"(RLIMIT_NOFILE {soft}) free, {len(open_fds)} open; deposits and scans may wait: "
        "raise LimitNOFILE= in nbankd's systemd unit (or ulimit -n) and restart nbankd"
    )


def start_all_threads(pool: ThreadPoolExecutor, workers: int, what: str) -> None:
    """Starts the ``workers`` threads of ``pool`` now (each takes a task that waits for
    the others), so that the pool never has to grow while the daemon runs: a thread
    refused then (the limit on tasks reached) would raise into the caller of
    ``submit`` and leave its task queued. Raises ThreadLimit naming ``what`` when they
    cannot all be started."""
    ready = threading.Barrier(workers + 1)
    try:
        for _ in range(workers):
            pool.submit(ready.wait, STARTING_THREADS)
        ready.wait(STARTING_THREADS)
    except (RuntimeError, threading.BrokenBarrierError) as err:
        ready.abort()  # the ones started go idle
        if isinstance(err, RuntimeError) and not errors.thread_refused(err):
            raise
        raise errors.thread_limit(f"starting {workers} {what}") from err


class SpareDescriptor:
    """One descriptor held in reserve, given up for an ``accept()`` that EMFILE refused."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def hold(self) -> bool:
        """Opens the spare if it is not held; False when no descriptor is free for it."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return False
            return True

    def release(self) -> bool:
        """Closes the spare, freeing its number; False when it was not held."""
        with self._lock:
            if self._fd is None:
                return False
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            return True


#: the daemon's spare descriptor (held from the start of :func:`nbankd.cli.run`)
SPARE = SpareDescriptor()

__all__ = [
    "LOW_DESCRIPTORS",
    "MIN_OPEN_FILES",
    "SPARE",
    "SpareDescriptor",
    "check_open_file_limit",
    "descriptor_problem",
    "start_all_threads",
]
