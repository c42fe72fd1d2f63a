"""Proof that an inbox's watch works: the liveness canary and the coverage check.

A mixin of :class:`~nbankd.watch.observer.InboxWatcher`, whose state it uses (its
locks, its inboxes, and its way of waking the daemon).

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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import structlog

from nbankd.names import CANARY_NAME, printable
from nbankd.watch.liveness import kernel_watches, write_canary
from nbankd.watch.watched import WatchedInbox, same_folder

log = structlog.get_logger("nbankd.watch.observer")


class ProofOfLife:
    """The liveness and coverage checks of every watched inbox (see the module's text)."""

    # the watcher's state this half uses (set by InboxWatcher.__init__)
    _lock: threading.RLock
    _probe_lock: threading.Lock
    _inboxes: dict[str, WatchedInbox]
    _wake: Callable[[WatchedInbox, str], None]

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
            write_canary(inbox.root, seq, inbox.accepted)
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


__all__ = ["ProofOfLife"]
