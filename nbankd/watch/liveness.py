"""How an inbox's watch is proved alive and complete, outside watchdog: the canary
file the daemon rewrites and expects an event for, and the kernel's own list of the
folders this process watches (``/proc/self/fdinfo``), compared with what a scan saw.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from nbankd.archive import stubnames
from nbankd.names import CANARY_NAME

#: what a refused inotify watch means, by errno
LIMITS = {
    errno.ENOSPC: "inotify watch limit reached (raise fs.inotify.max_user_watches)",
    errno.EMFILE: "inotify instance limit reached (raise fs.inotify.max_user_instances)",
    errno.ENOMEM: "kernel out of memory for inotify watches",
}


def write_canary(root: str, seq: int, expect: tuple[int, int] | None = None) -> None:
    """Rewrites ``root/CANARY_NAME``, never through a link: anything else found under
    that name (a symlink, a hard link, a FIFO, another owner's file) is unlinked and
    the canary made anew. Another writer of the same name (a second daemon on the
    inbox) may win a race: the write is tried again. ``expect``: the (device, inode)
    ``root`` must name (the inbox folder the daemon checked); a folder put in its
    place (a link to anywhere) is never written to (FileNotFoundError)."""
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(dir_fd)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise FileNotFoundError(errno.ENOENT, "not the inbox folder checked", root)
        for _attempt in range(5):
            fd = _open_canary(dir_fd)
            if fd is None:
                continue  # raced another writer of the name: look again
            try:
                os.ftruncate(fd, 0)
                os.write(fd, _CANARY_TEXT + b" %d\n" % seq)
            finally:
                os.close(fd)
            return
        raise FileExistsError(errno.EEXIST, "the canary keeps changing under nbankd")
    finally:
        os.close(dir_fd)


_CANARY_TEXT = b"nbankd liveness check"


def _open_canary(dir_fd: int) -> int | None:
    """An open, writable canary of ours, or None when another writer raced us.

    A link, a FIFO or a second name of another file in its place is only a name:
    it is unlinked (no bytes are lost). A plain file that nbankd did not write
    (another owner, or other contents) is refused, never truncated or removed:
    PermissionError, which the watcher reports as a failed liveness check.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(CANARY_NAME, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        fd = -1
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EACCES):
            raise
        fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CANARY_NAME, dir_fd=dir_fd)  # a link or FIFO in its place
    if fd >= 0:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            head = os.pread(fd, len(_CANARY_TEXT), 0)
            if st.st_uid == os.geteuid() and (not head or head == _CANARY_TEXT):
                return fd
            os.close(fd)
            raise PermissionError(
                errno.EPERM,
                "a file nbankd did not write holds that name; it is left alone (move it "
                "away to let the check run)",
            )
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CANARY_NAME, dir_fd=dir_fd)  # a name only: its bytes stay elsewhere
    try:
        return os.open(CANARY_NAME, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return None


def _inotify_fds() -> Iterator[str]:
    with contextlib.suppress(OSError), os.scandir("/proc/self/fd") as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if os.readlink(entry.path) == "anon_inode:inotify":
                    yield entry.name


def _watch_lines() -> Iterator[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every watch of every inotify instance of this process,
    as ``/proc/self/fdinfo`` lists them (its ``sdev`` is the kernel's encoding)."""
    for fd in _inotify_fds():
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("inotify wd:"):
                continue
            fields = dict(word.split(":", 1) for word in line.split()[1:] if ":" in word)
            try:
                sdev, ino = int(fields["sdev"], 16), int(fields["ino"], 16)
            except (KeyError, ValueError):
                continue
            yield os.makedev(sdev >> 20, sdev & 0xFFFFF), ino


def kernel_watches() -> frozenset[int] | None:
    """Inode numbers of the folders this process's inotify instances watch, as the
    kernel lists them in ``/proc/self/fdinfo``, but for the archive's stub folders
    whose names :mod:`nbankd.archive.stubnames` keeps (matched by device and inode,
    as they were before and after the read); None when it lists nothing usable."""
    before = stubnames.watched_folders()
    lines = list(_watch_lines())
    theirs = before | stubnames.watched_folders()
    found = [ino for dev, ino in lines if (dev, ino) not in theirs]
    return frozenset(found) if found else None


__all__ = ["LIMITS", "kernel_watches", "write_canary"]
