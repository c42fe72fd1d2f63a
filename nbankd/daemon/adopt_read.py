"""How ``nbankd --adopt-archives`` reads a stored resource, and says how far it got.

A resource is hashed only as it stands still: each file (of a folder resource too) is
fstat'ed before and after it is read, each folder before it is listed and once its
members are hashed (:func:`~nbankd.archive.verify.hash_folder`), and the path must
still name what was read; a change anywhere raises
:class:`~nbankd.archive.verify.ChangedWhileRead`, and :func:`stored_sha1` reads the
resource once more before giving up (a restore still writing the archive). Nothing
is followed: a link at the resource's path, or inside a folder resource, is never
read through, and a FIFO is never waited on.

:class:`Progress` is adoption's clock: called with each block hashed, it asks the
service manager for more start time and says in the log and in systemd's status
how far adoption got, every :data:`EXTEND_EVERY` seconds.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import structlog

from nbankd.archive.verify import ChangedWhileRead, hash_folder, unchanged
from nbankd.hashing import DirectoryHasher, NameNotUtf8, NotRegularFile, Throttle, sha1_stream
from nbankd.names import is_utf8

log = structlog.get_logger("nbankd.adopt")

#: seconds between two requests for more start time (and progress lines)
EXTEND_EVERY = 10.0
#: how many times a resource is read before one that keeps changing is given up
READS = 2

_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW


def _hash_open(fd: int, shown: str | PurePosixPath, tick: Throttle | None) -> str:
    """The SHA-1 of the regular file open at ``fd``, read from its start; raises
    :class:`NotRegularFile` for anything else, :class:`ChangedWhileRead` when it
    changed while read."""
    before = os.fstat(fd)
    if not stat.S_ISREG(before.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(before.st_mode) else "a socket or device"
        raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file or folder", str(shown))
    os.set_blocking(fd, True)
    os.lseek(fd, 0, os.SEEK_SET)
    digest = sha1_stream(fd, throttle=tick)
    if not unchanged(before, os.fstat(fd)):
        raise ChangedWhileRead(shown)
    return digest


def _read_once(path: Path, tick: Throttle | None) -> str:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise NotRegularFile(errno.ELOOP, "a symbolic link: not followed", os.fspath(path))
    if not stat.S_ISDIR(mode):
        fd = os.open(path, _OPEN)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISDIR(mode):
            digest = _hash_tree(fd, path, tick)
        else:
            digest = _hash_open(fd, os.fspath(path), tick)
        if not unchanged(os.fstat(fd), os.lstat(path)):  # replaced (renamed over) meanwhile
            raise ChangedWhileRead(path)
        return digest
    finally:
        os.close(fd)


def _hash_tree(top: int, path: Path, tick: Throttle | None) -> str:
    """neurobank's hash of the folder resource open at ``top`` (see module docstring)."""

    def member(dir_fd: int, name: str, rel: PurePosixPath) -> str:
        if not is_utf8(str(rel)):
            raise NameNotUtf8(path / rel)  # before its bytes are read
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
        try:
            return _hash_open(fd, path / rel, tick)
        finally:
            os.close(fd)

    hasher = DirectoryHasher()
    hash_folder(top, hasher, member, check=True)
    return hasher.hexdigest()


def stored_sha1(path: Path, tick: Throttle | None = None) -> str:
    """The SHA-1 of the stored resource at ``path`` (a folder's neurobank hash), read
    as it stands still (see the module docstring): :class:`ChangedWhileRead` when it
    changed during each of :data:`READS` reads; :class:`NotRegularFile` for a link,
    FIFO, socket or device at ``path``; :class:`NameNotUtf8` for a member of a folder
    no neurobank hash covers; OSError with ELOOP for a link inside a folder; other
    OSErrors as reading raised them."""
    for attempt in range(1, READS + 1):
        try:
            return _read_once(path, tick)
        except ChangedWhileRead as err:
            if attempt == READS:
                raise
            log.warning("changed while adoption read it; reading it again", path=err.filename)
    raise AssertionError("unreachable")


class Progress:
    """Adoption's clock (see the module docstring): the throttle of every hash, and
    told which entry is read (:meth:`entry`)."""

    def __init__(self, keep_alive: Callable[[str], object] | None) -> None:
        """``keep_alive(status)``: asks for more start time, ``status`` saying how far."""
        self._keep_alive = keep_alive
        self._next = time.monotonic() + EXTEND_EVERY
        self.archive = ""
        self.entries = 0  # entries of the archives gone through
        self.current = ""
        self.hashed = 0  # bytes

    def entry(self, archive: str, path: Path | str) -> None:
        """Says adoption now reads ``path`` of ``archive``."""
        self.archive = archive
        self.current = os.fsencode(path).decode("utf-8", "backslashreplace")
        self(0)

    def done(self) -> None:
        """Says the current entry was gone through."""
        self.entries += 1

    def start(self) -> None:
        """The first request for more start time, before anything is read."""
        if self._keep_alive is not None:
            self._keep_alive("adopting the archives")

    def __call__(self, n: int = 0) -> None:
        self.hashed += n
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + EXTEND_EVERY
        gib = self.hashed / (1 << 30)
        log.info(
            "adoption progress",
            archive=self.archive,
            entries_done=self.entries,
            current=self.current,
            bytes_hashed=self.hashed,
        )
        if self._keep_alive is not None:
            self._keep_alive(
                f"adopting archive {self.archive}: {self.entries} entries done, "
                f"{gib:.1f} GiB hashed, reading {self.current}"
            )


__all__ = ["EXTEND_EVERY", "READS", "Progress", "stored_sha1"]
