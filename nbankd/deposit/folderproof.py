"""A proof that an inbox's work folder is the one this daemon made, for filesystems
that number folders anew at every mount.

The work folder (``.nbank``) is recognised by the (device, inode) recorded at start.
SSHFS makes inode numbers up per mount, so after the inbox's mount is taken away and
back the folder looks replaced, and deposits would wait for a reload. At start the
daemon therefore also leaves a random token in ``.nbank/.nbankd-proof`` (mode 0600,
in a folder only the daemon's user may enter or write). When the numbers differ, the
folder is still accepted if it holds that file with that token: a writer of the inbox
can neither read the token nor move the file out of ``.nbank`` into a folder of their
own, so only the daemon's own folder can show it. A remount is told from a
replacement that way, without trusting anything the kernel reports.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat

PROOF_NAME = ".nbankd-proof"
_TEMP_NAME = PROOF_NAME + ".new"
_MAX = 256  # bytes of a token file read back: a token is 64 hex digits
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def leave(folder: int) -> str:
    """Writes a new token into the open folder ``folder`` (replacing an older one) and
    returns it. The folder must be private to this user (the caller checked it)."""
    token = secrets.token_hex(32)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_TEMP_NAME, dir_fd=folder)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(_TEMP_NAME, flags, 0o600, dir_fd=folder)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.rename(_TEMP_NAME, PROOF_NAME, src_dir_fd=folder, dst_dir_fd=folder)
    return token


def holds(folder: int, token: str) -> bool:
    """True when the open folder ``folder`` is private to this user and holds this
    token in a regular file of its own (never through a link)."""
    try:
        st = os.fstat(folder)
        if not _private(st):
            return False
        fd = os.open(PROOF_NAME, _READ, dir_fd=folder)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_size > _MAX:
            return False
        data = os.read(fd, _MAX + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    return hmac.compare_digest(data, token.encode())


def _private(st: os.stat_result) -> bool:
    """Owned by this process's user, and neither group nor others may use it."""
    return st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077


__all__ = ["PROOF_NAME", "holds", "leave"]
