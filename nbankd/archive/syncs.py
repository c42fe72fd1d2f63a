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

What a step may only do once such an fsync is done (dropping a staged copy's name
once its link in a stub folder is durable) it hands to :func:`after_syncs`: inside a
round it runs after the flush, and only for a step whose fsyncs all succeeded; the
fsyncs it asks for in turn are flushed before the round's commit too (one more pass,
each file once again). Outside a round it runs at once, after the plain fsyncs
before it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Hashable, Iterator

from nbankd import seams
from nbankd.archive.fsops import fsync_fd
from nbankd.streaming import start_writeback

#: what an fsync's failure is told as (its caller's error: an inbox's, say), or None
Told = Callable[[OSError], Exception] | None

_local = threading.local()


class AfterSyncsFailed(OSError):
    """An action of :func:`after_syncs` failed in a round's flush (not an fsync)."""


class SharedSyncs:
    """The fsyncs the steps of a round asked for, each file once (see the module)."""

    def __init__(self) -> None:
        #: (device, inode) -> (our duplicate of a descriptor, the owners who asked, each
        #: with how its failure is told)
        self._files: dict[tuple[int, int], tuple[int, dict[Hashable, Told]]] = {}
        #: what runs once the fsyncs are done: (owner, action), in the order asked
        self._after: list[tuple[Hashable, Callable[[], None]]] = []
        #: whose step is running: failures are reported per owner
        self.owner: Hashable = None

    def add(self, fd: int, told: Told = None) -> None:
        """Takes an fsync of the open file ``fd`` for :meth:`flush` (``told``: how its
        failure is reported to the current owner)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        held = self._files.get(key)
        if held is None:
            held = self._files[key] = (os.dup(fd), {})
        if held[1].get(self.owner) is None:
            held[1][self.owner] = told

    def then(self, action: Callable[[], None]) -> None:
        """Takes ``action`` to run after the fsyncs of :meth:`flush`, as the current owner."""
        self._after.append((self.owner, action))

    def __len__(self) -> int:
        return len(self._files)

    def flush(self) -> dict[Hashable, Exception]:
        """fsyncs every file taken (data files handed to writeback first), then runs the
        actions taken with :meth:`then` of every owner whose fsyncs succeeded, then
        fsyncs what those actions asked for, and so on until nothing is left; returns
        the owners whose fsync or action failed, with the error: an OSError (or what the
        fsync's ``told`` made of it), or for an action that raised anything else (a bug)
        that exception, failing only its owner. Every descriptor is closed."""
        failed: dict[Hashable, Exception] = {}
        while True:
            self._sync_all(failed)
            after, self._after = self._after, []
            if not after:
                return failed
            seams.reached("after-round-fsyncs")
            for owner, action in after:
                if owner in failed:
                    continue  # its step is not done: it runs again, action and all
                self.owner = owner
                try:
                    action()
                except OSError as err:
                    failed[owner] = AfterSyncsFailed(err.errno, err.strerror or str(err))
                except Exception as err:  # a bug: its owner fails, the others go on
                    failed[owner] = err

    def _sync_all(self, failed: dict[Hashable, Exception]) -> None:
        """fsyncs every file taken so far into ``failed`` (the first error per owner)."""
        files, self._files = list(self._files.values()), {}
        try:
            for fd, _owners in files:
                with contextlib.suppress(OSError):  # only a head start; fsync decides
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        start_writeback(fd, 0, 0)
            for fd, owners in files:
                try:
                    fsync_fd(fd)  # a filesystem that cannot (EINVAL) is ignored there
                except OSError as err:
                    for owner, told in owners.items():
                        if owner not in failed:
                            failed[owner] = err if told is None else told(err)
        finally:
            _close_all(files)

    def discard(self) -> None:
        """Closes every descriptor taken, fsyncing nothing and running no action (the
        round failed)."""
        files, self._files = list(self._files.values()), {}
        self._after = []
        _close_all(files)


def _close_all(files: list[tuple[int, dict[Hashable, Told]]]) -> None:
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


def fsync_soon(fd: int, *, told: Told = None) -> None:
    """fsyncs ``fd`` now, or with the round's other fsyncs inside :func:`shared`.
    Filesystems that cannot fsync a folder (EINVAL) are ignored, as by fsync_fd.
    ``told`` makes the error its failure is reported as (now: raised; in a round: the
    step's failure), e.g. an inbox's own error for a folder of the inbox."""
    syncs: SharedSyncs | None = getattr(_local, "syncs", None)
    if syncs is not None:
        syncs.add(fd, told)
        return
    try:
        fsync_fd(fd)
    except OSError as err:
        if told is None:
            raise
        raise told(err) from err


def after_syncs(action: Callable[[], None]) -> None:
    """Runs ``action`` once the fsyncs asked for before it are done: now, or inside
    :func:`shared` after the round's flush, only if the calling step's fsyncs all
    succeeded (an OSError it raises fails that step, to be run again)."""
    syncs: SharedSyncs | None = getattr(_local, "syncs", None)
    if syncs is not None:
        syncs.then(action)
    else:
        action()


def fsync_dir_soon(path: str | os.PathLike[str]) -> None:
    """:func:`fsync_soon` of the folder at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_soon(fd)
    finally:
        os.close(fd)


__all__ = [
    "AfterSyncsFailed",
    "SharedSyncs",
    "after_syncs",
    "fsync_dir_soon",
    "fsync_soon",
    "shared",
]
