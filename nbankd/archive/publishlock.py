"""The identifier lock of publishing, and one listing per stub folder for a batch.

Publishing a resource checks that no other stored name holds its identifier, then
links it into its stub folder; both happen under :func:`identifier_lock`: a lock of
this process's threads and an ``flock`` of the stub folder (other processes: a second
daemon, ``nbankctl deposit``, ``check archive --fix``). Where the filesystem has no
flock for folders (some NFS and FUSE mounts), only this process's threads are kept
apart.

Checking means listing the stub folder, and a lab's naming can put thousands of names
in one stub: a burst listed that folder once per file, its time growing with the
square of the burst. :func:`held` takes the locks of many stub folders at once, for a
round's publishes, and lists each folder once under its lock; inside, on that thread,
:func:`listing` answers from that listing plus the names this thread linked since
(:func:`noted`). A name in the listing that is gone (a bad copy removed by a verify
step) is looked up before it counts (:func:`entries`). What the listing can miss is
only what a writer that ignores the lock adds during the batch; the same writer could
add it between a listing and its link without a batch, and the registry, which
refuses a second record of the identifier, is asked before any publish.

Locks are taken in sorted path order, so two processes holding batches cannot wait
for each other; a single folder's lock is never held while waiting for another one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from nbankd.archive.layout import Archive, Listing

#: this process's publishes, one at a time (the threads of one process share flocks)
_PUBLISH_LOCK = threading.Lock()
_local = threading.local()

#: flock errors that mean "this filesystem has no folder locks": only threads are apart
_NO_FLOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def _held() -> dict[Path, Listing | None] | None:
    """{stub folder held by this thread inside :func:`held`: its names, or None where
    they could not be listed}, else None."""
    found: dict[Path, Listing | None] | None = getattr(_local, "held", None)
    return found


def _flock(stub: Path, *, wait: bool = True) -> int:
    """An open descriptor of ``stub`` holding its exclusive flock (where it has one).
    Raises BlockingIOError when ``wait`` is false and another process holds it."""
    fd = os.open(stub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if isinstance(err, BlockingIOError) or err.errno not in _NO_FLOCK:
            os.close(fd)
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def identifier_lock(stub: Path) -> Iterator[None]:
    """Holds the publish lock for the identifiers of stub folder ``stub`` (which exists).

    Inside :func:`held`, a folder held is locked already; another one is locked only
    if no other process holds it (waiting with folders held could deadlock with
    another process's batch): else BlockingIOError (EAGAIN), which callers treat as
    transient."""
    held = _held()
    if held is not None:
        if stub in held:
            yield
            return
        fd = _flock(stub, wait=False)  # this thread has the process's lock already
        try:
            yield
        finally:
            os.close(fd)
        return
    with _PUBLISH_LOCK:
        fd = _flock(stub)
        try:
            yield
        finally:
            os.close(fd)  # releases the flock


@contextlib.contextmanager
def held(stubs: Iterable[Path]) -> Iterator[None]:
    """Within, on the calling thread: the publish lock of each of ``stubs`` is held
    (those that exist and can be opened: the others are locked per publish) and each
    is listed once. Not reentrant."""
    if _held() is not None:
        raise RuntimeError("publishlock.held is not reentrant")
    names: dict[Path, Listing | None] = {}
    fds: list[int] = []
    with _PUBLISH_LOCK:
        try:
            for stub in sorted(set(stubs)):
                try:
                    fd = _flock(stub)
                except OSError:
                    continue  # not there, or not a folder: its publish says why
                fds.append(fd)
                try:
                    names[stub] = Listing(os.listdir(fd))
                except OSError:
                    names[stub] = None  # held, listed by each publish
            _local.held = names
            yield
        finally:
            _local.held = None
            for fd in fds:
                os.close(fd)


def listing(stub: Path) -> Listing | None:
    """The names of ``stub`` as this thread's batch knows them, or None outside one
    (or for a folder it does not hold, or could not list)."""
    held = _held()
    return None if held is None else held.get(stub)


def noted(target: Path) -> None:
    """This thread linked ``target`` into its stub folder: a held listing includes it."""
    held = _held()
    names = None if held is None else held.get(target.parent)
    if names is not None:
        names.add(target.name)


def entries(archive: Archive, id: str) -> list[Path]:
    """Every entry stored for ``id`` (:meth:`~nbankd.archive.layout.Archive.stored_entries`),
    answered from this thread's held listings where it has them: a listed name that is
    gone no longer counts."""
    held = _held()
    if not held:
        return archive.stored_entries(id)
    found = archive.stored_entries(id, known=listing)
    return [p for p in found if held.get(p.parent) is None or _still_there(p, held)]


def _still_there(path: Path, held: dict[Path, Listing | None]) -> bool:
    """``path``, named by a held listing, is there; forgotten when it is not."""
    if os.path.lexists(path):
        return True
    names = held.get(path.parent)
    if names is not None:
        names.discard(path.name)
    return False


__all__ = ["entries", "held", "identifier_lock", "listing", "noted"]
