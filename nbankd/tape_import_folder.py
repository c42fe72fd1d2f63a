"""Importing one folder resource from a tar file, for :mod:`nbankd.tape_import`.

A folder resource comes in a tar as a folder member whose stem is the identifier,
followed directly by the members below it (``<name>/...``), as ``nbank export`` and
``nbankctl export`` write them. :func:`import_folder` reads exactly those members
from the stream, once, and stops at the first member outside the folder (handed
back for the caller to read next).

Each member below the folder is checked like a top-level member
(:func:`~nbankd.tape.member_problem`: no absolute path, no ``..``, no link,
device or FIFO, not bigger than ``--max-size``), and more: its path must lie
strictly inside the folder, appear once, and never put a file where a folder
goes or the reverse. Files are written into ``staging/<prefix><id>/`` with
``O_CREAT | O_EXCL | O_NOFOLLOW`` through folders opened with ``O_NOFOLLOW``,
fsynced, and hashed on the way with neurobank's directory hash
(:class:`~nbankd.hashing.DirectoryHasher`). Only a tree whose hash equals the
registered SHA-1 is published, by :func:`nbankd.archive.durable.publish` (the
access policy applied to the whole tree, then one no-replace rename into
``resources/<id[:2]>/``, the stub folder fsynced), read back from storage and
located in the registry. Whatever goes wrong, the staged tree is removed: a
refused folder leaves nothing in ``resources/`` and nothing in ``staging/``.
With a dry run, nothing is written: the members are only checked and hashed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.fsops import DIR_NOFOLLOW, fsync_dir, fsync_fd, remove_ours
from nbankd.archive.layout import Archive, unavailable
from nbankd.hashing import DirectoryHasher, SourceReadError, copy_hashing
from nbankd.registry.base import Registry, ResourceRecord
from nbankd.streaming import totals_to_deltas
from nbankd.tape_stream import TarStream

T = TypeVar("T")
_DIR_FLAGS = DIR_NOFOLLOW
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: (member, staging folder, max size) -> why the member must not be extracted, or None
Checker = Callable[[tarfile.TarInfo, Path, int | None], str | None]


class FolderRefused(Exception):
    """The folder is not imported: (status, message); always a failure."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Members:
    """The members of a tar read as a stream, with one member put back."""

    def __init__(self, tar: TarStream) -> None:
        self.tar = tar
        self._back: tarfile.TarInfo | None = None

    def next(self) -> tarfile.TarInfo | None:
        if self._back is not None:
            member, self._back = self._back, None
            return member
        return self.tar.next()

    def put_back(self, member: tarfile.TarInfo) -> None:
        self._back = member


def _inside(folder: PurePosixPath, member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's path relative to the folder if its name starts with the folder's
    (by path components), else None. ``PurePosixPath`` folds ``a//b`` and ``a/./b``."""
    path = PurePosixPath(member.name)
    n = len(folder.parts)
    if path.parts[:n] != folder.parts:
        return None
    return PurePosixPath(*path.parts[n:]) if len(path.parts) > n else PurePosixPath()


def skip_folder(members: Members, top: tarfile.TarInfo) -> None:
    """Reads past the members below folder member ``top`` without extracting them."""
    folder = PurePosixPath(top.name)
    while (member := members.next()) is not None:
        if _inside(folder, member) is None:
            members.put_back(member)
            return


class FolderTree:
    """The paths met below one folder: each once, never a file where a folder goes
    (the rule tape import reads a folder by, and tape register and check tar judge it by)."""

    def __init__(self) -> None:
        self.kinds: dict[PurePosixPath, bool] = {}  # path -> is a folder
        self.named: set[PurePosixPath] = set()  # paths that were members themselves

    def claim(self, rel: PurePosixPath, is_dir: bool) -> str | None:
        """Records member ``rel`` (relative to the folder); why the folder is refused, or None."""
        if rel == PurePosixPath():
            return "the folder itself a second time"
        if rel in self.named:
            return "a path that appears twice"
        for parent in reversed(rel.parents[:-1]):
            if self.kinds.get(parent) is False:
                return f"a path below the file '{parent}'"
            self.kinds[parent] = True
        if self.kinds.get(rel, is_dir) != is_dir:
            return "a file where a folder goes"
        self.kinds[rel] = is_dir
        self.named.add(rel)
        return None


class _Staging:
    """The staged copy of one folder, written through folder descriptors only."""

    def __init__(self, archive: Archive, name: str) -> None:
        self.archive = archive
        self.path = durable.staged_path(archive, name)
        try:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:  # left by a crashed import of the same identifier
                remove_ours(self.path)
                os.mkdir(self.path, 0o700)
            self.top = os.open(self.path, _DIR_FLAGS)
        except OSError as err:
            raise unavailable(archive, err, f"creating {self.path}") from err
        self.folders: dict[PurePosixPath, int] = {PurePosixPath(): self.top}

    def folder(self, rel: PurePosixPath) -> int:
        """The descriptor of staged folder ``rel``, created (with its parents) if missing."""
        if rel in self.folders:
            return self.folders[rel]
        parent = self.folder(rel.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(rel.name, 0o700, dir_fd=parent)
        fd = os.open(rel.name, _DIR_FLAGS, dir_fd=parent)  # O_NOFOLLOW: never a link
        self.folders[rel] = fd
        return fd

    def write(self, rel: PurePosixPath, stream: BinaryIO, progress: Callable[[int], None]) -> str:
        """Writes one new file from stream; returns its SHA-1. The file is fsynced."""
        fd = os.open(rel.name, _NEW_FILE, 0o600, dir_fd=self.folder(rel.parent))
        try:
            result = copy_hashing(stream, fd, progress=progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        return result.sha1

    def close(self) -> None:
        """fsyncs every staged folder, deepest first, then staging/; closes them all."""
        try:
            for rel in sorted(self.folders, key=lambda p: len(p.parts), reverse=True):
                fsync_fd(self.folders[rel])
            fsync_dir(self.archive.staging_dir)
        finally:
            self.release()

    def release(self) -> None:
        for fd in self.folders.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.folders = {}

    def discard(self) -> None:
        self.release()
        durable.discard_staged(self.archive, self.path)


def _receive(
    archive: Archive,
    members: Members,
    top: tarfile.TarInfo,
    staging: _Staging | None,
    check: Checker,
    max_size: int | None,
    advance: Callable[[int], None],
) -> str:
    """Reads the members below ``top``; writes them into ``staging`` (None: dry run).
    Returns the directory hash, or raises FolderRefused after reading past the folder."""
    folder = PurePosixPath(top.name)
    tree, hasher = FolderTree(), DirectoryHasher()
    total = 0
    refused: str | None = None
    while (member := members.next()) is not None:
        rel = _inside(folder, member)
        if rel is None:
            members.put_back(member)
            break
        if refused is not None:
            continue  # read past the rest of a refused folder
        problem = check(member, archive.staging_dir, max_size) or tree.claim(rel, member.isdir())
        if problem is None and member.isreg():
            total += member.size
            if max_size is not None and total > max_size:
                problem = f"the folder's files add up to more than the limit of {max_size} bytes"
            elif staging is not None and member.size > _free_bytes(archive.staging_dir):
                problem = f"{member.size} bytes, more than the free space in staging/"
        if problem is not None:
            refused = f"refused member {member.name!r}: {problem}"
            continue
        try:
            digest = _take(archive, members.tar, member, rel, staging, advance)
        except FolderRefused as why:
            refused = why.message
            continue
        if digest is not None:
            hasher.add(rel, digest)
    if refused is not None:
        raise FolderRefused("refused", f"{refused}; folder '{folder}' not imported")
    return hasher.hexdigest()


def _take(
    archive: Archive,
    tar: TarStream,
    member: tarfile.TarInfo,
    rel: PurePosixPath,
    staging: _Staging | None,
    advance: Callable[[int], None],
) -> str | None:
    """Stages (or, in a dry run, only hashes) one checked member; a file's SHA-1."""
    if member.isdir():
        if staging is not None:
            _archive_side(archive, lambda: staging.folder(rel), member.name)
        return None
    stream = tar.extractfile(member)
    assert stream is not None  # a regular member always has data
    progress = totals_to_deltas(advance)
    if staging is None:
        return copy_hashing(stream, None, progress=progress).sha1
    return _archive_side(archive, lambda: staging.write(rel, stream, progress), member.name)


def _archive_side(archive: Archive, do: Callable[[], T], name: str) -> T:
    """Runs one staging write; a file or folder in the way means a crafted tar."""
    try:
        return do()
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise FolderRefused("refused", f"refused member {name!r}: it collides with "
                            "another member of the folder") from None  # fmt: skip
    except SourceReadError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FolderRefused("refused", f"refused member {name!r}: a link in its path") from None
        raise unavailable(archive, err, f"writing {name} into staging/") from err


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def import_folder(
    registry: Registry,
    archive: Archive,
    archive_name: str,
    members: Members,
    top: tarfile.TarInfo,
    resource: ResourceRecord,
    *,
    staged_name: str,
    dry_run: bool,
    check: Checker,
    max_size: int | None,
    advance: Callable[[int], None],
) -> str:
    """Imports the registered folder resource at member ``top``; returns what was done.

    Raises FolderRefused (the folder's members all read, nothing left behind).
    """
    id = resource.name
    if not archive.policy.allow_directories:
        skip_folder(members, top)
        raise FolderRefused(
            "refused",
            f"'{id}' is a folder resource and archive {archive.path} does not accept "
            "folders (set policy.allow_directories in its nbank.json)",
        )
    sha1 = resource.sha1
    mismatch = f"of folder {top.name!r} does not match the registered {sha1} of '{id}'"
    unverified = "" if sha1 else " (no registered hash to check)"
    if dry_run:
        digest = _receive(archive, members, top, None, check, max_size, advance)
        if sha1 and digest != sha1.lower():
            raise FolderRefused("failed", f"SHA-1 {digest} {mismatch}")
        return f"'{id}' checks OK{unverified} (dry run)"
    staging = _Staging(archive, staged_name)
    try:
        digest = _receive(archive, members, top, staging, check, max_size, advance)
        staging.close()
        if sha1 and digest != sha1.lower():
            raise FolderRefused("failed", f"SHA-1 {digest} {mismatch}; not imported")
        target = archive.new_resource_path(id, PurePosixPath(top.name).name)
        published = durable.publish(archive, staging.path, target, sha1=digest, id=id)
    finally:  # publish removes the staged tree, except on a transient error
        staging.release()
        if os.path.lexists(staging.path):
            staging.discard()
    if not durable.verify_from_storage(published.path, digest):
        raise FolderRefused("failed", f"{published.path} does not read back with SHA-1 "
                            f"{digest}; check the archive's storage")  # fmt: skip
    with contextlib.suppress(errors.LocationTaken):  # added by a concurrent run
        registry.add_location(id, archive_name)
    already = "" if published.created else " (already there, identical)"
    return f"{published.path}{already}{unverified}"


__all__ = ["FolderRefused", "FolderTree", "Members", "import_folder", "skip_folder"]
