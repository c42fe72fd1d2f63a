"""Is a file still open for writing by some process? Asked of the kernel through a
read lease (``fcntl(F_SETLEASE, F_RDLCK)``), which it grants only while no open file
description of the inode is writable: a program that keeps a recording open and goes
quiet for longer than ``settle_seconds`` is then not mistaken for one that finished.

The lease is dropped as soon as it is granted. A program opening the file for writing
in that instant waits for the drop (microseconds), and the lease-break notice is sent
as SIGURG, whose default action is to ignore it, rather than SIGIO, whose default
action would end the process.

The kernel grants leases only to the file's owner or to a process holding
``CAP_LEASE``, and only on filesystems that support them: when it refuses, the answer
is None, "cannot tell", and settling alone decides, as before. NFSv4 without a read
delegation and CIFS without an oplock refuse every lease as if the file were open for
writing; :func:`calibrate` catches that against a file nothing holds open (the work
folder's token), and answers about that device are then "cannot tell". Writers on
other hosts of a network filesystem are never seen.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from nbankd import errors

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

#: devices whose filesystem said "open for writing" of a file nothing holds open: NFSv4
#: without a read delegation and CIFS without an oplock refuse every read lease with
#: EAGAIN, so their answers tell nothing (see :func:`calibrate`)
_untrusted: set[int] = set()


def open_for_writing(fd: int) -> bool | None:
    """True when a process (this one included) holds the regular file open on ``fd``
    open for writing, False when none does, None when the kernel cannot tell (or its
    filesystem answers "open" for closed files: :func:`calibrate`). ``fd`` must be
    open read-only."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_dev in _untrusted:
        return None
    return _ask(fd)


def calibrate(dir_fd: int, control: bytes) -> None:
    """Asks about ``control`` (in the open folder ``dir_fd``), a file nothing holds
    open for writing (the work folder's token): when the answer is "open", answers
    about files of its device are not trusted until a later calibration answers
    "closed" (a filesystem may gain or lose its delegations)."""
    try:
        fd = os.open(control, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        answer = _ask(fd)
        if answer is True:
            _untrusted.add(st.st_dev)
        elif answer is False:
            _untrusted.discard(st.st_dev)
    finally:
        os.close(fd)


def untrusted(dev: int) -> bool:
    """True when answers about files of device ``dev`` are not trusted (:func:`calibrate`)."""
    return dev in _untrusted


def _ask(fd: int) -> bool | None:
    """The kernel's answer for ``fd``, a regular file open read-only."""
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
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return open_for_writing(fd)
    finally:
        os.close(fd)


#: folder levels walked below a folder input; deeper ones count as "cannot tell"
MAX_DEPTH = 64


def tree_open_for_writing_at(
    dir_fd: int, name: bytes, ask: Callable[[int, bytes], bool | None] | None = None
) -> bool | None:
    """:func:`open_for_writing` of a folder input: True when some program holds one of
    the regular files below the folder ``name`` (in the open folder ``dir_fd``) open
    for writing, False when none does, None when the kernel could not tell for one of
    them and held none. Walked from descriptors without recursion, one descriptor per
    level (at most MAX_DEPTH levels: deeper counts as "cannot tell"), never through a
    link; what cannot be opened counts as "cannot tell". ``ask`` answers for one file
    (its folder's descriptor, its name); default :func:`open_for_writing_at`."""
    ask = ask or open_for_writing_at
    try:
        top = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    unknown = False
    levels: list[tuple[int, Iterator[os.DirEntry[str]]]] = []
    try:
        unknown = not _descend(levels, top)
        while levels:
            fd, entries = levels[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(levels.pop()[0])
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and entry.is_file(follow_symlinks=False)
            except OSError:
                unknown = True
                continue
            if is_dir:
                if len(levels) > MAX_DEPTH:
                    unknown = True
                    continue
                try:
                    child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    unknown = True
                    continue
                unknown = not _descend(levels, child) or unknown
            elif is_file:  # links and special files are skipped: the claim refuses them
                answer = ask(fd, os.fsencode(entry.name))
                if answer:
                    return True
                unknown = unknown or answer is None
    finally:
        for fd, _ in levels:
            os.close(fd)
    return None if unknown else False


def _descend(levels: list[tuple[int, Iterator[os.DirEntry[str]]]], fd: int) -> bool:
    """Pushes the open folder ``fd`` and its entries onto ``levels`` (which then owns the
    descriptor); False when it cannot be listed (``fd`` is closed then)."""
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError:
        os.close(fd)
        return False
    levels.append((fd, iter(entries)))
    return True


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


__all__ = [
    "calibrate",
    "open_for_writing",
    "open_for_writing_at",
    "refuse_if_open_for_writing",
    "tree_open_for_writing_at",
    "untrusted",
]
