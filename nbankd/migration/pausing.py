"""The running nbankd during a registry switch: pausing it durably, noticing restarts.

So that an interrupted switch can always give the inboxes back, :class:`Daemon`
writes the inboxes *it* pauses to ``state_dir/migration/paused.json`` before pausing
them; a later run of the switch resumes those too, then deletes the file. Inboxes
someone else paused stay paused. nbankd itself keeps its paused inboxes in
``state_dir/paused.json`` across restarts: a switch finished while nbankd is stopped
takes its inboxes out of that file (:func:`unpause_stopped`), or they would stay
paused when it starts.

A daemon restarted during the switch (systemd, an admin) comes back with every
inbox running, on whatever configuration is on disk. :meth:`Daemon.check` notices it
(another process id or start time, or an inbox this switch paused running again),
pauses it again and tells the caller to catch up with what it deposited meanwhile.

Only "no socket file" and "connection refused" mean nbankd is not running, and
only when no process holds its journal (``state_dir/journal.sqlite3``) open: a
daemon on another control socket (a typo in ``--socket``, a ``control_socket``
edited but not yet in effect) is not taken for a stopped one. Any other failure to
reach it (a timeout, a connection closed without an answer) stops the switch before
anything changes: a daemon that runs but does not answer would go on depositing into
the old registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbankd import errors
from nbankd.archive.fsops import fsync_dir, write_atomic
from nbankd.config.model import JOURNAL_NAME  # held open while nbankd runs
from nbankd.control.client import ControlClient, ControlError
from nbankd.daemon import pauses

PAUSED_NAME = pauses.PAUSED_NAME
IDLE_GRACE = 0.5  # the queue must stay empty this long (a scan may be journaling an item)
POLL = 0.2
START_SLACK = 2.0  # seconds: start times computed from uptime jitter by this much

Say = Callable[[str], None]


def migration_folder(state_dir: Path) -> Path:
    """``state_dir/migration``, made if missing (owned like ``state_dir``: the daemon's user).

    UsageError naming the folder when it cannot be made.
    """
    folder = Path(state_dir) / "migration"
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o750)
            owner = os.stat(state_dir)  # root runs this; the daemon's user owns state_dir
            with contextlib.suppress(PermissionError):
                os.chown(folder, owner.st_uid, owner.st_gid)
            fsync_dir(state_dir)
    except OSError as err:
        raise errors.UsageError(
            f"cannot make {folder}: {err.strerror or err}",
            hint="run the switch as root or as nbankd's user (who owns state_dir)",
        ) from None
    return folder


def state_owner(state_dir: Path) -> tuple[int, int]:
    st = os.stat(state_dir)
    return st.st_uid, st.st_gid


# --- paused.json ---------------------------------------------------------------------


def paused_path(state_dir: Path) -> Path:
    return Path(state_dir) / pauses.SWITCH_PAUSED


def read_paused(state_dir: Path) -> set[str]:
    """The inboxes an earlier, unfinished switch paused (none if the file is unreadable)."""
    record = pauses.unfinished_switch(Path(state_dir))
    return set(record["inboxes"]) if record is not None else set()


def write_paused(
    state_dir: Path,
    inboxes: Iterable[str],
    sock: Path,
    to: str | None = None,
    command: Sequence[str] = (),
) -> None:
    """Records the inboxes a switch paused, with the URL it moves to and ``command``,
    the command line that finishes it (shown by ``nbankctl status``; never secrets:
    paths and URLs only)."""
    path = migration_folder(state_dir) / PAUSED_NAME
    body = {
        "inboxes": sorted(inboxes),
        "socket": str(sock),
        "time": time.time(),
        "to": to,
        "command": list(command),
    }
    try:
        write_atomic(
            path, json.dumps(body, indent=1).encode(), mode=0o640, owner=state_owner(state_dir)
        )
    except OSError as err:
        raise errors.UsageError(
            f"cannot write {path}: {err.strerror or err}",
            hint="run the switch as root or as nbankd's user (who owns state_dir)",
        ) from None


def forget_paused(state_dir: Path) -> bool:
    """Deletes paused.json; True if there was one."""
    path = paused_path(state_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def unpause_stopped(state_dir: Path) -> list[str] | None:
    """With nbankd stopped, gives back the inboxes an unfinished switch paused: takes
    them out of nbankd's own record of paused inboxes (``state_dir/paused.json``, read
    when it starts, :mod:`nbankd.daemon.pauses`), then deletes the switch's record.

    Returns the inboxes taken out (those still recorded as paused), or None when no
    switch record was there. Inboxes paused by someone else stay paused. Raises
    OSError when ``state_dir/paused.json`` cannot be rewritten (the switch's record is
    then kept, so that a later run tries again).
    """
    state_dir = Path(state_dir)
    if not paused_path(state_dir).exists():
        return None
    ours = read_paused(state_dir)
    held = pauses.load(state_dir)
    freed = sorted(held & ours)
    if freed:
        pauses.save(state_dir, held - ours)
        with contextlib.suppress(PermissionError):  # root runs this: give it back to nbankd
            uid, gid = state_owner(state_dir)
            os.chown(state_dir / PAUSED_NAME, uid, gid)
    forget_paused(state_dir)
    return freed


# --- the daemon -------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Which nbankd process answers: its pid and (from its uptime) start time."""

    pid: int | None
    started: float | None

    def same(self, other: Identity) -> bool:
        if self.pid != other.pid:
            return False
        if self.started is None or other.started is None:
            return True
        return abs(self.started - other.started) < START_SLACK

    def __str__(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else "unknown pid"


def identity_of(status: dict[str, Any]) -> Identity:
    pid, uptime = status.get("pid"), status.get("uptime")
    started = time.time() - uptime if isinstance(uptime, int | float) else None
    return Identity(pid if isinstance(pid, int) else None, started)


def not_running(path: Path) -> bool:
    """True only when nothing can be listening: no socket file, or connection refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return False


def holders(path: Path) -> list[int]:
    """The processes (other than this one) holding ``path`` open, as far as /proc shows."""
    target = os.path.realpath(path)
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        return []
    found = []
    for pid in pids:
        if pid == os.getpid():
            continue
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{folder}/{fd}") == target:
                    found.append(pid)
                    break
    return found


def _paused_states(status: dict[str, Any]) -> dict[str, bool]:
    return {
        i["path"]: bool(i.get("paused"))
        for i in status.get("inboxes", [])
        if isinstance(i, dict) and isinstance(i.get("path"), str)
    }


class Daemon:
    """The nbankd answering on ``path``; ``running`` is False when none runs."""

    def __init__(
        self,
        path: Path,
        state_dir: Path,
        say: Say,
        to: str | None = None,
        command: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.to = to  # the URL the switch moves to (recorded with the paused inboxes)
        self.command = tuple(command)  # the command line that finishes the switch
        self.state_dir = state_dir
        self.say = say
        self.client = ControlClient(path)
        self.ours: list[str] = []  # the inboxes this switch paused (and must resume)
        self.identity: Identity | None = None
        try:
            self.client.call("status")
            self.running = True
        except errors.DaemonUnreachable as err:
            if not not_running(path):
                raise errors.DaemonUnreachable(
                    f"{err.message}: not switching (nothing was changed)",
                    hint="its control socket exists, so nbankd may be running and depositing; "
                    "check it (systemctl status nbankd) or give the right --socket, then "
                    "run the switch again",
                ) from None
            journal = Path(state_dir) / JOURNAL_NAME
            pids = holders(journal)
            if pids:
                raise errors.DaemonUnreachable(
                    f"nothing answers on {path}, but process {', '.join(map(str, pids))} holds "
                    f"nbankd's journal {journal} open: not switching (nothing was changed)",
                    hint="nbankd runs with another control socket: give it with --socket, or "
                    "stop nbankd, then run the switch again",
                ) from None
            self.running = False

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.client.call(cmd, args or {})

    def pause(self) -> None:
        """Pauses every inbox, recording first (paused.json) which ones this switch pauses."""
        status = self.call("status")
        self.identity = identity_of(status)
        earlier = read_paused(self.state_dir)
        states = _paused_states(status)
        ours = sorted(k for k, paused in states.items() if not paused or k in earlier)
        write_paused(self.state_dir, ours, self.path, self.to, self.command)
        self.call("pause")
        self.ours = ours
        fresh = sum(not states[k] for k in ours)
        self.say(f"paused {fresh} inbox(es) of nbankd ({self.path}, {self.identity})")
        if len(ours) > fresh:
            self.say(
                f"{len(ours) - fresh} inbox(es) paused by an earlier, unfinished switch "
                "will be resumed at the end"
            )
        for key in sorted(k for k, paused in states.items() if paused and k not in earlier):
            self.say(f"inbox {key} was paused already (not by this switch): it stays paused")

    def check(self) -> bool:
        """True if the daemon paused earlier is still the one running, all paused.

        Otherwise (restarted, or an inbox resumed by someone) pauses it again and
        returns False: the caller waits until it is idle and catches up.
        """
        status = self.call("status")
        now = identity_of(status)
        states = _paused_states(status)
        running_again = [k for k in self.ours if states.get(k) is False]
        restarted = self.identity is not None and not self.identity.same(now)
        if not restarted and not running_again:
            return True
        if restarted:
            self.say(
                f"nbankd restarted during the switch ({self.identity} -> {now}): pausing again"
            )
        else:
            self.say(f"{len(running_again)} inbox(es) resumed during the switch: pausing again")
        ours = sorted(set(self.ours) | {k for k, paused in states.items() if not paused})
        write_paused(self.state_dir, ours, self.path, self.to, self.command)
        self.call("pause")
        self.ours, self.identity = ours, now
        return False

    def wait_idle(self, timeout: float) -> None:
        """Waits until no deposit is in flight; ProblemsFound listing them if not."""
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            items = self.call("queue").get("items", [])
            now = time.monotonic()
            if items:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= IDLE_GRACE:
                self.say("no deposit in flight")
                return
            time.sleep(POLL)
        listing = "; ".join(
            f"{i.get('relpath')} ({i.get('state')}, {i.get('error') or i.get('status')})"
            for i in items[:5]
        )
        raise errors.ProblemsFound(
            f"deposits still in flight after {timeout:g} s: {listing}",
            hint="let them finish (nbankctl queue) or raise --wait, then run the switch again",
        )

    def registry_url(self) -> str | None:
        url = self.call("status").get("registry", {}).get("url")
        return url if isinstance(url, str) else None

    def resume(self) -> None:
        """Resumes the inboxes this switch (or an unfinished earlier one) paused."""
        done = 0
        for key in self.ours:
            try:
                self.call("resume", {"inbox": key})
                done += 1
            except ControlError as err:
                if err.code != "not-found":  # an inbox no longer configured: nothing to do
                    raise
        if self.ours:
            self.say(f"resumed {done} inbox(es)")
        self.ours = []
        forget_paused(self.state_dir)


__all__ = [
    "Daemon",
    "Identity",
    "forget_paused",
    "holders",
    "identity_of",
    "migration_folder",
    "not_running",
    "paused_path",
    "read_paused",
    "state_owner",
    "unpause_stopped",
    "write_paused",
]
