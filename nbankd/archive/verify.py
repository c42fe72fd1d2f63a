"""Reading stored resources back from storage rather than the page cache."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nbankd.archive.layout import unavailable
from nbankd.hashing import DirectoryHasher, Throttle, copy_hashing
from nbankd.streaming import hash_read_ahead


def _hash_direct(fd: int, throttle: Throttle | None) -> str | None:
    """Hashes fd (opened with O_DIRECT) through page-aligned buffers, the next blocks
    read while the last is hashed; None if the filesystem refuses O_DIRECT reads."""
    first = True

    def read(view: memoryview) -> int:
        nonlocal first
        try:
            n = os.readv(fd, [view])
        except OSError as err:
            if first and err.errno == errno.EINVAL:
                raise _DirectRefused from None
            raise
        first = False
        return n

    try:
        size = os.fstat(fd).st_size
        if size >= READ_AHEAD_FROM:  # the throttle (and heartbeat) stay on this thread
            return hash_read_ahead(read, throttle=throttle)[0]
        # a small file: one read into one buffer on this thread (a reader thread and
        # its ring would cost more than the read)
        with mmap.mmap(
            -1, max(mmap.PAGESIZE, -(-(size + 1) // mmap.PAGESIZE) * mmap.PAGESIZE)
        ) as buf:
            view = memoryview(buf)
            try:
                digest = hashlib.sha1()
                while n := read(view):
                    digest.update(view[:n])
                    if throttle is not None:
                        throttle(n)
                return digest.hexdigest()
            finally:
                view.release()
    except _DirectRefused:
        return None


#: files at least this large are read back with a reader thread reading ahead
READ_AHEAD_FROM = 16 << 20


class _DirectRefused(Exception):
    """The first O_DIRECT read was refused (EINVAL): read through the page cache."""


def sha1_from_storage(
    path: str | os.PathLike[str], *, throttle: Throttle | None = None, synced: bool = False
) -> str:
    """Returns the SHA-1 of a stored file as read back from storage, not the page cache.

    fdatasync pushes any dirty pages out first (only the data matters here: no journal
    commit for the link count and times publishing changed); posix_fadvise(DONTNEED)
    then evicts the clean cached pages, and the read uses O_DIRECT with an aligned
    buffer where the filesystem allows it (falling back to a buffered read after the
    eviction, e.g. on tmpfs, where memory is the storage).

    ``synced``: the caller's own fsync of this file's data succeeded after its last
    write (a deposit's staged copy, or its input published in place), so its pages are
    clean and the fdatasync is left out: on ext4 it would flush the disk's cache once
    more, which under another process's fsyncs costs a deposit most of a millisecond.
    Bytes written since are still what is read (an O_DIRECT read writes dirty pages
    back first; a buffered one reads them), never what the copy held.

    On NFS, fdatasync sends COMMIT, so the server has the data on stable storage; the
    O_DIRECT read (or the evicted client cache) then fetches the bytes from the
    server, which may answer from its own cache of what it committed. It checks the
    path client -> server -> server's copy; it cannot prove the server's disk media.
    """
    # O_NONBLOCK: a FIFO swapped in for the file is refused below, never waited on
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {os.fsdecode(path)}")
        os.set_blocking(fd, True)
        try:
            if not synced:
                os.fdatasync(fd)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EBADF):
                raise
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            dfd = os.open(path, flags | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
        else:
            try:
                again = os.fstat(dfd)
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                    raise OSError(errno.EAGAIN, f"replaced while read: {os.fsdecode(path)}")
                os.set_blocking(dfd, True)
                digest = _hash_direct(dfd, throttle)
            finally:
                os.close(dfd)
            if digest is not None:
                return digest
        return copy_hashing(fd, None, throttle=throttle).sha1
    finally:
        os.close(fd)


def stored_sha1(
    path: str | os.PathLike[str], *, throttle: Throttle | None = None, synced: bool = False
) -> str | None:
    """The SHA-1 of a stored file (or tree, by neurobank's directory hash) as read back
    from storage through :func:`sha1_from_storage` (``synced`` as there); None if the
    path is missing or a symbolic link (never a valid stored copy). Other read failures
    raise ArchiveUnavailable naming the path."""
    root = Path(path)
    try:
        if not os.path.lexists(root) or root.is_symlink():
            return None  # a link in resources/ is never a valid stored copy
        if not root.is_dir():
            return sha1_from_storage(root, throttle=throttle, synced=synced)
        hasher = DirectoryHasher()

        def from_storage(dir_fd: int, name: str, _rel: PurePosixPath) -> str:
            # the name inside the very folder open here (O_NOFOLLOW on the name itself)
            at = f"/proc/self/fd/{dir_fd}/{name}"
            return sha1_from_storage(at, throttle=throttle, synced=synced)

        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            hash_folder(top, hasher, from_storage)
        finally:
            os.close(top)
        return hasher.hexdigest()
    except OSError as err:
        raise unavailable(root.parent, err, f"verifying {root}") from err


#: hashes the regular file ``name`` of the folder open at ``dir_fd``; ``rel`` is its
#: path in the tree
FileSha1 = Callable[[int, str, PurePosixPath], str]
_TOP = PurePosixPath()


class ChangedWhileRead(OSError):
    """A stored file or folder changed while it was hashed (its device, inode, size,
    mtime or ctime differ after the read): the hash stands for bytes it may no longer
    hold. ``filename`` is its path (in its tree)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EAGAIN, "changed while it was read", os.fspath(path))


def unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether two stats of one file or folder show no change between them."""
    return _key(before) == _key(after)


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Level:
    """One folder of the walk: its descriptor, path in the tree, names left to go
    through, and its fstat before it was listed (``check``)."""

    fd: int
    rel: PurePosixPath
    names: Iterator[str]
    before: os.stat_result | None
    owned: bool = True  # opened by the walk (closed by it)


def hash_folder(
    dir_fd: int,
    hasher: DirectoryHasher,
    file_sha1: FileSha1,
    rel: PurePosixPath = _TOP,
    *,
    check: bool = False,
) -> None:
    """Adds every regular file under the folder open at ``dir_fd`` to ``hasher`` (each
    hashed by ``file_sha1``), walking from descriptors: a sub-folder swapped for a link
    while the walk goes on never leads it out of the tree. A link met raises ELOOP (a
    stored tree holds none: it is not the copy that was stored); FIFOs, sockets and
    devices are not files of the tree. ``check``: each folder is fstat'ed before it is
    listed and once its members are hashed, and each sub-folder opened must be the one
    listed; a difference raises :class:`ChangedWhileRead` (an entry added, removed or
    renamed in it meanwhile). The walk is depth first without recursion (a tree of any
    depth), holding one descriptor per level of the folder it is in."""
    before = os.fstat(dir_fd) if check else None
    levels = [_Level(dir_fd, rel, iter(os.listdir(dir_fd)), before, owned=False)]
    try:
        while levels:
            level = levels[-1]
            name = next(level.names, None)
            if name is None:  # all its members hashed
                if level.before is not None and not unchanged(level.before, os.fstat(level.fd)):
                    raise ChangedWhileRead(level.rel)
                levels.pop()
                if level.owned:
                    os.close(level.fd)
                continue
            levels.extend(_member(level, name, hasher, file_sha1, check))
    finally:
        for level in levels:
            if level.owned:
                os.close(level.fd)


def _member(
    level: _Level, name: str, hasher: DirectoryHasher, file_sha1: FileSha1, check: bool
) -> list[_Level]:
    """Goes through the entry ``name`` of the folder ``level``: a regular file is
    hashed; a sub-folder is opened and listed, and returned to be walked next."""
    st = os.stat(name, dir_fd=level.fd, follow_symlinks=False)
    rel = level.rel / name
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=level.fd
        )
        try:
            if check and not unchanged(st, os.fstat(sub)):
                raise ChangedWhileRead(rel)
            before = os.fstat(sub) if check else None
            return [_Level(sub, rel, iter(os.listdir(sub)), before)]
        except BaseException:
            os.close(sub)
            raise
    if stat.S_ISREG(st.st_mode):
        hasher.add(rel, file_sha1(level.fd, name, rel))
    elif stat.S_ISLNK(st.st_mode) and _links_to_file(name, level.fd):
        raise OSError(errno.ELOOP, f"a symbolic link in a stored folder: {rel}")
    # a link to a folder, or to nothing: neurobank's hash leaves it out (folders
    # neurobank < 0.13 stored may hold one); nothing is opened through it
    return []


def _links_to_file(name: str, dir_fd: int) -> bool:
    """Whether the link ``name`` leads to a regular file (its target's kind only)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd).st_mode)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False  # dangling, or a loop: as Path.is_file() had it
        raise


def verify_from_storage(
    path: str | os.PathLike[str],
    sha1: str,
    *,
    throttle: Throttle | None = None,
    synced: bool = False,
) -> bool:
    """True if the stored file or tree has this SHA-1 (see :func:`stored_sha1`; ``synced``
    as for :func:`sha1_from_storage`); False if it is missing, a symbolic link, or
    differs."""
    return stored_sha1(path, throttle=throttle, synced=synced) == sha1.lower()


__all__ = [
    "ChangedWhileRead",
    "FileSha1",
    "hash_folder",
    "sha1_from_storage",
    "stored_sha1",
    "unchanged",
    "verify_from_storage",
]
