"""Reading a small file a person names (the configuration, a credentials file, a
webhook's token, an archive's ``nbank.json``): links followed (unless the caller says
not to: a file in a folder others can write, such as a rejected input's ``.reason``),
but what the path names must be a regular file, opened without blocking (a FIFO or a
device would hang the reader or never end), checked again on the open descriptor, and
read up to a bound.

One primitive for every such file; each caller turns :class:`SmallFileError` into
its own message (a configuration problem with its file and line, a registry
credentials error, a failed alert send, a folder that is not an archive).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from nbankd.filekind import FileKind

__all__ = ["SmallFileError", "open_regular", "read_regular", "read_regular_at"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class SmallFileError(Exception):
    """Why a small file cannot be read: ``missing``, ``not-regular`` (``noun`` says what
    it is instead), ``too-large`` or ``unreadable`` (``strerror`` says why; ``errno``,
    as for ``missing``, is the OS error's number, 0 for the others)."""

    def __init__(self, reason: str, *, noun: str = "", strerror: str = "", errno: int = 0) -> None:
        super().__init__(reason, noun, strerror)
        self.reason = reason
        self.noun = noun
        self.strerror = strerror
        self.errno = errno


def _not_regular(mode: int) -> SmallFileError:
    kind = FileKind.of_mode(mode)
    noun = "a folder" if kind is FileKind.DIRECTORY else f"a {kind.noun}"
    return SmallFileError("not-regular", noun=noun)


def _unreadable(err: OSError) -> SmallFileError:
    why = err.strerror or str(err)
    if err.errno == errno.ENOENT:
        return SmallFileError("missing", strerror=why, errno=err.errno)
    return SmallFileError("unreadable", strerror=why, errno=err.errno or 0)


def open_regular(path: Path, *, follow: bool = True) -> tuple[int, os.stat_result]:
    """A descriptor on the regular file ``path`` names and its ``fstat``; the caller
    closes it. ``follow=False``: a link at ``path`` is refused (``not-regular``), never
    followed, even one put there between the two looks. Raises :class:`SmallFileError`."""
    try:
        before = os.stat(path, follow_symlinks=follow)  # what the path names
        if not stat.S_ISREG(before.st_mode):
            raise _not_regular(before.st_mode)
        fd = os.open(path, _FLAGS if follow else _FLAGS | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow:  # a link put there meanwhile
            raise SmallFileError("not-regular", noun="a symbolic link") from None
        raise _unreadable(err) from None
    return fd, _still_regular(fd)


def read_regular(path: Path, limit: int, *, follow: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path`` names (at most ``limit``) and its
    ``fstat`` (``follow``: as for :func:`open_regular`). Raises :class:`SmallFileError`
    (``too-large`` past ``limit``)."""
    fd, st = open_regular(path, follow=follow)
    return _read_all(fd, limit), st


def read_regular_at(dir_fd: int, name: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``name`` in the folder open as ``dir_fd`` (at most
    ``limit``) and its ``fstat``: opened relative to that descriptor, a link at ``name``
    never followed, without blocking. Raises :class:`SmallFileError` as
    :func:`read_regular` does."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):  # never opened: a FIFO, a device, a link
            raise _not_regular(before.st_mode)
        fd = os.open(name, _FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:  # a link put there meanwhile
            raise SmallFileError("not-regular", noun="a symbolic link") from None
        raise _unreadable(err) from None
    st = _still_regular(fd)
    return _read_all(fd, limit), st


def _still_regular(fd: int) -> os.stat_result:
    """``fstat`` of ``fd``, a regular file still (one swapped in between a look and the
    open is refused); ``fd`` is closed when it raises."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise _unreadable(err) from None
    if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
        os.close(fd)
        raise _not_regular(st.st_mode)
    return st


def _read_all(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fd``, closed after (``too-large`` past ``limit``)."""
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise _unreadable(err) from None
    finally:
        os.close(fd)
    if size > limit:
        raise SmallFileError("too-large")
    return b"".join(chunks)
