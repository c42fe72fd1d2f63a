"""One daemon per state directory, decided before anything in it is touched.

The daemon takes an exclusive ``flock`` on ``state_dir/nbankd.lock`` before it opens
its journal or its embedded registry, keeps it for the life of the process (the
kernel drops it when the process ends, however it ends: there is no stale lock to
clean up after ``kill -9``), and writes its pid into the file for the message a
second daemon gives. A second ``nbankd`` with the same ``state_dir`` exits 2 at
once naming that pid, before journal recovery could drive the first one's items.

The folder itself is locked too (``flock`` on a descriptor of ``state_dir``): the
lock file can be deleted under a running daemon (someone clearing a "stale lock"),
and a second daemon would then lock a new file of that name; the folder it cannot
lose without the daemon noticing (:func:`changed`). The holder's pid is then read
from ``/proc/locks``. Where a folder cannot be locked (``ENOLCK``, some network
filesystems, which the deployment guide rules out for state_dir), the file's lock
alone decides, as before.
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

    def __init__(self, fd: int, path: Path, folder_fd: int = -1) -> None:
        self.fd = fd
        self.path = path
        self.folder_fd = folder_fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.folder_fd >= 0:
            os.close(self.folder_fd)
            self.folder_fd = -1


def acquire(state_dir: Path, *, wait: bool = False) -> StateLock:
    """Takes the state directory's lock or raises :class:`StateDirInUse` naming the
    holder's pid; a lock file that cannot be opened raises ConfigError naming it.
    ``wait``: wait for the holder to let go instead (one manual deposit after another)."""
    how = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    folder_fd = _lock_folder(state_dir, how)
    path = state_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as err:
        _close(folder_fd)
        raise errors.ConfigError(
            f"cannot open the state directory's lock {path}: {err.strerror or err}",
            hint="state_dir must be a folder the daemon's user owns; the lock must be a "
            "plain file (not a link)",
        ) from err
    try:
        fcntl.flock(fd, how)
    except OSError as err:
        holder = _read_pid(fd)
        os.close(fd)
        _close(folder_fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise errors.ConfigError(f"cannot lock {path}: {err.strerror or err}") from err
        raise _in_use(state_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(fd, path, folder_fd)


def _lock_folder(state_dir: Path, how: int) -> int:
    """A descriptor of ``state_dir`` holding its flock (-1 where folders cannot be
    locked); raises :class:`StateDirInUse` when another process holds it."""
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise errors.ConfigError(
            f"cannot open state_dir {state_dir}: {err.strerror or err}",
            hint="state_dir must be a folder the daemon's user owns",
        ) from err
    try:
        fcntl.flock(fd, how)
    except OSError as err:
        st = os.fstat(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _in_use(state_dir, _holder_of(st.st_dev, st.st_ino)) from None
        return -1  # ENOLCK, EINVAL...: the lock file alone decides
    return fd


def _in_use(state_dir: Path, holder: int | None) -> StateDirInUse:
    who = f"pid {holder}" if holder else "another process"
    return StateDirInUse(
        f"state_dir {state_dir} is in use by another nbankd ({who}); nothing was touched",
        hint="stop that daemon first, or give this one its own state_dir",
    )


def _holder_of(dev: int, ino: int) -> int | None:
    """The pid holding a flock on the file (dev, ino), from /proc/locks, if listed."""
    wanted = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as listing:
            lines = listing.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF" ("->" when waiting)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def identities(state_dir: Path, *names: str) -> tuple[tuple[int, int], ...]:
    """(device, inode) of ``state_dir`` and of each named file in it, as they are now."""
    out = []
    for path in (state_dir, *(state_dir / n for n in names)):
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino))
    return tuple(out)


def changed(
    state_dir: Path, names: tuple[str, ...], recorded: tuple[tuple[int, int], ...]
) -> str | None:
    """Why the state directory is no longer the one the daemon opened (removed,
    replaced, one of its files ``names`` (the journal, the embedded registry) gone or
    replaced), or None while it is."""
    subject = f"state_dir {state_dir} or its {' or '.join(names)}"
    try:
        now = identities(state_dir, *names)
        if now == recorded and recorded:
            return None
        what = "replaced"
        differ = [n for n, a, b in zip(("", *names), now, recorded, strict=False) if a != b]
    except OSError as err:
        what = f"removed ({err.strerror or err})"
        differ = [n for n in ("", *names) if not os.path.lexists(state_dir / n)]
    if differ:
        subject = f"state_dir {state_dir}" + (f": its {differ[0]}" if differ[0] else "")
    return (
        f"{subject} was {what} while nbankd ran: nothing is "
        "claimed or moved any more, since the journal and registry in use are no longer "
        "the ones on disk; stop nbankd and restore state_dir from its backup (see "
        "docs/deployment.md) before starting it again"
    )


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None
