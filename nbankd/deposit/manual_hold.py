"""A manual deposit's hold on the work folder beside its files, and the tidy-up after.

``nbankctl deposit`` makes ``.nbank/`` and ``nbank-rejected/`` beside the files it
deposits and removes them again once empty (:func:`tidy`). Several runs may use one
folder at once (two people depositing two files of one rig folder, each with their
own journal), so one run's tidy must never remove the work folder another run
planned with: that run's claim would find it gone and its file would wait.

The rule: every run holds a shared ``flock`` on the work folder itself from the
moment it makes it (before journaling) until it has finished driving its items
(:class:`Holds`), and :func:`tidy` removes anything only while it holds an
exclusive one, taken without waiting: a folder some run still holds stays, and
the last run to finish removes it. No lock file is made: the lock is on the work
folder, which is private to its owner (mode 0700), so no other user can open it to
block anyone. A run that makes or finds the work folder just as a tidy removes it
sees, once it holds the lock, that the name no longer names the folder it locked,
and makes it again (:meth:`Holds.prepare`). Where the filesystem has no ``flock`` for
folders (NFS refuses an exclusive lock on a folder; some FUSE mounts have none),
tidy cannot take its lock and removes nothing: an empty ``.nbank`` stays behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from nbankd import errors
from nbankd.archive.fsops import DIR_NOFOLLOW
from nbankd.deposit.manual import REJECTED_DIR, ManualInbox
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME

#: errno of a filesystem with no flock for folders: the run goes on without a hold
_NO_FLOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
#: how often a run makes its folders again when a tidy removed them meanwhile (each
#: time needs another run's tidy to finish in the instant between making and locking)
_ATTEMPTS = 5


def _same(root: int, name: str, expect: tuple[int, int] | None) -> bool:
    """Whether ``name`` in the open folder ``root`` is the folder ``expect`` names."""
    try:
        st = os.stat(name, dir_fd=root, follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == expect


def _lock(folder: Path, spec: InboxSpec) -> int | None:
    """A descriptor of ``folder``'s work folder holding a shared flock, once its work
    and rejected folders are the ones ``spec`` was prepared with (else None: a tidy
    removed them meanwhile; one made again under the same numbers is as good: the
    steps check those numbers); -1 where the filesystem has no flock for folders."""
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        work = os.open(WORK_DIR_NAME, DIR_NOFOLLOW, dir_fd=root)
    except FileNotFoundError:
        os.close(root)
        return None
    except BaseException:
        os.close(root)
        raise
    try:
        try:
            # waits only for a tidy's two rmdir calls: no one else takes it exclusively
            fcntl.flock(work, fcntl.LOCK_SH)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            os.close(work)
            return -1
        st = os.fstat(work)
        if (st.st_dev, st.st_ino) == spec.work_id and (
            _same(root, WORK_DIR_NAME, spec.work_id) and _same(root, REJECTED_DIR, spec.rejected_id)
        ):
            return work
        os.close(work)
        return None
    except BaseException:
        os.close(work)
        raise
    finally:
        os.close(root)


class Holds:
    """The work folders one run holds (see the module docstring); a context manager
    that lets them all go at its end."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> Holds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def prepare(self, inbox: ManualInbox) -> InboxSpec:
        """``inbox.spec(prepare=True)`` (its work and rejected folders made where
        missing, never through a link), its work folder held until :meth:`release`."""
        spec = inbox.spec(prepare=True)
        held = self._fds.get(inbox.folder)  # held already: one folder, other options
        if held is not None and _same_held(held, spec):
            return spec
        for _ in range(_ATTEMPTS):
            fd = _lock(inbox.folder, spec)
            if fd is not None:
                if fd >= 0:
                    self._let_go(inbox.folder)
                    self._fds[inbox.folder] = fd
                return spec
            spec = inbox.spec(prepare=True)  # a tidy removed them: made again
        return spec  # no hold: the steps check the folders and say what is wrong

    def spec_for_key(self, key: str) -> InboxSpec | None:
        """The inbox of an earlier run's item, prepared and held as :meth:`prepare`
        does (that run's tidy removed its folders once empty: a refusal needs them);
        where they cannot be made, the inbox as it is (its steps then say what is
        wrong with the folder)."""
        inbox = ManualInbox.from_key(key)
        if inbox is None:
            return None
        try:
            return self.prepare(inbox)
        except (OSError, errors.NbankdError):
            return inbox.spec()

    def _let_go(self, folder: Path) -> None:
        fd = self._fds.pop(folder, None)
        if fd is not None:
            os.close(fd)  # releases its flock

    def release(self) -> None:
        """Lets every folder go (before :func:`tidy`, which needs them free)."""
        for folder in list(self._fds):
            self._let_go(folder)


def _same_held(fd: int, spec: InboxSpec) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == spec.work_id


def _rmdir_own(root: int, name: str) -> None:
    """Removes ``name`` in ``root`` when it is an empty folder of this user's."""
    with contextlib.suppress(OSError):
        st = os.stat(name, dir_fd=root, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            os.rmdir(name, dir_fd=root)


def tidy(folder: Path) -> None:
    """Removes the work and rejected folders a manual deposit made, when empty, this
    user's, and held by no other run (an exclusive flock on the work folder, taken
    without waiting; where there is no work folder, no run uses the folder): an empty
    ``.nbank`` of another user is a daemon's work folder (the folder is one of its
    inboxes), which must stay."""
    try:
        root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            work = os.open(WORK_DIR_NAME, DIR_NOFOLLOW, dir_fd=root)
        except FileNotFoundError:
            _rmdir_own(root, REJECTED_DIR)
            return
        except OSError:
            return  # a link, or a folder this user cannot open: whose run it serves is unknown
        try:
            try:
                fcntl.flock(work, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another run holds it (or no flock here): everything stays
            st = os.fstat(work)
            if not _same(root, WORK_DIR_NAME, (st.st_dev, st.st_ino)):
                return  # removed and made again by another run since it was opened
            _rmdir_own(root, REJECTED_DIR)
            _rmdir_own(root, WORK_DIR_NAME)
        finally:
            os.close(work)
    finally:
        os.close(root)
