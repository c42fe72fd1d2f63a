"""One daemon per state directory, decided before anything in it is touched.

The daemon takes an exclusive ``flock`` on ``state_dir/nbankd.lock`` before it opens
its journal or its embedded registry, keeps it for the life of the process (the
kernel drops it when the process ends, however it ends: there is no stale lock to
clean up after ``kill -9``), and writes its pid into the file for the message a
second daemon gives. A second ``nbankd`` with the same ``state_dir`` exits 2 at
once naming that pid, before journal recovery could drive the first one's items.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from nbankd import errors

LOCK_NAME = "nbankd.lock"


class StateDirInUse(errors.ConfigError):
    """Another live process holds the state directory's lock."""

    code = "state-dir-in-use"


class StateLock:
    """The held lock; :meth:`release` (or the process's end) gives it up."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire(state_dir: Path, *, wait: bool = False) -> StateLock:
    """Takes the state directory's lock or raises :class:`StateDirInUse` naming the
    holder's pid; a lock file that cannot be opened raises ConfigError naming it.
    ``wait``: wait for the holder to let go instead (one manual deposit after another)."""
    path = state_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as err:
        raise errors.ConfigError(
            f"cannot open the state directory's lock {path}: {err.strerror or err}",
            hint="state_dir must be a folder the daemon's user owns; the lock must be a "
            "plain file (not a link)",
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_pid(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise errors.ConfigError(f"cannot lock {path}: {err.strerror or err}") from err
        who = f"pid {holder}" if holder else "another process"
        raise StateDirInUse(
            f"state_dir {state_dir} is in use by another nbankd ({who}); nothing was touched",
            hint="stop that daemon first, or give this one its own state_dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(fd, path)


def identities(state_dir: Path, *names: str) -> tuple[tuple[int, int], ...]:
    """(device, inode) of ``state_dir`` and of each named file in it, as they are now."""
    out = []
    for path in (state_dir, *(state_dir / n for n in names)):
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino))
    return tuple(out)


def changed(state_dir: Path, journal: str, recorded: tuple[tuple[int, int], ...]) -> str | None:
    """Why the state directory is no longer the one the daemon opened (removed,
    replaced, its journal gone or replaced), or None while it is."""
    try:
        if identities(state_dir, journal) == recorded and recorded:
            return None
        what = "replaced"
    except OSError as err:
        what = f"removed ({err.strerror or err})"
    return (
        f"state_dir {state_dir} or its {journal} was {what} while nbankd ran: nothing is "
        "claimed or moved any more, since the journal and registry in use are no longer "
        "the ones on disk; stop nbankd and restore state_dir from its backup (see "
        "docs/deployment.md) before starting it again"
    )


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None
