"""Is a file still open for writing by some process? Asked of the kernel through a
read lease (``fcntl(F_SETLEASE, F_RDLCK)``), which it grants only while no open file
description of the inode is writable: a program that keeps a recording open and goes
quiet for longer than ``settle_seconds`` is then not mistaken for one that finished.

The lease is dropped as soon as it is granted. A program opening the file for writing
in that instant waits for the drop (microseconds), and the lease-break notice is sent
as SIGURG, whose default action is to ignore it, rather than SIGIO, whose default
action would end the process.

The kernel grants leases only to the file's owner or to a process holding
``CAP_LEASE``, and only on filesystems that support them (not NFS): when it refuses,
the answer is None, "cannot tell", and settling alone decides, as before. Writers on
other hosts of a network filesystem are never seen.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from pathlib import Path

from nbankd import errors


def open_for_writing(fd: int) -> bool | None:
    """True when a process (this one included) holds the regular file open on ``fd``
    open for writing, False when none does, None when the kernel cannot tell.
    ``fd`` must be open read-only."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None  # EACCES/EPERM (no CAP_LEASE), EINVAL/ENOLCK (no leases here), ...
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def open_for_writing_at(dir_fd: int, name: bytes) -> bool | None:
    """:func:`open_for_writing` of the entry ``name`` of the open folder ``dir_fd``,
    opened without following a link and without blocking (a FIFO swapped in is not a
    regular file: None). None also when the entry cannot be opened."""
    try:
        fd = os.open(
            name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )
    except OSError:
        return None
    try:
        return open_for_writing(fd)
    finally:
        os.close(fd)


def refuse_if_open_for_writing(fd: int, shown: Path | str) -> None:
    """Raises :class:`~nbankd.errors.StillOpenForWriting` when some program holds the
    file open on ``fd`` open for writing: a folder input is not finished while one of
    its files is."""
    if open_for_writing(fd):
        raise errors.StillOpenForWriting(
            f"'{shown}' is still open for writing by a program; its folder goes back to "
            "the inbox and is deposited once it is closed",
            hint="nothing to do if a program is still recording it",
        )


__all__ = ["open_for_writing", "open_for_writing_at", "refuse_if_open_for_writing"]
