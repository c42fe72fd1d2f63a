"""Exports: resources written to a tar file, a zip file or a folder, as ``nbank export``
lays them out.

Each resource is stored under its stored name (``<id><ext>``) at the top of the
export, a folder resource as that folder and everything in it (member names
``NAME/relative/path``), in the order nbank writes them; ``manifest.json`` comes
last when asked for. Every resource is read once (:func:`~.reading.read_resource`)
while it is written, and kept only if it matches its registered SHA-1; otherwise
what was written of it is taken out again.

A tar or zip file is written under a temporary name beside ``OUT`` and published
without replacing anything once complete (:mod:`.placing`); in a folder export each
resource is published on its own the same way. The tar is written with
:meth:`tarfile.TarInfo.tobuf` block by block (PAX headers, as :mod:`tarfile` writes
them for nbank), so that taking a resource out is a truncation of our own file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Protocol

from nbankd import errors
from nbankd.transfer.placing import NewFile, NewTree, exists_error
from nbankd.transfer.reading import Advance, FileReader, Read, Visitor, check_sha1, read_resource

MANIFEST_NAME = "manifest.json"
#: the first and last times a zip (MS-DOS) timestamp can hold, as ZipInfo.date_time
_ZIP_FIRST = (1980, 1, 1, 0, 0, 0)
_ZIP_LAST = (2107, 12, 31, 23, 59, 58)
#: what tarfile and zipfile raise for a member they cannot encode (a field out of range)
_WRITER_ERRORS = (struct.error, OverflowError, ValueError, zipfile.LargeZipFile)
_ARCHIVE_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z")


def member_name(name: str, relpath: str) -> str:
    return f"{name}/{relpath}" if relpath else name


class Export(Protocol):
    """Where resources go: one :meth:`resource` visitor per resource, then
    :meth:`commit` or :meth:`abort` for it; :meth:`finish` publishes the whole."""

    out: Path

    def resource(self, name: str) -> Visitor: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def add_bytes(self, name: str, data: bytes) -> None: ...

    def finish(self) -> Path: ...

    def discard(self) -> None: ...


# --- tar ------------------------------------------------------------------------------


class TarExport:
    """A tar file written block by block under a temporary name beside ``out``."""

    def __init__(self, out: Path) -> None:
        if os.path.lexists(out):
            raise exists_error(out)
        self.out = out
        self.output = NewFile(out)
        self.offset = 0
        self._start = 0
        self._name = ""

    def _write(self, data: memoryview | bytes) -> None:
        self.output.write(data)
        self.offset += len(data)

    def _header(self, member: str, st: os.stat_result, kind: bytes, size: int) -> None:
        info = tarfile.TarInfo(member)
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.size = size
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self._write(bytes(tarfile.BLOCKSIZE - rest))

    def resource(self, name: str) -> Visitor:
        self._start, self._name = self.offset, name
        return self

    def directory(self, relpath: str, st: os.stat_result) -> None:
        self._header(member_name(self._name, relpath), st, tarfile.DIRTYPE, 0)

    def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
        self._header(member_name(self._name, relpath), st, tarfile.REGTYPE, st.st_size)
        reader.copy_to(self._write)
        self._pad(st.st_size)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        os.ftruncate(self.output.fd, self._start)
        os.lseek(self.output.fd, self._start, os.SEEK_SET)
        self.offset = self._start

    def add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.mode, info.mtime, info.size = 0o644, int(time.time()), len(data)
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._write(data)
        self._pad(len(data))

    def finish(self) -> Path:
        self._write(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
        rest = self.offset % tarfile.RECORDSIZE
        if rest:
            self._write(bytes(tarfile.RECORDSIZE - rest))
        return self.output.publish()

    def discard(self) -> None:
        self.output.discard()


# --- zip ------------------------------------------------------------------------------


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """``mtime`` as a zip member's local date and time, clamped to what a zip can hold
    (1980-01-01 to 2107-12-31 23:59:58): a file dated outside (a rig with a bad clock)
    is stored with the nearest time the zip format has."""
    try:
        t = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):  # beyond what the C library converts
        return _ZIP_LAST if mtime > 0 else _ZIP_FIRST
    stamp = (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    return min(max(stamp, _ZIP_FIRST), _ZIP_LAST)


class ZipExport:
    """A zip file written under a temporary name beside ``out``.

    zipfile cannot take members out: a resource that fails after some of its members
    were written is dropped by copying the members kept so far into a fresh zip (the
    source is not read again)."""

    def __init__(self, out: Path, *, compress: bool) -> None:
        if os.path.lexists(out):
            raise exists_error(out)
        self.out = out
        self.compression = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        self._open_new()
        self._keep = 0
        self._name = ""

    def _open_new(self) -> None:
        self.output = NewFile(self.out)
        self._fp = os.fdopen(os.dup(self.output.fd), "w+b")
        self.zf = zipfile.ZipFile(self._fp, "w", compression=self.compression)

    def _close_zip(self) -> None:
        self.zf.close()
        self._fp.close()

    def _info(self, member: str, st: os.stat_result) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(member, _zip_time(st.st_mtime))
        info.external_attr = (st.st_mode & 0xFFFF) << 16
        return info

    def resource(self, name: str) -> Visitor:
        self._keep, self._name = len(self.zf.infolist()), name
        return self

    def directory(self, relpath: str, st: os.stat_result) -> None:
        info = self._info(member_name(self._name, relpath) + "/", st)
        info.external_attr |= 0x10  # MS-DOS directory flag
        self.zf.writestr(info, b"")

    def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
        info = self._info(member_name(self._name, relpath), st)
        info.compress_type = self.compression
        info.file_size = st.st_size
        with self.zf.open(info, "w", force_zip64=True) as dest:
            reader.copy_to(dest.write)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        if len(self.zf.infolist()) == self._keep:
            return
        keep = self.zf.infolist()[: self._keep]
        self._close_zip()
        old_file = self.output
        old_zf = zipfile.ZipFile(old_file.tmp)
        try:
            self._open_new()
            for info in keep:
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.external_attr, copy.compress_type = info.external_attr, info.compress_type
                if info.is_dir():
                    self.zf.writestr(copy, b"")
                    continue
                copy.file_size = info.file_size
                with old_zf.open(info) as src, self.zf.open(copy, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        finally:
            old_zf.close()
            old_file.discard()

    def add_bytes(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, _zip_time(time.time()))
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.compress_type = self.compression
        self.zf.writestr(info, data)

    def finish(self) -> Path:
        self._close_zip()
        return self.output.publish()

    def discard(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._close_zip()
        self.output.discard()


# --- folder ---------------------------------------------------------------------------


class FolderExport:
    """A folder of resources, each written beside its target and published alone."""

    def __init__(self, out: Path) -> None:
        self.out = out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise errors.ArchiveError(
                f"cannot create the export folder '{out}': {err.strerror or err}",
                hint="check the path and its permissions",
            ) from err
        self._file: NewFile | None = None
        self._tree: NewTree | None = None
        self._mtime = 0

    def resource(self, name: str) -> Visitor:
        target = self.out / name
        if os.path.lexists(target):
            raise exists_error(target)
        self._target = target
        return self

    def directory(self, relpath: str, st: os.stat_result) -> None:
        if not relpath:
            self._tree = NewTree(self._target)
        else:
            assert self._tree is not None
            self._tree.mkdir(relpath)
        self._tree.note_dir(relpath, st.st_mtime_ns)

    def file(self, relpath: str, st: os.stat_result, reader: FileReader) -> None:
        if self._tree is None:
            self._file = NewFile(self._target)
            self._mtime = st.st_mtime_ns
            reader.copy_to(self._file.write)
            return
        new = NewFile(self._tree.path(relpath))
        try:
            reader.copy_to(new.write)
            new.publish(mtime_ns=st.st_mtime_ns)
        finally:
            new.discard()

    def commit(self) -> None:
        if self._file is not None:
            self._file.publish(mtime_ns=self._mtime)
        elif self._tree is not None:
            self._tree.publish()
        self._file = self._tree = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
        if self._tree is not None:
            self._tree.discard()
        self._file = self._tree = None

    def add_bytes(self, name: str, data: bytes) -> None:
        new = NewFile(self.out / name)
        try:
            new.write(data)
            new.publish()
        finally:
            new.discard()

    def finish(self) -> Path:
        return self.out

    def discard(self) -> None:
        self.abort()


def check_out(out: Path, *, compress: bool = False) -> None:
    """Raises UsageError for an OUT no export can be written to, and ResourceExists
    for a tar or zip file that exists already (nothing is ever replaced)."""
    suffix = out.suffix.lower()
    if suffix in _ARCHIVE_SUFFIXES:
        raise errors.UsageError(
            f"cannot export to a '{suffix}' file ({out})",
            hint="give a .tar or .zip file, or a folder",
        )
    if compress and suffix != ".zip":
        raise errors.UsageError(
            f"--compress applies to zip files only, not {out}", hint="name OUT *.zip"
        )
    if suffix in (".tar", ".zip") and os.path.lexists(out):
        raise exists_error(out)


def open_export(out: Path, *, compress: bool = False) -> Export:
    """A tar export (``.tar``), a zip export (``.zip``), or else a folder export."""
    check_out(out, compress=compress)
    suffix = out.suffix.lower()
    if suffix == ".tar":
        return TarExport(out)
    if suffix == ".zip":
        return ZipExport(out, compress=compress)
    return FolderExport(out)


def write_resource(
    export: Export, path: Path, registered: str | None, *, advance: Advance | None = None
) -> Read:
    """Writes the stored resource at ``path`` into ``export`` under its stored name.

    The resource is read once and checked against ``registered``; if it cannot be
    read or does not match, what was written of it is taken out and the error raised
    (ArchiveError naming it when the tar or zip writer cannot encode one of its
    members).
    """
    visitor = export.resource(path.name)
    try:
        read = read_resource(path, visitor, advance=advance)
        check_sha1(read.sha1, registered, str(path))
        export.commit()
    except _WRITER_ERRORS as err:  # a member the tar or zip writer cannot encode
        export.abort()
        raise errors.ArchiveError(
            f"cannot write '{path}' into {export.out}: {err}",
            hint="the other resources are exported; export this one to a folder instead",
        ) from err
    except BaseException:
        export.abort()
        raise
    return read


__all__ = [
    "MANIFEST_NAME",
    "Export",
    "FolderExport",
    "TarExport",
    "ZipExport",
    "check_out",
    "member_name",
    "open_export",
    "write_resource",
]
