"""A folder as a canonical zip: bytes that depend only on its (path, contents) pairs.

The format is neurobank 0.13's (``nbank.canonical_zip``), so a folder gives the
same zip, and the same SHA-1, whichever tool zips it:

- one member per regular file below the folder, none for folders (an empty folder
  gives an empty zip), named by its relative path with ``/`` separators in UTF-8,
  and ordered by those bytes;
- every member stored (no compression), dated 1980-01-01 00:00:00, with
  attributes ``-rw-r--r--`` made on Unix, no extra field except ZIP64's, no
  comment; the general-purpose flags carry only the UTF-8 bit, for names that are
  not ASCII;
- ZIP64 records only where a size, an offset or the number of members needs them.

The folder is walked from a directory descriptor without following links: a
symbolic link, FIFO, socket or device anywhere below it (and, unless allowed, a
file with several hard links) is refused, naming it. The zip is written to a
temporary file in the destination folder, fsynced, then given its name without
replacing anything, and the folder's entry fsynced: nothing partial ever has the
final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.archive.fsops import DIR_NOFOLLOW, publish_temp
from nbankd.filekind import FileKind
from nbankd.hashing import BLOCK_SIZE, SourceReadError, sha1_stream, write_all
from nbankd.transfer.placing import NAME_MAX, name_head
from nbankd.watch import writers

#: sizes and offsets from this on are written in ZIP64 records
ZIP64_LIMIT = 0xFFFFFFFF
#: member counts from this on are written in ZIP64 records
ZIP64_COUNT_LIMIT = 0xFFFF

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")
_END64 = struct.Struct("<4sQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<4sIQI")
_UTF8_FLAG = 1 << 11
_DOS_DATE = (1 << 5) | 1  # 1980-01-01; the time is 00:00:00 (0)
_ATTRIBUTES = 0o100644 << 16  # a regular file, rw-r--r--, in the high half
_MADE_ON_UNIX = 3 << 8
_DIR_FLAGS = DIR_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_TEMP_SUFFIX = ".partial"


@dataclass(frozen=True)
class ZippedFolder:
    """A complete, fsynced canonical zip: where it is, its SHA-1 and its size in bytes."""

    path: Path
    sha1: str
    size: int


@dataclass(frozen=True)
class Member:
    """One file of the folder: its name in the zip, where it is, and what the walk saw."""

    name: bytes  # the relative path, '/'-separated, UTF-8
    parts: tuple[str, ...]  # the path's components, as the file system gives them
    dev: int
    ino: int
    size: int


@dataclass(frozen=True)
class Written:
    """What the central directory needs of a member already written."""

    name: bytes
    crc: int
    size: int
    offset: int


def zip_folder(
    src: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    name: str,
    *,
    hard_links: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ZippedFolder:
    """Writes the folder ``src`` as a canonical zip named ``name`` in ``dest_dir``.

    ``hard_links``: accept files with several names (nbank does; the daemon does not).
    ``progress`` is called with the number of bytes of files zipped so far.

    Raises :class:`~nbankd.errors.UnsafeInput` for a link, FIFO, socket or device
    below ``src`` (or ``src`` itself a link), or a name that cannot be a member (not
    UTF-8, or holding a backslash); :class:`~nbankd.errors.InputChanged` if a file
    changes while it is zipped; :class:`~nbankd.hashing.SourceReadError` when the
    folder cannot be read; FileExistsError if ``dest_dir/name`` exists; other
    OSErrors from writing ``dest_dir``. Nothing is left in ``dest_dir`` on error.
    """
    src = Path(src)
    dest = Path(dest_dir)
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a file name for the zip")
    if Path(os.path.realpath(dest)).is_relative_to(os.path.realpath(src)):
        raise ValueError(f"the zip of '{src}' cannot be written inside it ('{dest}')")
    top = _open_dir(str(src), None, src)
    try:
        members = sorted(_walk(top, src, hard_links=hard_links), key=lambda m: m.name)
        dfd = os.open(dest, _DIR_FLAGS)
        try:
            return _write(top, src, members, dfd, dest, name, progress)
        finally:
            os.close(dfd)
    finally:
        os.close(top)


def _open_dir(name: str, dir_fd: int | None, shown: Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(shown, "not a folder (a symbolic link?)") from None
        raise SourceReadError(err.errno, err.strerror, str(shown)) from err


def _unsafe(path: Path, what: str) -> errors.UnsafeInput:
    return errors.UnsafeInput(
        f"'{path}' is {what}; a folder is zipped only of regular files and folders",
        hint="replace it with a regular file or remove it, then deposit the folder again",
    )


def _member_name(parts: tuple[str, ...], shown: Path) -> bytes:
    try:
        text = "/".join(parts)
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise _unsafe(shown, "named with bytes that are not UTF-8") from None
    if "\\" in text:
        raise _unsafe(shown, "named with a backslash, which zip readers take for a separator")
    return encoded


def _walk(top: int, src: Path, *, hard_links: bool) -> Iterator[Member]:
    """The regular files below the open folder ``top``, in no particular order. Walked
    without recursion, one open folder per level, at most
    :data:`~nbankd.watch.writers.MAX_DEPTH` levels below the top (as a copied folder
    input: a deeper one is refused, never retried for ever)."""
    # (open folder, its path as shown, its parts below the top); the top is the caller's
    levels: list[tuple[int, Path, tuple[str, ...], list[str]]] = [(top, src, (), _listed(top, src))]
    try:
        while levels:
            dfd, shown, rel, names = levels[-1]
            if not names:
                levels.pop()
                if dfd != top:
                    os.close(dfd)
                continue
            entry = names.pop()
            path = shown / entry
            try:
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            except OSError as err:
                raise SourceReadError(err.errno, err.strerror, str(path)) from err
            kind = FileKind.of(st)
            if kind is FileKind.DIRECTORY:
                if len(levels) > writers.MAX_DEPTH:
                    raise _unsafe(
                        path,
                        f"nested more than {writers.MAX_DEPTH} folders deep (flatten it, then "
                        "deposit it again)",
                    )
                child = _open_dir(entry, dfd, path)
                try:
                    levels.append((child, path, (*rel, entry), _listed(child, path)))
                except BaseException:
                    os.close(child)
                    raise
            elif kind is FileKind.FILE or (kind is FileKind.HARDLINK and hard_links):
                parts = (*rel, entry)
                yield Member(_member_name(parts, path), parts, st.st_dev, st.st_ino, st.st_size)
            elif kind is FileKind.HARDLINK:
                raise _unsafe(path, f"a hard link ({st.st_nlink} names)")
            elif kind is FileKind.SYMLINK:
                raise _unsafe(path, "a symbolic link")
            else:
                raise _unsafe(path, "a FIFO, socket or device")
    finally:
        for dfd, _shown, _rel, _names in levels:
            if dfd != top:
                os.close(dfd)


def _listed(dfd: int, shown: Path) -> list[str]:
    try:
        return os.listdir(dfd)
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, str(shown)) from err


def _open_member(top: int, src: Path, member: Member) -> int:
    """Opens a member by walking from the folder's descriptor, never following links;
    the file must still be the one the walk saw."""
    shown = src.joinpath(*member.parts)
    opened: list[int] = []
    try:
        dfd = top
        for part in member.parts[:-1]:
            dfd = _open_dir(part, dfd, shown)
            opened.append(dfd)
        try:
            fd = os.open(member.parts[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _unsafe(shown, "a symbolic link") from None
            raise SourceReadError(err.errno, err.strerror, str(shown)) from err
    finally:
        for fd_ in opened:
            os.close(fd_)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino, st.st_size) != (member.dev, member.ino, member.size):
        os.close(fd)
        raise errors.InputChanged(f"'{shown}' changed while its folder was being zipped")
    try:
        writers.refuse_if_open_for_writing(fd, shown)
    except errors.NbankdError:
        os.close(fd)
        raise
    return fd


def local_header(name: bytes, crc: int, size: int) -> bytes:
    """A member's local header, name and ZIP64 extra field (if its size needs one)."""
    zip64 = size >= ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    field = ZIP64_LIMIT if zip64 else size
    flags = 0 if name.isascii() else _UTF8_FLAG
    version = 45 if zip64 else 20
    head = _LOCAL.pack(
        b"PK\x03\x04", version, flags, 0, 0, _DOS_DATE, crc, field, field, len(name), len(extra)
    )
    return head + name + extra


def central_directory(members: Iterable[Written], start: int) -> bytes:
    """The central directory of ``members``, written from offset ``start``, with the
    end records (ZIP64 ones where the count, size or offset needs them)."""
    parts: list[bytes] = []
    count = 0
    for m in members:
        count += 1
        big, far = m.size >= ZIP64_LIMIT, m.offset >= ZIP64_LIMIT
        values = ([m.size, m.size] if big else []) + ([m.offset] if far else [])
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        version = 45 if values else 20
        field = ZIP64_LIMIT if big else m.size
        flags = 0 if m.name.isascii() else _UTF8_FLAG
        offset = ZIP64_LIMIT if far else m.offset
        head = (b"PK\x01\x02", _MADE_ON_UNIX | version, version, flags, 0, 0, _DOS_DATE)
        tail = (m.crc, field, field, len(m.name), len(extra), 0, 0, 0, _ATTRIBUTES, offset)
        parts += [_CENTRAL.pack(*head, *tail), m.name, extra]
    body = b"".join(parts)
    end = start + len(body)
    many, large, late = count >= ZIP64_COUNT_LIMIT, len(body) >= ZIP64_LIMIT, start >= ZIP64_LIMIT
    records = [body]
    if many or large or late:
        records.append(
            _END64.pack(
                b"PK\x06\x06",
                _END64.size - 12,
                _MADE_ON_UNIX | 45,
                45,
                0,
                0,
                count,
                count,
                len(body),
                start,
            )
        )
        records.append(_LOCATOR64.pack(b"PK\x06\x07", 0, end, 1))
    shown_count = ZIP64_COUNT_LIMIT if many else count
    records.append(
        _END.pack(
            b"PK\x05\x06",
            0,
            0,
            shown_count,
            shown_count,
            ZIP64_LIMIT if large else len(body),
            ZIP64_LIMIT if late else start,
            0,
        )
    )
    return b"".join(records)


def _copy_member(
    src_fd: int, out: int, buffer: bytearray, shown: Path, report: Callable[[int], None]
) -> tuple[int, int]:
    """Copies a member's bytes to ``out``, calling ``report`` with the bytes copied so
    far after each block; returns (CRC-32, bytes copied)."""
    crc = copied = 0
    view = memoryview(buffer)
    while True:
        try:
            n = os.readv(src_fd, [buffer])
        except OSError as err:
            raise SourceReadError(err.errno, err.strerror, str(shown)) from err
        if n == 0:
            return crc, copied
        crc = zlib.crc32(view[:n], crc)
        write_all(out, view[:n])
        copied += n
        report(copied)


def _temp_name(name: str) -> str:
    """``NAME.partial``, the zip's name while it is written: the same for the same
    ``name`` (an interrupted attempt's is found again), and fitting in
    :data:`~nbankd.transfer.placing.NAME_MAX` bytes wherever ``name`` does: NAME is
    cut by its encoded bytes (never inside a character) and tagged with a digest of
    the whole name, so two long names sharing a start never share a temporary."""
    temp = f"{name}{_TEMP_SUFFIX}"
    if len(os.fsencode(temp)) <= NAME_MAX:
        return temp
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    head = name_head(name, NAME_MAX - len(_TEMP_SUFFIX) - 1 - len(digest))
    return f"{head}~{digest}{_TEMP_SUFFIX}"


def _write(
    top: int,
    src: Path,
    members: list[Member],
    dfd: int,
    dest: Path,
    name: str,
    progress: Callable[[int], None] | None,
) -> ZippedFolder:
    temp = _temp_name(name)
    try:
        out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except FileExistsError:  # left by an interrupted attempt with this name
        os.unlink(temp, dir_fd=dfd)
        out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        try:
            written: list[Written] = []
            buffer = bytearray(BLOCK_SIZE)
            done = 0
            for member in members:
                shown = src.joinpath(*member.parts)
                offset = os.lseek(out, 0, os.SEEK_CUR)
                write_all(out, memoryview(local_header(member.name, 0, member.size)))
                fd = _open_member(top, src, member)

                def report(copied: int, before: int = done) -> None:
                    if progress is not None:
                        progress(before + copied)

                try:
                    crc, copied = _copy_member(fd, out, buffer, shown, report)
                finally:
                    os.close(fd)
                if copied != member.size:
                    raise errors.InputChanged(
                        f"'{shown}' changed size while its folder was being zipped"
                    )
                end = os.lseek(out, 0, os.SEEK_CUR)
                os.pwrite(out, local_header(member.name, crc, member.size), offset)
                os.lseek(out, end, os.SEEK_SET)
                written.append(Written(member.name, crc, member.size, offset))
                done += copied
            start = os.lseek(out, 0, os.SEEK_CUR)
            write_all(out, memoryview(central_directory(written, start)))
            os.fsync(out)
            os.lseek(out, 0, os.SEEK_SET)
            sha1 = sha1_stream(out)
            size = os.fstat(out).st_size
        finally:
            os.close(out)
        publish_temp(temp, name, replace=False, dir_fd=dfd)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dfd)
        raise FileExistsError(
            errno.EEXIST, f"'{dest / name}' exists already; the zip is never written over it"
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dfd)
        raise
    return ZippedFolder(dest / name, sha1, size)


__all__ = ["ZIP64_COUNT_LIMIT", "ZIP64_LIMIT", "ZippedFolder", "zip_folder"]
