"""Every change nbankd makes in an inbox, walked from one descriptor of the inbox folder.

Any writer of an inbox can swap a folder for a symbolic link at any instant, so a
path is never resolved twice: :class:`InboxFS` opens the inbox folder once, then
reaches every folder below it component by component with
``O_DIRECTORY | O_NOFOLLOW`` (``openat``), and moves and removes entries by name
within those open folders (``renameat2(RENAME_NOREPLACE)``, ``unlinkat``). A link
or a non-folder anywhere on the way raises :class:`Escape`; nothing is followed.

The work folder (``.nbank``) and the rejected folder are checked every time they
are opened: real folders on the inbox's filesystem and, when the daemon recorded
them at start (:func:`prepare_folders`), the same device and inode. A folder
that differs raises :class:`Tampered`: the inbox's deposits wait, named in
``nbankctl status``, and nothing is followed into the replacement. Where the
filesystem numbers folders anew at each mount (SSHFS), a work folder that holds the
daemon's token (:mod:`nbankd.deposit.folderproof`) is its own all the same, and a
renumbered rejected folder is accepted beside it while it belongs to the user it
belonged to at start: the inbox was mounted again, not tampered with.

Code that works on paths (copying, hashing, reading a sidecar) gets a path
through the open descriptor, ``/proc/self/fd/N/NAME`` (:meth:`InboxFS.at`), valid
while the :class:`InboxFS` is open: the kernel resolves it to the folder already
opened, never to whatever took its name since.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from nbankd import errors
from nbankd.archive import fsops, syncs
from nbankd.archive.fsops import DIR_NOFOLLOW
from nbankd.deposit import folderproof
from nbankd.names import WORK_DIR_NAME, printable

DIR_FLAGS = DIR_NOFOLLOW
FolderId = tuple[int, int]


class Escape(errors.NbankdError):
    """A folder on the way to an entry is a link or not a folder: never followed."""

    code = "inbox-changed"
    transient = True


class Tampered(errors.NbankdError):
    """The work or rejected folder is not the folder the daemon recorded."""

    code = "inbox-tampered"
    transient = True


#: what to do about :class:`Tampered` in the folder of a manual deposit (``nbankctl
#: deposit``): its next try makes the folder again, no nbankd restart needed
MANUAL_TAMPERED_HINT = (
    "put the original folder back, or move what took its place aside: the deposit's next "
    "try (the next `nbankctl deposit`, or the daemon's own) makes a new one"
)


#: errno values of a change in an inbox (a move, a removal, a reason written) that an
#: administrator fixes: the inbox's own problem, told against the inbox, never the archive
WRITE_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ESTALE,
        errno.ENOTCONN,
    }
)


def write_fix(number: int | None, folders: Sequence[Path]) -> str:
    """What to fix when a change in ``folders`` of an inbox failed with ``number``."""
    shown = " and ".join(printable(str(f)) for f in folders)
    if number == errno.EROFS:
        return f"mount the filesystem of {shown} read-write again"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return f"free space (or raise the quota) on the filesystem of {shown}"
    if number in (errno.EACCES, errno.EPERM):
        return (
            f"give the daemon's user write permission on {shown} again (owner, mode; "
            "an immutable attribute: chattr -i)"
        )
    return f"check the disk or mount {shown} is on"


def write_error(err: OSError, doing: str, folders: Sequence[Path]) -> errors.InboxNotWritable:
    """The inbox's error for a change in it (``doing``: what was being done, naming the
    input and the inbox folder) that failed with ``err``. The fix is in its message too:
    a waiting item keeps its message (status, explain), not its hint."""
    fix = write_fix(err.errno, folders)
    return errors.InboxNotWritable(
        f"cannot {doing}: {err.strerror or err}; {fix}",
        hint=f"{fix}; the input waits where it is, nothing is lost, and the step is tried again",
    )


@contextlib.contextmanager
def writing(doing: str | Callable[[], str], folders: Sequence[Path]) -> Iterator[None]:
    """Changes in an inbox's ``folders``: an OSError of :data:`WRITE_ERRNOS` raised
    inside becomes :class:`~nbankd.errors.InboxNotWritable` (see :func:`write_error`);
    wrap only calls on the inbox's side, never the archive's. ``doing`` may be a
    function making the words, called only on such an error (every deposit's release
    passes here: nothing is formatted for the common case)."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        words = doing if isinstance(doing, str) else doing()
        raise write_error(err, words, folders) from err


def prove_folders(
    root: Path, *, work: str, work_id: FolderId, rejected: str, rejected_id: FolderId
) -> tuple[str, int]:
    """Leaves a token in the inbox's work folder, the one :func:`prepare_folders` made
    and recorded as ``work_id`` (private to the daemon), or keeps the one it holds, and
    returns it with the uid owning the rejected folder recorded as ``rejected_id``:
    see :mod:`nbankd.deposit.folderproof`. Raises Tampered if either was replaced,
    OSError if the token cannot be written (a full filesystem)."""
    with InboxFS(
        root, work=work, rejected=rejected, work_id=work_id, rejected_id=rejected_id
    ) as fs:
        return folderproof.leave(fs.work), os.fstat(fs.rejected).st_uid


def prepare_folders(
    root: Path, *, work: str, rejected: str, owner: int | None = None
) -> tuple[FolderId, FolderId]:
    """Makes the inbox's work (mode 0700) and rejected folders where missing, walking
    from the inbox folder without following a link, and returns their (device,
    inode): the identities every later use is checked against. ConfigError naming
    the folder when one is a link, not a folder, on another filesystem, or (the
    work folder, with ``owner``) not the daemon's user's."""
    try:
        fs = InboxFS(root, work=work, rejected=rejected)
    except OSError as err:
        if errors.out_of_descriptors(err):
            raise errors.open_file_limit(err, f"opening inbox {root}") from err
        raise errors.ConfigError(f"cannot open inbox {root}: {err.strerror or err}") from err
    with fs:
        ids = []
        for rel, mode in ((work, 0o700), (rejected, 0o777)):
            where = str(root / rel)
            try:
                fd = fs.folder(fs.root, rel, create=True, where=where, mode=mode)
            except (Escape, OSError) as err:
                if errors.out_of_descriptors(err):  # it holds the inputs in flight: kept
                    raise errors.open_file_limit(err, f"opening {where}") from err
                problem = f"cannot be used as the inbox's folder ({err})"
                with contextlib.suppress(OSError):
                    if not stat.S_ISDIR(os.lstat(where).st_mode):
                        problem = "exists but is not a folder (a file or a link)"
                raise errors.ConfigError(
                    f"{where} {problem}",
                    hint="move it away (nbankd never follows or deletes it), then start "
                    "nbankd again",
                ) from None
            st = os.fstat(fd)
            if st.st_dev != fs.dev:
                raise errors.ConfigError(
                    f"{where} is on another filesystem than its inbox",
                    hint="nothing may be mounted on the inbox's work or rejected folder",
                )
            if rel == work and owner is not None and st.st_uid != owner:
                raise errors.ConfigError(
                    f"{where} belongs to uid {st.st_uid}, not to the daemon's user ({owner})",
                    hint="move it aside; nbankd makes the folder itself at start",
                )
            if rel == work and stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # private: no group access, no setgid from the inbox
            ids.append((st.st_dev, st.st_ino))
    return ids[0], ids[1]


def components(rel: bytes | str) -> list[bytes]:
    """The names of a relative path; Escape for ``..``, ``.`` or an absolute path."""
    raw = os.fsencode(rel)
    if raw.startswith(b"/"):
        raise Escape(f"{os.fsdecode(raw)!r} is not a relative path")
    parts = [p for p in raw.split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise Escape(f"{os.fsdecode(raw)!r} leaves its folder")
    return parts


class InboxFS:
    """The open inbox folder and the folders reached from it; a context manager."""

    def __init__(
        self,
        root: Path,
        *,
        work: str = WORK_DIR_NAME,
        rejected: str = "rejected",
        work_id: FolderId | None = None,
        rejected_id: FolderId | None = None,
        work_proof: str | None = None,
        rejected_owner: int | None = None,
    ) -> None:
        self.root_path = root
        self.work_rel = work
        self.rejected_rel = rejected
        self.work_id = work_id
        self.rejected_id = rejected_id
        self.work_proof = work_proof  # the token the daemon left in the work folder
        self.rejected_owner = rejected_owner  # the rejected folder's uid at start
        self._fds: list[int] = []
        self.root = self._keep(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        self.dev = os.fstat(self.root).st_dev
        self._work: int | None = None
        self._rejected: int | None = None

    def __enter__(self) -> InboxFS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def release(self, fd: int) -> None:
        """Closes a folder descriptor :meth:`folder` or :meth:`parent` handed out, before
        :meth:`close` (a long walk over many folders holds one at a time); the inbox's
        own descriptors (root, work, rejected) stay open."""
        if fd in (self.root, self._work, self._rejected) or fd not in self._fds:
            return
        self._fds.remove(fd)
        os.close(fd)

    # -- folders ------------------------------------------------------------------

    def folder(
        self, start: int, rel: bytes | str, *, create: bool = False, where: str, mode: int = 0o777
    ) -> int:
        """Opens ``rel`` below the open folder ``start``, one component at a time, never
        through a link (``create`` makes missing folders with ``mode`` less the umask).

        Only the last folder's descriptor is kept (until :meth:`close`); each one on
        the way is closed as soon as the next is open, so depth costs no descriptors.
        """
        fd = start
        try:
            for name in components(rel):
                nxt = self._open_below(fd, name, where, create=create, mode=mode)
                if fd != start:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != start:
                os.close(fd)
            raise
        return self._keep(fd) if fd != start else fd

    @staticmethod
    def _open_below(fd: int, name: bytes, where: str, *, create: bool, mode: int) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Escape(
                    f"{os.fsdecode(name)!r} on the way to {where} is a link or not a "
                    "folder; nbankd does not follow it",
                    hint="make it a plain folder again",
                ) from None
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=fd)
        return InboxFS._open_below(fd, name, where, create=False, mode=mode)

    def _checked(self, rel: str, expect: FolderId | None, what: str) -> int:
        where = os.path.join(self.root_path, rel)  # in messages (no Path made: every step)
        try:
            fd = self.folder(self.root, rel, where=where)
        except (Escape, FileNotFoundError) as err:
            raise Tampered(
                f"the {what} {where} was replaced or removed ({err}); deposits from this "
                "inbox wait",
                hint=f"put the original {what} back, or move the replacement aside and "
                "restart nbankd (which makes a new one)",
            ) from None
        st = os.fstat(fd)
        if rel == self.work_rel and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)  # the work folder stays private to the daemon
        if st.st_dev != self.dev or (
            expect is not None and (st.st_dev, st.st_ino) != expect and not self._proved(rel, fd)
        ):
            raise Tampered(
                f"the {what} {where} is not the folder nbankd made (another folder took its "
                "place); deposits from this inbox wait",
                hint=f"put the original {what} back, or move the replacement aside and "
                "restart nbankd",
            )
        return fd

    def _proved(self, rel: str, fd: int) -> bool:
        """Whether a folder whose numbers changed is still the daemon's (SSHFS numbers
        folders anew at a mount, and whenever the kernel forgets one): the work folder
        when it holds the token; the rejected folder when the work folder is the
        daemon's and it belongs to the user it belonged to at start (an inbox writer
        cannot make a folder of someone else's)."""
        if self.work_proof is None:
            return False
        if rel == self.work_rel:
            return folderproof.holds(fd, self.work_proof)
        try:
            self.work  # noqa: B018 - opening it is the check
        except Tampered:
            return False
        return self.rejected_owner is not None and os.fstat(fd).st_uid == self.rejected_owner

    @property
    def work(self) -> int:
        """The work folder, checked (see the module docstring)."""
        if self._work is None:
            self._work = self._checked(self.work_rel, self.work_id, "work folder")
        return self._work

    @property
    def rejected(self) -> int:
        """The rejected folder, checked (see the module docstring)."""
        if self._rejected is None:
            self._rejected = self._checked(self.rejected_rel, self.rejected_id, "rejected folder")
        return self._rejected

    def parent(self, rel: bytes | str, *, create: bool = False) -> tuple[int, bytes]:
        """(open folder, name) of an entry of the inbox at ``rel``."""
        return self._entry(self.root, self.root_path, rel, create)

    def rejected_parent(self, rel: bytes | str, *, create: bool = False) -> tuple[int, bytes]:
        """(open folder, name) of an entry of the rejected folder at ``rel``."""
        return self._entry(self.rejected, self.root_path / self.rejected_rel, rel, create)

    def _entry(self, start: int, shown: Path, rel: bytes | str, create: bool) -> tuple[int, bytes]:
        parts = components(rel)
        if not parts:
            raise Escape("an empty path names no entry")
        where = str(shown / os.fsdecode(rel))
        return self.folder(start, b"/".join(parts[:-1]), create=create, where=where), parts[-1]

    # -- entries ------------------------------------------------------------------

    @staticmethod
    def at(fd: int, name: bytes | str = b"") -> Path:
        """A path to ``name`` in the open folder ``fd``, resolved through the descriptor."""
        base = f"/proc/self/fd/{fd}"
        return Path(base, os.fsdecode(name)) if name else Path(base)

    @staticmethod
    def lstat(fd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def exists(fd: int, name: bytes) -> bool:
        return InboxFS.lstat(fd, name) is not None

    @staticmethod
    def move(src_fd: int, src: bytes, dst_fd: int, dst: bytes) -> None:
        """Moves without replacing anything (FileExistsError), folders fsynced."""
        fsops.move_noreplace_at(src_fd, src, dst_fd, dst)

    def take(
        self, src_fd: int, src: bytes, work_fd: int, token: bytes, *, told: syncs.Told = None
    ) -> None:
        """Moves an entry of the inbox into the work folder under a fresh ``token``.

        Only the daemon writes in its work folder, so where the filesystem refuses
        RENAME_NOREPLACE (NFS, SSHFS) a plain rename after checking ``token`` is free
        cannot replace anything; it also moves folders and files the daemon may not
        link (``fs.protected_hardlinks``). Both folders are fsynced (with the other
        fsyncs of a round: :mod:`nbankd.archive.syncs`).
        """
        try:
            fsops.rename_noreplace_at(src_fd, src, work_fd, token)
        except fsops.NoReplaceUnsupported:
            if self.exists(work_fd, token):
                raise FileExistsError(errno.EEXIST, "work name taken", os.fsdecode(token)) from None
            os.rename(src, token, src_dir_fd=src_fd, dst_dir_fd=work_fd)
        # before the claim's save; shared by a round's claims (``told``: how a failure
        # is reported, the move being done)
        syncs.fsync_soon(work_fd, told=told)
        syncs.fsync_soon(src_fd, told=told)

    @staticmethod
    def unlink(fd: int, name: bytes) -> bool:
        """Removes a non-folder entry; False if it was not there."""
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True
