"""SHA-1 of files and directories, as neurobank computes them, and hash-while-copy.

A file's hash is the SHA-1 of its bytes. A directory's hash follows neurobank's
rule (``nbank.util.hash_directory``): one line ``<relative/posix/path>=<file sha1>``
per regular file found below the directory (symbolic links to files count as the
file they point to, links to directories are not entered, directories themselves
contribute nothing), lines ordered by their path components and joined with
``"\\n"``, and the SHA-1 of that UTF-8 text.

:func:`copy_hashing` copies a stream while hashing it, so the source is read
exactly once; errors on either side are reported as :class:`SourceReadError` or
:class:`DestinationWriteError` so callers can tell a bad input from a bad archive.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import BinaryIO, Protocol

from nbankd.names import is_utf8

#: bytes per read when hashing or copying (large reads suit NFS and tape)
BLOCK_SIZE = 4 << 20
#: the least buffer :func:`copy_hashing` reads a file descriptor through: a file is
#: read through a buffer of its size + 1 (its bytes in one read, then the read that
#: finds its end), at least this and at most a block
SMALL_BUFFER = 64 << 10

#: called with the total number of bytes copied so far
Progress = Callable[[int], None]
#: called with the size of each block just copied; may sleep to limit the rate
Throttle = Callable[[int], None]


class SourceReadError(OSError):
    """Reading the source failed; ``errno`` and ``strerror`` are the original ones."""


class DestinationWriteError(OSError):
    """Writing the destination failed; ``errno`` and ``strerror`` are the original ones."""


class _Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Writable(Protocol):
    def write(self, data: memoryview, /) -> int | None: ...


Source = int | BinaryIO | _Readable
Destination = int | BinaryIO | _Writable


@dataclass(frozen=True)
class CopyResult:
    """What a hash-while-copy produced: the hex SHA-1 and the number of bytes."""

    sha1: str
    size: int


def _wrap(cls: type[OSError], err: OSError, what: str) -> OSError:
    """Returns ``err`` re-typed as ``cls``, keeping its errno and saying which side failed."""
    message = f"{err.strerror or err} while {what}"
    return cls(err.errno, message, err.filename) if err.filename else cls(err.errno, message)


def read_into(src: Source, view: memoryview) -> int:
    """Fills ``view`` from ``src``; read errors become :class:`SourceReadError`."""
    try:
        if isinstance(src, int):
            return os.readv(src, [view])
        n = src.readinto(view)  # type: ignore[union-attr]
        if n is None:  # non-blocking stream with no data: not supported
            raise BlockingIOError("source is non-blocking and has no data ready")
        return n
    except ValueError as err:  # a closed Python file object
        raise SourceReadError(errno.EBADF, f"source is not readable: {err}") from err
    except OSError as err:
        raise _wrap(SourceReadError, err, "reading the source") from err


def write_all(dst: Destination, view: memoryview) -> None:
    """Writes all of ``view``; write errors become :class:`DestinationWriteError`."""
    try:
        while view:
            if isinstance(dst, int):
                n = os.write(dst, view)
            else:
                written = dst.write(view)  # type: ignore[union-attr]
                n = len(view) if written is None else written
            view = view[n:]
    except ValueError as err:  # a closed Python file object
        raise DestinationWriteError(errno.EBADF, f"destination is not writable: {err}") from err
    except OSError as err:
        raise _wrap(DestinationWriteError, err, "writing the destination") from err


def _buffer_size(src: Source, block_size: int) -> int:
    """:func:`copy_hashing`'s buffer for ``src``: a file descriptor's size + 1, at least
    :data:`SMALL_BUFFER`, at most ``block_size``; ``block_size`` for a stream."""
    if not isinstance(src, int):
        return block_size
    try:
        size = os.fstat(src).st_size
    except OSError:
        return block_size  # the read says what is wrong
    return min(block_size, max(SMALL_BUFFER, size + 1))


def copy_hashing(
    src: Source,
    dst: Destination | None,
    *,
    block_size: int = BLOCK_SIZE,
    progress: Progress | None = None,
    throttle: Throttle | None = None,
    buffer: bytearray | None = None,
) -> CopyResult:
    """Copies ``src`` to ``dst`` from their current offsets to EOF, hashing in the same pass.

    ``src`` is a file descriptor or a binary object with ``readinto``; ``dst`` a file
    descriptor, an object with ``write``, or None to hash only. Each block is read
    once into one reused buffer. ``progress(total)`` is called after each block and
    ``throttle(nbytes)`` before the next read (it may sleep to limit the rate).
    ``buffer``, if given, is used instead of allocating one: ``block_size`` bytes for a
    stream, and for a file descriptor its file's size + 1, at least
    :data:`SMALL_BUFFER` (a 4 MiB block allocated and zeroed for each 4 KiB input was
    a tenth of a burst's CPU).
    Raises :class:`SourceReadError` or :class:`DestinationWriteError`; the
    destination is neither flushed nor synced here.
    """
    digest = hashlib.sha1()
    view = memoryview(buffer if buffer is not None else bytearray(_buffer_size(src, block_size)))
    total = 0
    while True:
        n = read_into(src, view)
        if n == 0:
            break
        chunk = view[:n]
        digest.update(chunk)
        if dst is not None:
            write_all(dst, chunk)
        total += n
        if progress is not None:
            progress(total)
        if throttle is not None:
            throttle(n)
    return CopyResult(digest.hexdigest(), total)


def sha1_stream(src: Source, *, throttle: Throttle | None = None) -> str:
    """Returns the SHA-1 of everything left to read in ``src``."""
    return copy_hashing(src, None, throttle=throttle).sha1


class NotRegularFile(OSError):
    """The path is a FIFO, socket or device: never read (a FIFO would wait forever for
    a writer, a tape device would rewind). ``filename`` is the path, ``strerror`` says
    what it is."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _refuse(path: str | os.PathLike[str], mode: int) -> NotRegularFile:
    what = _kind(mode)
    return NotRegularFile(
        errno.EINVAL, f"{what}, not a regular file or folder: not read", os.fspath(path)
    )


def sha1_file(path: str | os.PathLike[str], *, throttle: Throttle | None = None) -> str:
    """Returns the SHA-1 of the file at ``path`` (symbolic links are followed).

    Raises :class:`NotRegularFile` for a FIFO, socket or device, at once: it is
    checked before opening, and opening never waits (``O_NONBLOCK``), then checked
    again on the open descriptor (it may have been swapped meanwhile)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, mode)
        os.set_blocking(fd, True)
        return sha1_stream(fd, throttle=throttle)
    finally:
        os.close(fd)


class NameNotUtf8(OSError):
    """A member of a folder is named with bytes that are not UTF-8: neurobank's
    directory hash (a UTF-8 text of the members' paths) cannot cover it, so the folder
    has no hash. ``filename`` is the member's path (undecodable bytes kept as
    ``surrogateescape`` does), ``strerror`` says why."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(
            errno.EILSEQ,
            "named with bytes that are not UTF-8; no neurobank folder hash covers it",
            os.fspath(path),
        )


class DirectoryHasher:
    """Accumulates ``relpath -> file sha1`` pairs, in any order, into a directory hash."""

    def __init__(self) -> None:
        self._files: dict[PurePosixPath, str] = {}

    def add(self, relpath: str | PurePath, sha1: str) -> None:
        """Records one file; raises ValueError if ``relpath`` was already added."""
        key = PurePosixPath(relpath)
        if key in self._files:
            raise ValueError(f"'{key}' was added twice to a directory hash")
        self._files[key] = sha1

    def __len__(self) -> int:
        return len(self._files)

    def hexdigest(self) -> str:
        """Returns neurobank's directory hash of the files added so far."""
        ordered = sorted(self._files, key=lambda p: p.parts)
        text = "\n".join(f"{p}={self._files[p]}" for p in ordered)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _unlisted(err: OSError) -> None:
    """A folder of the tree that cannot be listed (no permission, a path past
    PATH_MAX) makes the hash fail: never a hash of part of the tree."""
    raise err


def directory_hash(path: str | os.PathLike[str], *, throttle: Throttle | None = None) -> str:
    """Returns neurobank's hash of the directory at ``path`` (see the module docstring).
    Raises :class:`NameNotUtf8` (an OSError) when a file below is named with bytes
    that are not UTF-8."""
    root = Path(path).resolve(strict=True)
    hasher = DirectoryHasher()
    for dirpath, _dirnames, filenames in os.walk(root, onerror=_unlisted, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):  # broken links, FIFOs, sockets, devices
                continue
            rel = PurePosixPath(Path(full).relative_to(root).as_posix())
            if not is_utf8(str(rel)):
                raise NameNotUtf8(full)  # before its bytes are read
            hasher.add(rel, sha1_file(full, throttle=throttle))
    return hasher.hexdigest()


def hash_path(path: str | os.PathLike[str], *, throttle: Throttle | None = None) -> str:
    """Returns the SHA-1 of a file, or neurobank's directory hash of a directory;
    :class:`NotRegularFile` for anything else (a FIFO, socket or device)."""
    if os.path.isdir(path):
        return directory_hash(path, throttle=throttle)
    return sha1_file(path, throttle=throttle)


__all__ = [
    "BLOCK_SIZE",
    "CopyResult",
    "DestinationWriteError",
    "DirectoryHasher",
    "NameNotUtf8",
    "NotRegularFile",
    "SourceReadError",
    "copy_hashing",
    "directory_hash",
    "hash_path",
    "sha1_file",
    "sha1_stream",
]
