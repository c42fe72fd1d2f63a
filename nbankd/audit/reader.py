"""Reading stored resources for an audit: SHA-1 without changing anything, at a capped rate.

Files are opened read-only with ``O_NOATIME`` where the kernel allows it (the
owner, which nbankd's service user is, or root), so an audit does not even
update access times; symbolic links at the top of a resource are never followed.
``posix_fadvise(DONTNEED)`` before the read makes a scrub read the storage, not
the page cache, and after it keeps an audit from evicting what deposits need.
Folders are listed the same way (:func:`list_dir`), so their atime stays put too.
Folder resources get neurobank's directory hash (:class:`~nbankd.hashing.DirectoryHasher`).

:class:`RateLimiter` caps the aggregate read rate of every hashing thread. Each
block is booked on the limiter *before* it is read, so many threads starting at
once do not overshoot the cap by a block each.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Protocol

from nbankd import seams
from nbankd.hashing import BLOCK_SIZE, DirectoryHasher, NameNotUtf8
from nbankd.names import is_utf8

_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # never wait on a FIFO
_NOATIME = getattr(os, "O_NOATIME", 0)


class Cancelled(Exception):
    """The audit was asked to stop while reading."""


class Stopping(Protocol):
    """What says whether to stop: a ``threading.Event``, or the audit's halt."""

    def is_set(self) -> bool: ...


class RateLimiter:
    """Spaces reads so that all callers together stay under ``bytes_per_s`` (None: no cap).

    Thread-safe. Each call books ``n`` bytes on a shared timeline and sleeps until
    its slot; up to ``burst`` seconds of unused rate may be caught up at once.
    """

    def __init__(
        self,
        bytes_per_s: float | None,
        *,
        burst: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.rate = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._next = clock()
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = self._clock()
            self._next = max(self._next, now - self.burst) + n / self.rate
            wait = self._next - now
        if wait > 0:
            self._sleep(wait)


_buffers = threading.local()


def _buffer() -> bytearray:
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(BLOCK_SIZE)
    return buf


def _open(path: str, *, follow: bool, flags: int = _OPEN) -> int:
    flags |= 0 if follow else os.O_NOFOLLOW
    if _NOATIME:
        try:
            return os.open(path, flags | _NOATIME)
        except PermissionError:
            pass  # O_NOATIME needs the owner or CAP_FOWNER: read like anyone else
    return os.open(path, flags)


def _advise(fd: int, advice: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, advice)


def sha1_of_file(
    path: str | os.PathLike[str], throttle: Callable[[int], None], *, follow: bool = False
) -> tuple[str, int]:
    """(SHA-1, bytes read) of one file, read from storage without touching its atime.

    ``throttle(n)`` is called before each block with the bytes about to be read
    (it may sleep to keep the rate, or raise to stop)."""
    fd = _open(os.fspath(path), follow=follow)
    try:
        _advise(fd, os.POSIX_FADV_DONTNEED)
        _advise(fd, os.POSIX_FADV_SEQUENTIAL)
        size = os.fstat(fd).st_size
        digest = hashlib.sha1()
        view = memoryview(_buffer())
        total = 0
        while True:
            booked = min(len(view), max(size - total, 0))
            if booked:
                throttle(booked)
            n = os.readv(fd, [view])
            if n == 0:
                break
            if n > booked:  # grew since fstat: book the difference after the fact
                throttle(n - booked)
            digest.update(view[:n])
            if total == 0:
                seams.audit_pause("reading")
            total += n
        _advise(fd, os.POSIX_FADV_DONTNEED)
        return digest.hexdigest(), total
    finally:
        os.close(fd)


DIR, FILE, LINK, OTHER = "dir", "file", "link", "other"


def list_dir(path: str | os.PathLike[str], *, follow: bool = True) -> list[tuple[str, str]]:
    """(name, kind) of each entry of a folder (kind: dir, file, link or other), listed
    through a descriptor opened with ``O_NOATIME`` so the folder's atime stays put.
    ``follow=False``: a symbolic link in place of the folder is an error (ELOOP), not
    listed through."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = _open(os.fspath(path), follow=follow, flags=flags)
    try:
        with os.scandir(fd) as it:
            return [(e.name, _kind(e)) for e in it]
    finally:
        os.close(fd)


def _kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return LINK
    if entry.is_dir(follow_symlinks=False):
        return DIR
    if entry.is_file(follow_symlinks=False):
        return FILE
    return OTHER


def sha1_of_resource(
    path: Path, throttle: Callable[[int], None], *, is_dir: bool
) -> tuple[str, int]:
    """(SHA-1, bytes read) of a stored file, or neurobank's hash of a stored folder.

    Inside a folder, symbolic links to files count as the file (as neurobank's hash
    has it) and links to folders are not entered. Raises OSError as reading fails:
    :class:`~nbankd.hashing.NameNotUtf8` for a file named with bytes that are not UTF-8
    (no neurobank hash covers the folder), before any byte of it is read.
    """
    if not is_dir:
        return sha1_of_file(path, throttle)
    hasher = DirectoryHasher()
    total = 0
    pending = [path]
    while pending:
        folder = pending.pop()
        for name, kind in list_dir(folder):
            full = folder / name
            if kind == DIR:
                pending.append(full)
                continue
            if kind == OTHER or (kind == LINK and not os.path.isfile(full)):
                continue  # FIFOs, sockets, devices, broken links, links to folders
            rel = full.relative_to(path).as_posix()
            if not is_utf8(rel):
                raise NameNotUtf8(full)
            sha1, n = sha1_of_file(full, throttle, follow=kind == LINK)
            hasher.add(PurePosixPath(rel), sha1)
            total += n
    return hasher.hexdigest(), total


def vanished(err: OSError) -> bool:
    """True if the error says the path is gone (pruned during the audit), not unreadable."""
    return err.errno in (errno.ENOENT, errno.ENOTDIR)


__all__ = [
    "DIR",
    "FILE",
    "LINK",
    "OTHER",
    "Cancelled",
    "RateLimiter",
    "list_dir",
    "sha1_of_file",
    "sha1_of_resource",
    "vanished",
]
