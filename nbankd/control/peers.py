"""Who is at the other end of a control connection, and what they may run.

:class:`Peer` is the kernel's word (``SO_PEERCRED``) with the user's and groups'
names looked up from the user and group databases (never from ``/proc``, which
systemd's ``ProtectProc`` hides). :class:`PeerNames` does those lookups off the
accept thread and keeps each answer :data:`NAMES_TTL` seconds, so a directory
service that hangs delays only its own user's connections. :class:`Access` decides
from ``control.readers`` and ``control.admins`` what a peer may run; root and the
daemon's own user are always admins. :func:`socket_group` is the group the socket
file is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from nbankd.config import ControlConfig
from nbankd.control import protocol

log = structlog.get_logger("nbankd.control")

NAMES_TTL = 30.0  # seconds a peer's user and group names are reused
MAX_NAMES = 4096  # (uid, gid) pairs whose names are kept
MAX_LOOKUPS = 8  # users whose names are being looked up at once
MAX_WAITING_LOOKUP = 256  # connections of one user waiting for its names
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    user: str
    groups: tuple[str, ...]
    admin: bool = False  # decided by Access at accept
    gids: tuple[int, ...] = ()  # the groups by number (the primary one included)

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        return cls.lookup(*credentials(sock))

    @classmethod
    def lookup(cls, pid: int, uid: int, gid: int) -> Peer:
        """Resolves names: the user's, its primary group's and its supplementary groups'."""
        gids = {gid}
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            user = f"uid {uid}"
        else:
            user = pw.pw_name
            gids.add(pw.pw_gid)
            try:
                gids.update(os.getgrouplist(user, pw.pw_gid))
            except OSError:
                gids.update(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)
        names = []
        for g in sorted(gids):
            try:
                names.append(grp.getgrgid(g).gr_name)
            except KeyError:
                continue
        return cls(
            pid=pid, uid=uid, gid=gid, user=user, groups=tuple(names), gids=tuple(sorted(gids))
        )


def credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of ``sock``, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


Connection = tuple[socket.socket, int]  # an accepted connection, and its peer's pid


class PeerNames:
    """Peers' user and group names by (uid, gid), looked up off the accept thread.

    :meth:`known` answers from what was looked up within :data:`NAMES_TTL` seconds;
    :meth:`look_up` queues a connection for a lookup thread, which hands each waiting
    connection to ``then`` with its Peer (or the exception the lookup raised)."""

    def __init__(
        self,
        then: Callable[[socket.socket, Peer | None, Exception | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._then = then
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[int, int], tuple[float, Peer]] = {}
        self._waiting: dict[tuple[int, int], list[Connection]] = {}

    def known(self, pid: int, uid: int, gid: int) -> Peer | None:
        with self._lock:
            found = self._known.get((uid, gid))
        if found is None or self._clock() - found[0] > NAMES_TTL:
            return None
        return dataclasses.replace(found[1], pid=pid)

    def look_up(self, conn: socket.socket, pid: int, uid: int, gid: int) -> bool:
        """Queues ``conn`` until its peer's names are known; False when too many
        connections or users already wait (the caller answers ``busy``)."""
        key = (uid, gid)
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None:
                if len(waiting) >= MAX_WAITING_LOOKUP:
                    return False
                waiting.append((conn, pid))
                return True
            if len(self._waiting) >= MAX_LOOKUPS:
                return False
            self._waiting[key] = [(conn, pid)]
        try:
            threading.Thread(
                target=self._run, args=(key,), name="control-names", daemon=True
            ).start()
        except BaseException:
            with self._lock:
                del self._waiting[key]
            raise
        return True

    def _run(self, key: tuple[int, int]) -> None:
        peer: Peer | None = None
        error: Exception | None = None
        try:
            peer = Peer.lookup(0, *key)
        except Exception as err:  # handed to each waiting connection as its answer
            error = err
        with self._lock:
            if peer is not None:
                now = self._clock()
                self._known[key] = (now, peer)
                if len(self._known) > MAX_NAMES:
                    for old in sorted(self._known, key=lambda k: self._known[k][0]):
                        if len(self._known) <= MAX_NAMES // 2:
                            break
                        del self._known[old]
            waiting = self._waiting.pop(key, [])
        for conn, pid in waiting:
            try:
                self._then(
                    conn, None if peer is None else dataclasses.replace(peer, pid=pid), error
                )
            except Exception:  # the others waiting are still answered
                log.exception("control connection failed after its peer's lookup")
                conn.close()


class Access:
    """Decides what a peer may run, from ``control.readers`` and ``control.admins``."""

    def __init__(self, control: Callable[[], ControlConfig], daemon_uid: int | None = None):
        self.control = control
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid

    def _matches(self, peer: Peer, names: tuple[str, ...]) -> bool:
        return peer.user in names or any(g in names for g in peer.groups)

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        return self._matches(peer, self.control().admins)

    def may_connect(self, peer: Peer) -> bool:
        """True when the peer may run at least the read-only commands."""
        return self.is_admin(peer) or self._matches(peer, self.control().readers)

    def allowed(self, peer: Peer, cmd: str) -> bool:
        if self.is_admin(peer):
            return True
        return cmd in protocol.READ_COMMANDS and self._matches(peer, self.control().readers)

    def denial(self, peer: Peer, cmd: str | None) -> str:
        """The message for a refused command (``None``: refused at connection)."""
        control = self.control()
        if cmd is None or cmd in protocol.READ_COMMANDS:
            who = f"readers: {', '.join(control.readers) or 'none'}; "
            who += f"admins: {', '.join(control.admins) or 'none'}"
        else:
            who = f"admins: {', '.join(control.admins) or 'none'}"
        what = "use the control socket" if cmd is None else f"run {cmd!r}"
        return f"user {peer.user} may not {what} ({who})"


def socket_group(control: ControlConfig) -> int | None:
    """The one group named among readers and admins (not root), if exactly one."""
    gids = set()
    for name in (*control.readers, *control.admins):
        if name == "root":
            continue
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(name).gr_gid)
    return gids.pop() if len(gids) == 1 else None
