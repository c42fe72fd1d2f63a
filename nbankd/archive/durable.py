"""Durable placement of resources: stage, publish, verify. Each step is idempotent.

The deposit pipeline journals each step and calls these separately, so that after a
crash it can repeat the step it was in:

1. :func:`stage_copy` / :func:`stage_copy_tree` copy the input into
   ``staging/<name>`` (the caller picks the name, which starts with
   :data:`STAGED_PREFIX`, and finds it again on recovery), hashing in the same
   pass, give a file the policy's group and mode, and fsync the data and the staging
   folder. A leftover of the same name is ours and is replaced.
2. :func:`publish` gives the staged copy the policy's group and mode (fsynced, when
   staging did not) and links it into ``resources/<stub>/`` without ever replacing
   anything, fsyncs the stub folder, then drops the staged name (a staged file's
   fsync and drop wait for a round's flush: :func:`~nbankd.archive.syncs.after_syncs`;
   outside a round they happen at once). An existing identical resource counts as
   already published; a different one raises :class:`~nbankd.errors.ResourceExists`.
   :func:`publish_in_place` does the same from a file already on the archive's
   filesystem (``placement: rename``).
3. :func:`verify_from_storage` re-reads the stored copy from storage, not from
   the page cache, and compares its SHA-1.

Nothing partial is ever visible under ``resources/``: files appear there by
link(2) of a complete, fsynced file, directories by an atomic rename.

Errors. Failures on the archive side are classified by
:func:`nbankd.archive.layout.unavailable`: disk full (ENOSPC, EDQUOT), I/O errors
(EIO), read-only or vanished filesystems (EROFS, ESTALE, missing ``nbank.json``,
i.e. unmounted) and permission errors (EACCES, EPERM: an administrator can fix
modes while the daemon keeps retrying) raise
:class:`~nbankd.errors.ArchiveUnavailable`, which is transient; names the
filesystem refuses (ENAMETOOLONG) and cross-device in-place placement (EXDEV) raise
a permanent :class:`~nbankd.errors.ArchiveError`. Failures reading the *source*
are not the archive's fault and propagate as
:class:`~nbankd.hashing.SourceReadError` (an OSError with the original errno).
Inputs that may not be archived (symbolic links, hard links, FIFOs, sockets,
devices) raise :func:`unsafe_input`'s error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors, seams
from nbankd.archive.access import apply_access, apply_access_tree, target_mode
from nbankd.archive.fsops import NoReplaceUnsupported, fsync_dir, remove_ours, rename_noreplace
from nbankd.archive.layout import Archive, unavailable
from nbankd.archive.removal import move_below, remove_empty_stub
from nbankd.archive.staging import (
    STAGED_PREFIX,
    Staged,
    check_present,
    check_regular,
    discard_staged,
    hash_tree,
    list_staged,
    stage_copy,
    stage_copy_tree,
    staged_copies,
    staged_path,
    unsafe_input,
)
from nbankd.archive.stubnames import STUB_NAMES
from nbankd.archive.syncs import after_syncs, fsync_dir_soon
from nbankd.archive.trees import check_tree, fsync_published_tree, settle_tree
from nbankd.archive.verify import sha1_from_storage, stored_sha1, verify_from_storage
from nbankd.hashing import hash_path, sha1_file

#: mode of the empty directory that reserves a name in the no-RENAME_NOREPLACE fallback;
#: the sticky bit never occurs on published resources, so a leftover is recognisable
RESERVATION_MODE = 0o1700


@dataclass(frozen=True)
class Published:
    """A resource in place; ``created`` is False when an identical one was already
    there, and ``ours`` False when that one is not this source's own earlier link
    (another input with the same identifier, bytes and name published it first)."""

    path: Path
    created: bool
    ours: bool = True


#: publishing checks that no other stored name holds the identifier, then links: the two
#: happen under this lock (threads of one process) and an flock of the identifier's stub
#: folder (other processes: a second daemon, ``archive check --fix``)
_PUBLISH_LOCK = threading.Lock()


@contextlib.contextmanager
def _identifier_lock(stub: Path) -> Iterator[None]:
    """Holds the publish lock for the identifiers of stub folder ``stub`` (which
    exists). Where the filesystem has no flock for folders (some NFS and FUSE
    mounts), only this process's threads are kept apart."""
    with _PUBLISH_LOCK:
        fd = os.open(stub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            yield
        finally:
            os.close(fd)  # releases the flock


def _check_target(archive: Archive, target: Path, id: str) -> None:
    if target != archive.stored_file(id, target.name) or not (
        target.name == id or target.name.startswith(id + ".")
    ):
        raise ValueError(f"'{target}' is not a resource path of {id} in archive {archive.path}")


def _other_name(archive: Archive, id: str, target: Path) -> Path | None:
    """An entry stored for ``id`` under another name than ``target``, or None: from
    the names inotify keeps where it can (:mod:`nbankd.archive.stubnames`), else a
    listing of the stub folder."""
    for other in archive.stored_entries(id, known=STUB_NAMES.names_of):
        if other != target:
            return other
    return None


def _taken_error(
    archive: Archive, source: Path, other: Path, *, in_place: bool
) -> errors.StoredUnderOtherName:
    """The identifier is filed already under another name; a staged copy is discarded."""
    if not in_place:
        discard_staged(archive, source)
    return errors.StoredUnderOtherName(
        f"archive {archive.path}: the identifier is already stored as '{other}'",
        hint="one identifier has exactly one stored file; rename the input or use auto_id",
        stored=str(other),
    )


def _ensure_stub(archive: Archive, stub: Path) -> None:
    """Creates the stub folder with the layout's group and mode, durably."""
    umask = archive.policy.access.umask
    try:
        os.mkdir(stub, 0o777 & ~umask)
    except FileExistsError:
        st = os.lstat(stub)
        if not stat.S_ISDIR(st.st_mode):
            raise errors.ArchiveUnavailable(
                f"archive {archive.path}: '{stub}' is not a folder",
                hint="move it out of resources/",
            ) from None
        if st.st_uid == os.geteuid():  # repair a stub left by a crash before its chmod
            apply_access(archive, stub)
        return
    apply_access(archive, stub)
    fsync_dir(archive.resources_dir)


def _identical(a: Path, b: Path) -> bool:
    """True if a and b are the same inode, or hold the same bytes (files or trees)."""
    sa, sb = os.lstat(a), os.lstat(b)
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISREG(sa.st_mode):
        return sa.st_size == sb.st_size and sha1_file(a) == sha1_file(b)
    if stat.S_ISDIR(sa.st_mode):
        return hash_path(a) == hash_path(b)
    return False


def _exists_error(archive: Archive, source: Path, target: Path) -> errors.ResourceExists:
    return errors.ResourceExists(
        f"archive {archive.path}: '{target}' already holds different contents than '{source}'",
        hint="the identifier is taken in this archive; choose another one",
    )


def _conflict(
    archive: Archive, source: Path, target: Path, *, in_place: bool
) -> errors.ResourceExists:
    """The ResourceExists error; a staged copy is discarded first, an in-place source kept."""
    if not in_place:
        discard_staged(archive, source)
    return _exists_error(archive, source, target)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _after_missing_source(
    archive: Archive, source: Path, target: Path, sha1: str | None
) -> Published:
    """The source is gone: fine only if an earlier run already put it in place.

    That run may have been killed right after its rename or link, before it fsynced
    the stub folder (a folder is moved, so nothing is left to publish again): the
    move is made durable here, the stub folder and the source's folder fsynced, before
    anything (the record) relies on it."""
    if not os.path.lexists(target):
        raise FileNotFoundError(
            errno.ENOENT,
            f"neither '{source}' nor its published copy exists; stage again",
            str(source),
        )
    # hashed from descriptors, as read back from storage: paths past PATH_MAX in a
    # deep folder, or a sub-folder swapped for a link, never hide part of it
    if sha1 is not None and stored_sha1(target) == sha1.lower():
        try:
            fsync_dir(target.parent)
            if os.path.isdir(source.parent):
                fsync_dir(source.parent)
        except OSError as err:
            raise unavailable(archive, err, f"publishing {target}") from err
        return Published(target, created=False)
    if sha1 is None:
        raise FileNotFoundError(
            errno.ENOENT,
            f"'{source}' is gone and no sha1 was given to check '{target}'",
            str(source),
        )
    raise _exists_error(archive, source, target)


def _link_into_place(archive: Archive, src: Path, target: Path) -> bool:
    """Puts the file at src into place under target without replacing anything.

    Returns True if placed, False if target already exists (the caller compares).
    Uses link(2); on filesystems without hard links, renameat2(RENAME_NOREPLACE).
    """
    try:
        os.link(src, target, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    try:
        rename_noreplace(src, target)
        return True
    except FileExistsError:
        return False
    except NoReplaceUnsupported as err:
        raise errors.ArchiveUnavailable(
            f"archive {archive.path}: cannot hard-link '{src}' and the filesystem has no "
            "no-replace rename",
            hint="store archives on a filesystem with hard links (ext4, xfs, NFS)",
        ) from err


def _place_directory(src: Path, target: Path, *, noreplace: bool = True) -> bool:
    """Moves the directory src to target atomically, never replacing anything.

    Returns True if placed, False if target exists (the caller compares).

    With RENAME_NOREPLACE this is one call. Where the filesystem lacks it (NFS answers
    EINVAL), the fallback reserves the name by creating an empty directory there with
    :data:`RESERVATION_MODE` (exclusive mkdir), then rename(2)s src over it: POSIX
    rename replaces an *empty* directory atomically and fails on a non-empty one, so
    readers see either the reservation or the complete tree, and a concurrent writer
    that filled the name wins (we get ENOTEMPTY/EEXIST). A reservation left by a crash
    is an empty, sticky, owner-only folder of ours and is reused; nothing else that is
    empty is ever replaced.
    """
    if noreplace:
        try:
            rename_noreplace(src, target)
            return True
        except FileExistsError:
            return False
        except NoReplaceUnsupported:
            pass
    try:
        os.mkdir(target, RESERVATION_MODE)
        os.chmod(target, RESERVATION_MODE)  # drops the setgid bit inherited from the stub
    except FileExistsError:
        if not _is_reservation(target):
            return False
    try:
        os.rename(src, target)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def _is_reservation(path: Path) -> bool:
    st = os.lstat(path)
    return (
        stat.S_ISDIR(st.st_mode)
        and stat.S_IMODE(st.st_mode) & ~stat.S_ISGID == RESERVATION_MODE
        and st.st_uid == os.geteuid()
        and not os.listdir(path)
    )


def _publish(
    archive: Archive,
    source: Path,
    target: Path,
    sha1: str | None,
    *,
    in_place: bool,
    id: str,
    progress: Callable[[], None] | None = None,
) -> Published:
    check_present(archive)
    _check_target(archive, target, id)
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        return _after_missing_source(archive, source, target, sha1)
    except OSError as err:
        raise unavailable(archive, err, f"reading {source}") from err
    is_dir = stat.S_ISDIR(st.st_mode)
    try:
        if in_place:
            if is_dir:
                check_tree(source)
            elif not (os.path.lexists(target) and _identical(source, target)):
                check_regular(st, source)  # nlink 2 is fine only after our own link
        elif not (is_dir or stat.S_ISREG(st.st_mode)):
            raise ValueError(f"'{source}' is not a staged file or folder")
        _ensure_stub(archive, target.parent)
        # an input published in place is the user's file: a taken identifier is found
        # before its mode and group change (a staged copy is ours: the check under the
        # lock below is enough, and a stub folder is listed once per publish, not twice)
        other = _other_name(archive, id, target) if in_place else None
        if other is not None:
            raise _taken_error(archive, source, other, in_place=in_place)
        if is_dir and in_place:  # the input's own tree, as a rig left it: walked from
            settle_tree(archive, source, target, progress)  # descriptors, never a link
            os.chmod(source, target_mode(archive, target, is_dir=True) | 0o700)
            fsync_dir(source)
        elif is_dir:
            apply_access_tree(archive, source, at=target, top=False)
            os.chmod(source, target_mode(archive, target, is_dir=True) | 0o700)
        else:
            changed = apply_access(archive, source, at=target)  # given when it was staged
            if in_place or changed:  # an input's own data is fsynced here and nowhere else
                _fsync_file(source)  # its data, mode and group durable before the link
        with _identifier_lock(target.parent):
            other = _other_name(archive, id, target)
            if other is not None:  # same identifier, another stored name: never a second
                raise _taken_error(archive, source, other, in_place=in_place)
            if is_dir:
                placed = _place_directory(source, target)
            else:
                placed = _link_into_place(archive, source, target)
        if is_dir and placed:
            apply_access(archive, target)
        if not placed and not _identical(source, target):
            raise _conflict(archive, source, target, in_place=in_place)
        ours = placed or _same_inode(source, target)
        seams.reached("after-publish-link")
        if in_place or is_dir:
            fsync_dir(target.parent)
            if ours or not in_place:
                # an input placed in place whose identifier, bytes and name another
                # input stored first keeps its name: it is removed by the release, once
                # that stored copy has been read back (it is not this input's)
                _drop_source(source)
        else:  # a staged file: the stub folder once for a round's publishes, then its name
            fsync_dir_soon(target.parent)
            after_syncs(lambda: _drop_staged(source))
    except errors.NbankdError:
        raise
    except OSError as err:
        raise unavailable(archive, err, f"publishing {target}") from err
    return Published(target, created=placed, ours=ours)


def _drop_source(source: Path) -> None:
    """Removes the published source's own name, only once its link is durable (the stub
    folder fsynced), and fsyncs its folder with a round's other fsyncs: a name
    reappearing after a power loss is a second link to the stored file, found by
    publishing again."""
    if os.path.lexists(source):
        remove_ours(source)
    fsync_dir_soon(source.parent)


def _drop_staged(source: Path) -> None:
    """:func:`_drop_source` for a staged copy, its error naming what failed."""
    try:
        _drop_source(source)
    except OSError as err:
        raise OSError(err.errno, f"dropping '{source}' once published: {err.strerror}") from err


def _same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def refile(archive: Archive, path: Path, id: str) -> Path:
    """Moves a resource filed in the wrong stub folder (``path``) to where identifier
    ``id`` belongs, within ``resources/``, never replacing anything: refused with
    :class:`~nbankd.errors.StoredUnderOtherName` when the identifier already has an
    entry there. Both folders are fsynced; the old stub folder is removed if empty."""
    target = archive.stored_file(id, path.name)
    if path.parent.parent != archive.resources_dir or path.parent == target.parent:
        raise ValueError(f"'{path}' is not a misplaced resource of archive {archive.path}")

    def occupied(other: Path) -> errors.StoredUnderOtherName:
        return errors.StoredUnderOtherName(
            f"archive {archive.path}: '{path}' cannot move to {target.parent}/: "
            f"the identifier is stored there as '{other}'; '{path}' was left where it is",
            hint="compare the two files and remove the one that is not registered",
            stored=str(other),
        )

    check_present(archive)
    try:
        _ensure_stub(archive, target.parent)
        with _identifier_lock(target.parent):
            for other in archive.stored_entries(id):
                if other.parent == target.parent:
                    raise occupied(other)
            move_below(archive, path, target)  # never through a stub swapped for a link
        remove_empty_stub(archive, path.parent)  # not empty (other resources...): kept
    except NoReplaceUnsupported as err:
        raise errors.ArchiveUnavailable(
            f"archive {archive.path}: the filesystem has no no-replace rename to move '{path}'",
            hint="move it by hand (mv -n) into " + str(target.parent),
        ) from err
    except FileExistsError:
        raise occupied(target) from None
    except OSError as err:
        raise unavailable(archive, err, f"moving {path} to {target}") from err
    return target


def publish(
    archive: Archive,
    staged_path: str | os.PathLike[str],
    target_path: str | os.PathLike[str],
    *,
    sha1: str | None = None,
    id: str | None = None,
) -> Published:
    """Moves a staged file or tree to ``target_path`` under ``resources/``, never replacing.

    Idempotent: if the target already holds identical contents (an earlier run, or
    the staged copy is gone and ``sha1`` matches the target) the result has
    ``created=False``. A different resource at the target raises ResourceExists
    naming both paths; the staged copy is then discarded. On transient errors the
    staged copy is kept for a retry (:func:`discard_staged` removes it). ``id`` is the
    resource's identifier (default: the stored name without its extension); when it is
    already stored under another name, :class:`~nbankd.errors.StoredUnderOtherName`
    names that file: one identifier never has two stored files.
    """
    target = Path(target_path)
    return _publish(
        archive, Path(staged_path), target, sha1, in_place=False, id=id or _id_of(target)
    )


def publish_in_place(
    archive: Archive,
    src_path: str | os.PathLike[str],
    target_path: str | os.PathLike[str],
    *,
    sha1: str | None = None,
    id: str | None = None,
    progress: Callable[[], None] | None = None,
) -> Published:
    """Publishes a file or folder already on the archive's filesystem, then removes its name.

    For ``placement: rename``: no copy; the source (e.g. a claimed file in an inbox's
    work folder) gets the policy's group and mode and is linked (files) or renamed
    (folders) into place, the stub folder fsynced, then the source name removed and
    its folder fsynced. Links and special files are refused. On ResourceExists the
    source is left where it is. A different filesystem raises ArchiveError (EXDEV).
    Files not owned by the service user keep their owner (check reports it) and may
    fail with ArchiveUnavailable (EPERM) when their mode cannot be set.
    """
    target = Path(target_path)
    return _publish(
        archive,
        Path(src_path),
        target,
        sha1,
        in_place=True,
        id=id or _id_of(target),
        progress=progress,
    )


def _id_of(target: Path) -> str:
    """The identifier of a stored name: before its first dot (identifiers have none)."""
    return target.name.split(".", 1)[0] if not target.name.startswith(".") else target.name


__all__ = [
    "RESERVATION_MODE",
    "STAGED_PREFIX",
    "Published",
    "Staged",
    "discard_staged",
    "fsync_dir",
    "fsync_published_tree",
    "hash_tree",
    "list_staged",
    "publish",
    "publish_in_place",
    "refile",
    "sha1_from_storage",
    "stage_copy",
    "stage_copy_tree",
    "staged_copies",
    "staged_path",
    "unsafe_input",
    "verify_from_storage",
]
