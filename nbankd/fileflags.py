"""A file's immutable and append-only attributes (``chattr +i`` / ``+a``).

No user, root included, may rename, remove or (immutable) change such a file, and
no entry of such a folder may be added or removed: an input that carries one can
be read and copied but never leave its inbox. The attributes are read with the
``FS_IOC_GETFLAGS`` ioctl (ext4, XFS, btrfs and others); where a filesystem has no
such attributes the answer is "none".
"""

from __future__ import annotations

import fcntl
import os
import stat

FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long)
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020


def protected(fd: int) -> str | None:
    """ "immutable" or "append-only" when the open file or folder ``fd`` carries that
    attribute, else None (also where the filesystem cannot say)."""
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return None
    flags = int.from_bytes(raw[:4], "little", signed=False)
    if flags & FS_IMMUTABLE_FL:
        return "immutable"
    if flags & FS_APPEND_FL:
        return "append-only"
    return None


def protected_at(dir_fd: int, name: bytes | str) -> str | None:
    """:func:`protected` of the entry ``name`` of the open folder ``dir_fd``, opened
    without following a link; only a regular file or a folder is opened (never a
    device or a FIFO), and None is the answer for anything else or what cannot be
    opened."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return None
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        if not os.path.samestat(os.fstat(fd), st):
            return None  # replaced meanwhile: not the entry looked at
        return protected(fd)
    finally:
        os.close(fd)
