"""Reading one stored resource exactly once, hashing it while it is consumed.

:func:`read_resource` opens a stored file, or walks a stored folder, without ever
following a symbolic link (``O_NOFOLLOW`` on every open, each folder entered through
its parent's descriptor), and hands each entry to a :class:`Visitor` in the order
``nbank export`` writes them: a folder before its contents, names sorted. The visitor
copies each file from its :class:`FileReader`, which hashes the bytes as they pass;
the result is the resource's SHA-1 (neurobank's directory hash for a folder), to
compare with the registry before the copy is kept. Links, FIFOs, sockets and devices
inside a resource are refused (:func:`~nbankd.archive.staging.unsafe_input`), as
nbank's export refuses them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from nbankd import errors
from nbankd.archive.staging import unsafe_input
from nbankd.filekind import FileKind
from nbankd.hashing import BLOCK_SIZE, DirectoryHasher, SourceReadError, read_into

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: writes one block of a file being copied (a memoryview valid only during the call)
Write = Callable[[memoryview], object]
#: called with the number of bytes of each block just read (a progress bar)
Advance = Callable[[int], object]


class Mismatch(errors.ProblemsFound):
    """What was read does not have the registered SHA-1."""

    code = "mismatch"


def check_sha1(digest: str, registered: str | None, shown: str) -> bool:
    """True if ``digest`` matches ``registered``, False if nothing is registered.

    Raises :class:`Mismatch` naming ``shown`` otherwise."""
    if registered is None:
        return False
    if digest != registered.lower():
        raise Mismatch(
            f"{shown}: SHA-1 {digest} does not match the registered {registered.lower()}",
            hint="the stored copy is damaged; check the archive (nbankctl archive check)",
        )
    return True


class FileReader:
    """One file of a resource, opened without following links; hashes what it copies.

    ``size`` is the size found when it was opened: a file that ends earlier or goes
    on longer is changing under us and raises :class:`~nbankd.errors.InputChanged`.
    """

    def __init__(
        self, fd: int, size: int, shown: str, buffer: bytearray, advance: Advance | None = None
    ) -> None:
        self.fd, self.size, self.shown = fd, size, shown
        self.advance = advance
        self.done = 0
        self._digest = hashlib.sha1()
        self._buffer = buffer

    def copy_to(self, write: Write | None) -> None:
        """Reads the whole file once, passing each block to ``write`` (None: hash only)
        and its size to ``advance``."""
        view = memoryview(self._buffer)
        while self.done < self.size:
            n = read_into(self.fd, view[: min(len(view), self.size - self.done)])
            if n == 0:
                raise errors.InputChanged(f"'{self.shown}' got shorter while it was read")
            chunk = view[:n]
            self._digest.update(chunk)
            if write is not None:
                write(chunk)
            self.done += n
            if self.advance is not None:
                self.advance(n)
        if read_into(self.fd, view[:1]):
            raise errors.InputChanged(f"'{self.shown}' grew while it was read")

    def hexdigest(self) -> str:
        if self.done != self.size:
            raise RuntimeError(f"'{self.shown}' was not read to its end")
        return self._digest.hexdigest()


class Visitor(Protocol):
    """Receives a resource's entries; ``relpath`` is "" for the resource itself."""

    def directory(self, relpath: str, st: os.stat_result) -> None: ...

    def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
        """Must consume the file with ``reader.copy_to``."""
        ...


class HashOnly:
    """A visitor that only reads and hashes (a dry run)."""

    def directory(self, relpath: str, st: os.stat_result) -> None:
        pass

    def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
        reader.copy_to(None)


@dataclass(frozen=True)
class Read:
    """What reading a resource found: its SHA-1, its bytes, whether it is a folder."""

    sha1: str
    size: int
    is_dir: bool


def _kind_error(st: os.stat_result, shown: str) -> errors.NbankdError:
    kind = FileKind.of(st)
    return unsafe_input(shown, f"a {kind.noun}")


def _read_file(
    fd: int,
    st: os.stat_result,
    shown: str,
    visitor: Visitor,
    relpath: str,
    buf: bytearray,
    advance: Advance | None,
) -> str:
    reader = FileReader(fd, st.st_size, shown, buf, advance)
    visitor.file(relpath, st, reader)
    return reader.hexdigest()


def _open_at(name: str, dir_fd: int | None, flags: int, shown: str) -> tuple[int, os.stat_result]:
    """Opens ``name`` without following a link; returns its descriptor and fstat."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise unsafe_input(shown, "a symbolic link") from None
        raise SourceReadError(err.errno, err.strerror, shown) from err
    return fd, os.fstat(fd)


def read_resource(
    path: Path, visitor: Visitor | None = None, *, advance: Advance | None = None
) -> Read:
    """Reads the stored file or folder at ``path`` once, through ``visitor``;
    ``advance(n)`` is called after each block read.

    Returns its SHA-1 (neurobank's directory hash for a folder) and size. Raises
    :class:`~nbankd.hashing.SourceReadError` when it cannot be read, the
    :func:`~nbankd.archive.staging.unsafe_input` error for a link or special file,
    and :class:`~nbankd.errors.InputChanged` for a file changing while it is read.
    """
    visit: Visitor = visitor if visitor is not None else HashOnly()
    buf = bytearray(BLOCK_SIZE)
    shown = str(path)
    try:
        st = os.lstat(path)
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, shown) from err
    if stat.S_ISREG(st.st_mode):
        fd, fst = _open_at(shown, None, _OPEN_FILE, shown)
        try:
            if not stat.S_ISREG(fst.st_mode):
                raise _kind_error(fst, shown)
            return Read(_read_file(fd, fst, shown, visit, "", buf, advance), fst.st_size, False)
        finally:
            os.close(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise _kind_error(st, shown)
    fd, fst = _open_at(shown, None, _OPEN_DIR, shown)
    hasher = DirectoryHasher()
    total = [0]

    def walk(dir_fd: int, rel: PurePosixPath) -> None:
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError as err:
            raise SourceReadError(err.errno, err.strerror, f"{path}/{rel}") from err
        for name in names:
            child = rel / name
            child_shown = f"{path}/{child}"
            try:
                cst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as err:
                raise SourceReadError(err.errno, err.strerror, child_shown) from err
            if stat.S_ISDIR(cst.st_mode):
                cfd, cfst = _open_at(name, dir_fd, _OPEN_DIR, child_shown)
                try:
                    visit.directory(str(child), cfst)
                    walk(cfd, child)
                finally:
                    os.close(cfd)
            elif stat.S_ISREG(cst.st_mode):
                cfd, cfst = _open_at(name, dir_fd, _OPEN_FILE, child_shown)
                try:
                    if not stat.S_ISREG(cfst.st_mode):
                        raise _kind_error(cfst, child_shown)
                    digest = _read_file(cfd, cfst, child_shown, visit, str(child), buf, advance)
                    hasher.add(child, digest)
                    total[0] += cfst.st_size
                finally:
                    os.close(cfd)
            else:
                raise _kind_error(cst, child_shown)

    try:
        visit.directory("", fst)
        walk(fd, PurePosixPath())
    finally:
        os.close(fd)
    return Read(hasher.hexdigest(), total[0], True)


__all__ = [
    "Advance",
    "FileReader",
    "HashOnly",
    "Mismatch",
    "Read",
    "Visitor",
    "check_sha1",
    "read_resource",
]
