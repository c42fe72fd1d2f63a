"""Staging: copying inputs into ``staging/`` durably, hashing in the same pass.

Names in ``staging/`` that start with :data:`STAGED_PREFIX` are nbankd's (neurobank
uses its own names there, such as ``<name>.zip``); the caller chooses the rest of the
name so recovery can find a staged copy again, and a leftover of the same name from
a crashed attempt is replaced. Nothing here touches ``resources/``.
See :mod:`nbankd.archive.durable` for error classification.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from nbankd import errors
from nbankd.archive import opening
from nbankd.archive.access import apply_resource_access_fd
from nbankd.archive.fsops import fsync_dir, remove_ours
from nbankd.archive.layout import STAGED_PREFIX, Archive, parse_staged_name, unavailable
from nbankd.archive.syncs import fsync_dir_soon, fsync_soon
from nbankd.filekind import FileKind
from nbankd.hashing import (
    BLOCK_SIZE,
    CopyResult,
    DirectoryHasher,
    Progress,
    SourceReadError,
    Throttle,
    copy_hashing,
    read_into,
    write_all,
)
from nbankd.mounts import mount_key, other_mount
from nbankd.names import is_utf8, printable
from nbankd.streaming import copy_hashing_overlapped
from nbankd.watch import writers

#: files at least this large are copied with reading, hashing and writing overlapped
OVERLAP_FROM = 16 << 20
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Staged:
    """A complete, fsynced copy in ``staging/``; ``size`` is the total of its bytes."""

    path: Path
    sha1: str
    size: int
    #: the copy's status from its own descriptor (None for a tree): what its staged
    #: name must still show at publishing, whoever may write in staging/
    identity: os.stat_result | None = None


def unsafe_input(path: Path | str, what: str) -> errors.NbankdError:
    """The error for an input nbankd must not archive (a link, FIFO, device...)."""
    return errors.UnsafeInput(
        f"'{path}' is {what}; only regular files and folders can be archived",
        hint="replace it with a regular file, or remove it",
    )


def staged_path(archive: Archive, name: str) -> Path:
    """Returns ``staging/<name>`` after checking the name is one of ours."""
    if not name.startswith(STAGED_PREFIX) or "/" in name or "\0" in name:
        raise ValueError(f"staged names must start with {STAGED_PREFIX!r} and hold no '/'")
    return archive.staging_dir / name


def _staging_names(archive: Archive) -> list[str]:
    """The names in ``staging/`` (none when it does not exist)."""
    try:
        return os.listdir(archive.staging_dir)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise unavailable(archive, err, "listing staging/") from err


def list_staged(archive: Archive) -> list[Path]:
    """Returns nbankd's entries in ``staging/`` (leftovers, for recovery)."""
    names = _staging_names(archive)
    return sorted(archive.staging_dir / n for n in names if n.startswith(STAGED_PREFIX))


def staged_copies(archive: Archive, token: str) -> list[Path]:
    """The entries in ``staging/`` of the deposit ``token`` (under either form of its
    staged name); paths are made only for those, however full ``staging/`` is."""
    mine = [n for n in _staging_names(archive) if token in n]  # most fail this cheap test
    return [
        archive.staging_dir / n
        for n in sorted(mine)
        if (parsed := parse_staged_name(n)) is not None and parsed.token == token
    ]


#: the longest identifier a staged name of :func:`process_staged_name` carries as it
#: is (the rest takes at most 50 bytes of a file name's 255)
_STAGED_ID_BYTES = 200


def process_staged_name(prefix: str, id: str) -> str:
    """A staged name for ``id`` no other process uses (``prefix``, the identifier, this
    process's id, a random token): two runs of one identifier at once never remove or
    publish each other's copy; what a killed run leaves is a staging leftover. An
    identifier too long to fit a file name with the rest is named by its SHA-1."""
    raw = os.fsencode(id)
    shown = id if len(raw) <= _STAGED_ID_BYTES else hashlib.sha1(raw).hexdigest()
    return f"{prefix}{shown}-{os.getpid()}-{secrets.token_hex(4)}"


def discard_staged(archive: Archive, path: Path) -> None:
    """Removes a staged file or tree of ours (idempotent) and fsyncs ``staging/``."""
    path = staged_path(archive, Path(path).name)
    try:
        remove_ours(path)
        fsync_dir(archive.staging_dir)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise unavailable(archive, err, f"removing {path}") from err


def check_present(archive: Archive) -> None:
    """Raises ArchiveUnavailable if the archive's nbank.json is gone (unmounted?)."""
    try:
        os.stat(archive.config_path)
    except OSError as err:
        raise unavailable(archive, err, f"looking for {archive.config_path}") from err


# --- staging --------------------------------------------------------------------------


def _open_regular(path: Path | str, *, dir_fd: int | None = None, shown: Path | str) -> int:
    """Opens a regular, singly linked file for reading without following links or blocking."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        check_regular(st, shown)
        fd = os.open(path, _OPEN_READ, dir_fd=dir_fd)
        fst = os.fstat(fd)
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, str(shown)) from err
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise errors.InputChanged(f"'{shown}' was replaced while it was being opened")
    try:
        check_regular(fst, shown)  # a hard link made between stat and open
    except errors.NbankdError:
        os.close(fd)
        raise
    return fd


def check_regular(st: os.stat_result, shown: Path | str) -> None:
    """Raises unsafe_input's error unless ``st`` is a regular file with a single link."""
    kind = FileKind.of(st)
    if kind is FileKind.HARDLINK:
        raise unsafe_input(shown, f"a hard link ({st.st_nlink} names)")
    if kind in (FileKind.DIRECTORY, FileKind.OTHER):
        raise unsafe_input(shown, "not a regular file")
    if kind is not FileKind.FILE:
        raise unsafe_input(shown, f"a {kind.noun}")


def _create_staged(archive: Archive, name: str, *, directory: bool) -> tuple[Path, int | None]:
    """Makes ``staging/<name>`` (a folder, or a file held open for writing: the copy
    goes into the very file made here, never into whatever another writer of the
    group-writable ``staging/`` puts under its name later)."""
    check_present(archive)
    opening.ensure_staging(archive)
    path = staged_path(archive, name)
    for _attempt in range(2):
        try:
            try:
                if directory:
                    os.mkdir(path, 0o700)
                    return path, None
                return path, os.open(path, _OPEN_NEW, 0o600)
            except FileExistsError:
                remove_ours(path)  # left by a crashed attempt with this name: ours
        except OSError as err:
            raise unavailable(archive, err, f"creating {path}") from err
    raise errors.ArchiveUnavailable(
        f"'{path}' keeps reappearing", hint="is another process using it?"
    )


def stage_copy(
    archive: Archive,
    src: int | BinaryIO | str | os.PathLike[str],
    staged_name: str,
    *,
    progress: Progress | None = None,
    throttle: Throttle | None = None,
) -> Staged:
    """Copies a file into ``staging/<staged_name>`` while hashing it; data and entry fsynced.

    ``src`` is an open descriptor or binary file (read from its current offset to EOF)
    or a path (opened without following links; must be a regular file with one link).
    On any error the staged file is removed.
    """
    own_fd = None
    if isinstance(src, str | os.PathLike):
        own_fd = _open_regular(src, shown=src)
        src = own_fd
    try:
        path, fd = _create_staged(archive, staged_name, directory=False)
        assert fd is not None
        try:
            try:
                result = _copy(src, fd, progress=progress, throttle=throttle)
                # its group and mode in resources/, durable with its data: publishing
                # then links it without an fsync of its own
                apply_resource_access_fd(archive, fd, path.name)
                fsync_soon(fd)  # before STAGED is saved: with a round's other fsyncs
                identity = os.fstat(fd)
            finally:
                os.close(fd)
            fsync_dir_soon(archive.staging_dir)
        except BaseException as exc:
            _cleanup(path)
            if isinstance(exc, OSError) and not isinstance(exc, SourceReadError):
                raise unavailable(archive, exc, f"writing {path}") from exc
            raise
        return Staged(path, result.sha1, result.size, identity)
    finally:
        if own_fd is not None:
            os.close(own_fd)


def _copy(
    src: int | BinaryIO, fd: int, *, progress: Progress | None, throttle: Throttle | None
) -> CopyResult:
    """Copies and hashes; a large file with reading, hashing and writing overlapped."""
    if isinstance(src, int) and os.fstat(src).st_size >= OVERLAP_FROM:
        sha1, size = copy_hashing_overlapped(
            lambda view: read_into(src, view), fd, write_all, progress=progress, throttle=throttle
        )
        return CopyResult(sha1, size)
    return copy_hashing(src, fd, progress=progress, throttle=throttle)


def _read_whole(src: int, copied: int, shown: Path) -> None:
    """Raises SourceReadError when fewer bytes were read than the file holds (its end
    reported early, as a flaky network filesystem can): never part of a file for all
    of it. The caller compares the file's identity for changes."""
    try:
        size = os.fstat(src).st_size
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, str(shown)) from err
    if copied < size:
        raise SourceReadError(
            errno.EAGAIN, f"reading '{shown}' ended after {copied} of its {size} bytes"
        )


def _cleanup(path: Path) -> None:
    """Best effort: a leftover in staging/ is harmless and replaced next time."""
    with contextlib.suppress(OSError):
        remove_ours(path)


#: folder levels a folder input may hold below itself (as many as the check for
#: programs writing into it walks: :data:`~nbankd.watch.writers.MAX_DEPTH`); a deeper
#: folder is refused (never walked by recursion, nor with a descriptor per level
#: without bound)
MAX_TREE_DEPTH = writers.MAX_DEPTH


def stage_copy_tree(
    archive: Archive,
    src_dir: str | os.PathLike[str],
    staged_name: str,
    *,
    progress: Progress | None = None,
    throttle: Throttle | None = None,
    max_depth: int | None = MAX_TREE_DEPTH,
) -> Staged:
    """Copies a directory tree into ``staging/<staged_name>``, hashing as neurobank does.

    Only regular files (with one link) and folders are accepted; a symbolic link,
    hard link, FIFO, socket or device anywhere raises :func:`unsafe_input`'s error
    naming it. Every file and folder is fsynced. On any error the copy is removed.
    ``max_depth``: folder levels accepted below the top (a deposit's input:
    :data:`MAX_TREE_DEPTH`; None, a stored resource copied elsewhere: any, as it was
    registered).
    """
    _check_directories(archive, src_dir)
    top = _open_tree(Path(src_dir))
    try:
        path, _ = _create_staged(archive, staged_name, directory=True)
        try:
            dtop = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                digest, size = _walk_tree(
                    Path(src_dir), top, dtop, progress, throttle, max_depth=max_depth
                )
                os.fsync(dtop)
            finally:
                os.close(dtop)
            fsync_dir(archive.staging_dir)
        except BaseException as exc:
            _cleanup(path)
            if isinstance(exc, OSError) and not isinstance(exc, SourceReadError):
                raise unavailable(archive, exc, f"writing {path}") from exc
            raise
    finally:
        os.close(top)
    return Staged(path, digest, size)


def hash_tree(
    archive: Archive,
    src_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    throttle: Throttle | None = None,
) -> tuple[str, int]:
    """neurobank's hash of a directory tree and the total of its files' bytes, read as
    :func:`stage_copy_tree` reads it (the same refusals) but copied nowhere: a folder
    placed by rename is published itself."""
    _check_directories(archive, src_dir)
    top = _open_tree(Path(src_dir))
    try:
        return _walk_tree(Path(src_dir), top, None, progress, throttle, max_depth=MAX_TREE_DEPTH)
    finally:
        os.close(top)


def _check_directories(archive: Archive, src_dir: str | os.PathLike[str]) -> None:
    if not archive.policy.allow_directories:
        raise errors.DirectoryNotAllowed(
            f"archive {archive.path} does not accept directories ('{src_dir}')",
            hint="set policy.allow_directories in nbank.json, or deposit the files",
        )


def _open_tree(src_root: Path) -> int:
    try:
        return os.open(src_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise unsafe_input(src_root, "a symbolic link") from None
        raise SourceReadError(err.errno, err.strerror, str(src_root)) from err


def _refused_name(shown: Path) -> errors.NbankdError:
    return errors.UnsafeInput(
        f"'{printable(str(shown))}' is named with bytes that are not UTF-8; no neurobank "
        "folder hash covers such a name",
        hint="rename it with a UTF-8 name (e.g. convmv -f latin1 -t utf8), then deposit "
        "the folder again",
    )


def _too_deep(shown: Path) -> errors.NbankdError:
    return errors.UnsafeInput(
        f"'{printable(str(shown))}' is nested more than {MAX_TREE_DEPTH} folders deep "
        "in its folder input; nbankd deposits folders at most that deep",
        hint="flatten the folder, then deposit it again",
    )


@dataclass
class _Level:
    """One open folder of the walk: its source (and copy's) descriptor, where it is in
    the tree, and the names of it still to walk (last first)."""

    sfd: int
    dfd: int | None
    rel: PurePosixPath
    names: list[str]


def _walk_tree(
    src_root: Path,
    top: int,
    dtop: int | None,
    progress: Progress | None,
    throttle: Throttle | None,
    *,
    max_depth: int | None,
) -> tuple[str, int]:
    """Hashes the tree open at ``top`` (read from descriptors, nothing followed) and,
    with ``dtop``, copies it there (each file and folder fsynced; the top's fsync is
    the caller's); returns its hash and size. Walked without recursion, one open folder
    (two when copying) per level, at most ``max_depth`` levels below the top (None: any);
    a deeper folder, or a file named with bytes that are not UTF-8, raises
    :class:`~nbankd.errors.UnsafeInput`."""
    hasher = DirectoryHasher()
    done = [0]
    buffer = bytearray(BLOCK_SIZE)  # shared by every file of the tree
    top_mount = mount_key(top)

    def report(n: int) -> None:
        if progress is not None:
            progress(done[0] + n)

    def listed(sfd: int, rel: PurePosixPath) -> list[str]:
        try:
            return sorted(os.listdir(sfd), reverse=True)  # popped from the end: in order
        except OSError as err:
            raise SourceReadError(err.errno, err.strerror, str(src_root / rel)) from err

    def copy_file(level: _Level, name: str, st: os.stat_result, shown: Path) -> None:
        check_regular(st, shown)
        sfile = _open_regular(name, dir_fd=level.sfd, shown=shown)
        try:
            writers.refuse_if_open_for_writing(sfile, shown)
            dfd = level.dfd
            dfile = None if dfd is None else os.open(name, _OPEN_NEW, 0o600, dir_fd=dfd)
            try:
                result = copy_hashing(
                    sfile, dfile, progress=report, throttle=throttle, buffer=buffer
                )
                _read_whole(sfile, result.size, shown)
                if dfile is not None:
                    os.fsync(dfile)
            finally:
                if dfile is not None:
                    os.close(dfile)
        finally:
            os.close(sfile)
        done[0] += result.size
        hasher.add(level.rel / name, result.sha1)

    def open_folder(level: _Level, name: str, shown: Path) -> _Level:
        try:
            csfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=level.sfd)
        except OSError as err:
            raise SourceReadError(err.errno, err.strerror, str(shown)) from err
        try:
            if other_mount(top_mount, mount_key(csfd)):  # mounted since the claim looked
                raise errors.MountInside(
                    f"'{printable(str(shown))}' is a mount point (another filesystem or a "
                    "bind mount): nothing on it is the folder's own to deposit",
                    hint="unmount it; the folder is copied then",
                )
            cdfd = None
            if level.dfd is not None:
                os.mkdir(name, 0o700, dir_fd=level.dfd)
                cdfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=level.dfd)
            try:
                rel = level.rel / name
                return _Level(csfd, cdfd, rel, listed(csfd, rel))
            except BaseException:
                if cdfd is not None:
                    os.close(cdfd)
                raise
        except BaseException:
            os.close(csfd)
            raise

    levels = [_Level(top, dtop, PurePosixPath(), listed(top, PurePosixPath()))]
    try:
        while levels:
            level = levels[-1]
            if not level.names:  # walked whole: its copy fsynced, closed
                levels.pop()
                if levels:  # the top's descriptors are the caller's
                    try:
                        if level.dfd is not None:
                            os.fsync(level.dfd)
                    finally:
                        if level.dfd is not None:
                            os.close(level.dfd)
                        os.close(level.sfd)
                continue
            name = level.names.pop()
            shown = src_root / level.rel / name
            try:
                st = os.stat(name, dir_fd=level.sfd, follow_symlinks=False)
            except OSError as err:
                raise SourceReadError(err.errno, err.strerror, str(shown)) from err
            if not stat.S_ISDIR(st.st_mode):
                # only a file's path enters neurobank's hash: a folder named so, empty,
                # is hashed (as nbank does) and copied; a file in it is refused here
                if not is_utf8(str(level.rel / name)):
                    raise _refused_name(shown)
                copy_file(level, name, st, shown)
            elif max_depth is not None and len(levels) > max_depth:
                raise _too_deep(shown)
            else:
                levels.append(open_folder(level, name, shown))
    finally:
        for level in levels[1:]:
            if level.dfd is not None:
                os.close(level.dfd)
            os.close(level.sfd)
    return hasher.hexdigest(), done[0]


__all__ = [
    "STAGED_PREFIX",
    "Staged",
    "check_present",
    "check_regular",
    "discard_staged",
    "hash_tree",
    "list_staged",
    "process_staged_name",
    "stage_copy",
    "stage_copy_tree",
    "staged_copies",
    "staged_path",
    "unsafe_input",
]
