"""journald's native protocol, spoken by nbankd itself: entries that never wait.

Each entry is one datagram to journald's socket (``/run/systemd/journal/socket``) on
an ``AF_UNIX``/``SOCK_DGRAM`` socket of nbankd's own, sent with ``MSG_DONTWAIT``: a
journald that takes no entry (its socket's queue full: journald stuck or swamped)
makes :meth:`JournalSocket.send` raise at once instead of blocking. (systemd-python's
``journal.send`` blocked in ``sendmsg`` holding the GIL, which stopped every thread.)

The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): a field is ``KEY=value\\n`` when
the value holds no newline, else ``KEY\\n``, the value's length as a little-endian
64-bit integer, the value and ``\\n``. An entry too large for one datagram goes in a
sealed memfd whose descriptor is the datagram's only content (``SCM_RIGHTS``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Mapping

__all__ = ["JOURNAL_SOCKET", "JournalSocket", "NoJournal", "encode_entry"]

#: where journald takes native entries
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# journald ignores fields whose names break these rules
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# errors telling that no journald listens there (the entry goes to the fallback)
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ECONNREFUSED, errno.EACCES, errno.EPERM})
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class NoJournal(OSError):
    """No journald takes entries at the socket's path (absent, or nobody bound)."""


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """Returns one entry in the native protocol (pure). Fields with a name journald
    would refuse are left out; text that cannot be UTF-8 is escaped."""
    parts: list[bytes] = []
    for key, value in fields.items():
        if not _FIELD_NAME.fullmatch(key):
            continue
        data = str(value).encode("utf-8", "backslashreplace")
        name = key.encode("ascii")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


_shared: list[socket.socket] = []  # the process's one unbound socket, made when first used
_shared_lock = threading.Lock()


def _socket() -> socket.socket:
    with _shared_lock:
        if not _shared:
            _shared.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC))
        return _shared[0]


class JournalSocket:
    """Sends entries to journald's socket at ``path``; :meth:`send` never blocks."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path

    def send(self, entry: bytes) -> None:
        """Sends one encoded entry. :class:`NoJournal` when no journald listens there;
        another :class:`OSError` when journald takes no entry now (``EAGAIN`` or
        ``ENOBUFS``: its queue is full) or the send fails otherwise."""
        sock = _socket()
        try:
            try:
                sock.sendto(entry, socket.MSG_DONTWAIT, self.path)
            except OSError as err:
                if err.errno != errno.EMSGSIZE:
                    raise
                self._send_in_memfd(sock, entry)
        except OSError as err:
            if err.errno in _ABSENT:
                raise NoJournal(err.errno, f"no journald at {self.path}: {err.strerror}") from err
            if err.errno in (errno.EAGAIN, errno.ENOBUFS):
                raise OSError(
                    err.errno, "journald takes no entry: its queue is full (journald stuck?)"
                ) from err
            raise

    def _send_in_memfd(self, sock: socket.socket, entry: bytes) -> None:
        fd = os.memfd_create("nbankd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = array.array("i", [fd]).tobytes()
            sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], socket.MSG_DONTWAIT, self.path
            )
        finally:
            os.close(fd)
