"""A proof that an inbox's work folder is the one this daemon made, for filesystems
that number folders anew (SSHFS: at every mount, and whenever the kernel forgets one).

The work folder (``.nbank``) is recognised by the (device, inode) recorded at start.
After the inbox's SSHFS mount is taken away and back, the folder looks replaced, and
deposits would wait for a reload. At start the daemon therefore also leaves a random
token in ``.nbank/.nbankd-proof`` (mode 0600, in a folder only the daemon's user may
enter or write; kept across restarts). When the numbers differ, the folder is still
accepted if it holds that file with that token: a writer of the inbox can neither
read the token nor move the file out of ``.nbank`` into a folder of their own, so
only the daemon's own folder can show it. A remount is told from a replacement that
way, without trusting anything the kernel reports.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import re
import secrets
import stat

PROOF_NAME = ".nbankd-proof"
TEMP_NAME = PROOF_NAME + ".new"  # each writer's: TEMP_NAME-<random>
_MAX = 256  # bytes of a token file read back: a token is 64 hex digits
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TOKEN = re.compile(rb"[0-9a-f]{64}")


def leave(folder: int) -> str:
    """The token of the open folder ``folder``: the one it holds already (kept across
    restarts, so a full filesystem does not matter), else a new one written there.
    The folder must be private to this user (the caller checked it)."""
    found = _read(folder)
    if found is not None and _TOKEN.fullmatch(found):
        return found.decode()
    token = secrets.token_hex(32)
    # a name of this writer's own: two daemons started on one inbox never remove or
    # rename each other's half-written token
    temp = f"{TEMP_NAME}-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=folder)
    try:
        try:
            if os.write(fd, token.encode()) != len(token):
                raise OSError(errno.ENOSPC, "short write of the work folder's token")
        finally:
            os.close(fd)
        os.rename(temp, PROOF_NAME, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=folder)  # no half-written token left behind
        raise
    found = _read(folder)  # another daemon's token, when its rename came after this one
    return found.decode() if found is not None and _TOKEN.fullmatch(found) else token


def holds(folder: int, token: str) -> bool:
    """True when the open folder ``folder`` is private to this user and holds this
    token in a regular file of its own (never through a link)."""
    found = _read(folder)
    return found is not None and hmac.compare_digest(found, token.encode())


def _read(folder: int) -> bytes | None:
    """The bytes of the folder's token file, or None unless the folder and the file are
    private to this user and the file is a regular one (never through a link)."""
    try:
        if not _private(os.fstat(folder)):
            return None
        fd = os.open(PROOF_NAME, _READ, dir_fd=folder)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_size > _MAX:
            return None
        return os.read(fd, _MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _private(st: os.stat_result) -> bool:
    """Owned by this process's user, and neither group nor others may use it."""
    return st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077


__all__ = ["PROOF_NAME", "TEMP_NAME", "holds", "leave"]
