"""Reading stored resources back from storage rather than the page cache."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            if not synced:
                os.fdatasync(fd)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EBADF):
                raise
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
        else:
            try:
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
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                full = Path(dirpath, name)
                if full.is_file():
                    hasher.add(
                        full.relative_to(root).as_posix(),
                        sha1_from_storage(full, throttle=throttle, synced=synced),
                    )
        return hasher.hexdigest()
    except OSError as err:
        raise unavailable(root.parent, err, f"verifying {root}") from err


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


__all__ = ["sha1_from_storage", "stored_sha1", "verify_from_storage"]
