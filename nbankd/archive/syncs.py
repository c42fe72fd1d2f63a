"""fsyncs that the steps of one round share (#16: one fsync per folder per batch).

A step calls :func:`fsync_soon` where its fsync has to happen before its save is
committed and before anything that relies on it, but not before anything else the
step itself does: the staging folder after a staged copy appears in it or its name
is dropped once published, the inbox and work folders after a claim, the work folder
after a release, a receipt log after a receipt is appended, a staged copy's data.
Outside a round this is a plain fsync at once. Inside one (:func:`shared`, on the
round's thread) the descriptor is kept (duplicated) and, when the round's steps are
done, :meth:`SharedSyncs.flush` fsyncs each file once, however many steps asked, and
only then are the steps' saves committed: a folder that 64 claims changed is fsynced
once, not 128 times. Data files are first all handed to writeback
(``sync_file_range``), so their fsyncs share the filesystem's journal commits
instead of taking one each.

An fsync whose order matters within a step (a published link before the staged name
is dropped) stays a plain fsync in that step.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Hashable, Iterator

from nbankd.archive.fsops import fsync_fd
from nbankd.streaming import start_writeback

_local = threading.local()


class SharedSyncs:
    """The fsyncs the steps of a round asked for, each file once (see the module)."""

    def __init__(self) -> None:
        #: (device, inode) -> (our duplicate of a descriptor, the owners who asked)
        self._files: dict[tuple[int, int], tuple[int, set[Hashable]]] = {}
        #: whose step is running: failures are reported per owner
        self.owner: Hashable = None

    def add(self, fd: int) -> None:
        """Takes an fsync of the open file ``fd`` for :meth:`flush`."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        held = self._files.get(key)
        if held is None:
            held = self._files[key] = (os.dup(fd), set())
        held[1].add(self.owner)

    def __len__(self) -> int:
        return len(self._files)

    def flush(self) -> dict[Hashable, OSError]:
        """fsyncs every file taken (data files handed to writeback first); returns the
        owners whose fsync failed, with the error. Every descriptor is closed."""
        files, self._files = list(self._files.values()), {}
        failed: dict[Hashable, OSError] = {}
        try:
            for fd, _owners in files:
                with contextlib.suppress(OSError):  # only a head start; fsync decides
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        start_writeback(fd, 0, 0)
            for fd, owners in files:
                try:
                    fsync_fd(fd)  # a filesystem that cannot (EINVAL) is ignored there
                except OSError as err:
                    failed.update((owner, err) for owner in owners if owner not in failed)
        finally:
            _close_all(files)
        return failed

    def discard(self) -> None:
        """Closes every descriptor taken, fsyncing nothing (the round failed)."""
        files, self._files = list(self._files.values()), {}
        _close_all(files)


def _close_all(files: list[tuple[int, set[Hashable]]]) -> None:
    """Closes every descriptor, even after one fails to close (a dead mount)."""
    for fd, _owners in files:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def shared() -> Iterator[SharedSyncs]:
    """Collects the calling thread's :func:`fsync_soon` calls until the caller flushes
    them; what is left unflushed at the end is discarded, never silently synced."""
    syncs = SharedSyncs()
    _local.syncs = syncs
    try:
        yield syncs
    finally:
        _local.syncs = None
        syncs.discard()


def fsync_soon(fd: int) -> None:
    """fsyncs ``fd`` now, or with the round's other fsyncs inside :func:`shared`.
    Filesystems that cannot fsync a folder (EINVAL) are ignored, as by fsync_fd."""
    syncs: SharedSyncs | None = getattr(_local, "syncs", None)
    if syncs is not None:
        syncs.add(fd)
    else:
        fsync_fd(fd)


def fsync_dir_soon(path: str | os.PathLike[str]) -> None:
    """:func:`fsync_soon` of the folder at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_soon(fd)
    finally:
        os.close(fd)


__all__ = ["SharedSyncs", "fsync_dir_soon", "fsync_soon", "shared"]
