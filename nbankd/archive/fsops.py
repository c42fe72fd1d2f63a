"""Small filesystem operations the durable primitives are built from.

- :func:`rename_noreplace`: ``renameat2(RENAME_NOREPLACE)`` through glibc, the only
  way to move a directory into place without ever replacing an existing (empty)
  one. Raises :class:`NoReplaceUnsupported` where the kernel or filesystem lacks
  the flag (NFS, older kernels, some FUSE filesystems answer EINVAL or ENOSYS).
- :func:`remove_ours`: removes a staging leftover, file or tree, even one whose
  folders were already made read-only.
- :func:`open_below` / :func:`remove_ours_at`: a folder (or entry) below a trusted
  root opened without following any link on the way, and a removal relative to an
  open folder: how a repair acts on an archive whose folders anyone with write access
  may swap for links meanwhile.
- :func:`fsync_dir`: makes a directory's entries durable.
- :func:`link_noreplace`: gives a file a second name without ever replacing
  anything (link(2), or renameat2 where the filesystem has no hard links).
- :func:`publish_temp`: puts a complete, fsynced temporary file in place (renamed
  over its target, or linked without replacing) and fsyncs the folder: how every
  file written beside its target is published, small or streamed.
- :func:`write_atomic`: writes a small file whole or not at all (temp file, fsync,
  :func:`publish_temp`).
- :func:`append_durable`: appends a whole line to a log, cutting off a line a crash tore
  first; the data fsynced, and the folder too when the log is new.
- :func:`open_log`: opens a log (to append to or to read) only if it is a regular file:
  a FIFO, socket, device, folder or link at its path is refused (:class:`NotALog`),
  never written into nor waited on.

Every small durable file nbankd writes goes through one of the last two; a large
one written in a stream (a fetched copy, a zipped folder) is published by
:func:`publish_temp`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath

from nbankd.filekind import FileKind

AT_FDCWD = -100
RENAME_NOREPLACE = 1 << 0
#: errno values meaning "this kernel or filesystem cannot do RENAME_NOREPLACE"
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
#: errno values of link(2) meaning "no (more) hard links here": renameat2 is tried instead
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
)


class NoReplaceUnsupported(OSError):
    """renameat2(RENAME_NOREPLACE) is not available here (kernel, filesystem or libc)."""


class NotALog(OSError):
    """What a log's path names is not a regular file (a FIFO, socket, device, folder or
    symbolic link): nothing is written into it nor read from it. ``filename`` is the
    path, ``strerror`` says what is there; ``noun`` names that kind alone ("a FIFO").
    ``errno`` is ELOOP for a link (as ``O_NOFOLLOW`` answers), EINVAL for the others."""

    def __init__(self, path: str | os.PathLike[str], kind: FileKind) -> None:
        noun = "a folder" if kind is FileKind.DIRECTORY else f"a {kind.noun}"
        number = errno.ELOOP if kind is FileKind.SYMLINK else errno.EINVAL
        super().__init__(number, f"it is {noun}, not a regular file", os.fspath(path))
        self.noun = noun


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """libc's renameat2, looked up on first use among the symbols this process already
    has (``dlopen(NULL)``: no ``ldconfig`` child, as ``ctypes.util.find_library`` would
    start on every command); None where libc lacks it (glibc before 2.28)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Renames ``src`` to ``dst`` atomically, failing with FileExistsError if ``dst`` exists.

    Unlike rename(2), never replaces anything, not even an empty directory.
    Raises NoReplaceUnsupported where the flag is not supported.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        raise NoReplaceUnsupported(errno.ENOSYS, "renameat2 is not available in this libc")
    rc = renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        raise NoReplaceUnsupported(err, f"renameat2(RENAME_NOREPLACE): {os.strerror(err)}", dst)
    raise OSError(err, os.strerror(err), os.fspath(dst))


def rename_noreplace_at(src_dir: int, src_name: bytes, dst_dir: int, dst_name: bytes) -> None:
    """:func:`rename_noreplace` between two open folders (names, never paths)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        raise NoReplaceUnsupported(errno.ENOSYS, "renameat2 is not available in this libc")
    if renameat2(src_dir, src_name, dst_dir, dst_name, RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        raise NoReplaceUnsupported(err, f"renameat2(RENAME_NOREPLACE): {os.strerror(err)}")
    raise OSError(err, os.strerror(err), os.fsdecode(dst_name))


def move_noreplace_at(src_dir: int, src_name: bytes, dst_dir: int, dst_name: bytes) -> None:
    """Moves an entry between two open folders of one filesystem, never replacing
    anything, and fsyncs both folders. Raises FileExistsError if ``dst_name`` exists.

    One atomic renameat2(RENAME_NOREPLACE) where supported, for files too: ``link()``
    would need to own or read the file (``fs.protected_hardlinks``), which an
    unreadable input is not. Where the filesystem refuses the flag (NFS, SSHFS),
    files move by link() + unlink(); a folder is refused (NoReplaceUnsupported),
    never moved by a plain rename that could replace an empty folder.
    """
    try:
        rename_noreplace_at(src_dir, src_name, dst_dir, dst_name)
    except NoReplaceUnsupported:
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise
        os.link(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        os.unlink(src_name, dir_fd=src_dir)
    fsync_fd(dst_dir)
    if src_dir != dst_dir:
        fsync_fd(src_dir)


def fsync_fd(fd: int) -> None:
    """fsync of an open folder; filesystems that cannot (EINVAL) are ignored."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise


def remove_ours(path: str | os.PathLike[str]) -> None:
    """Removes a file or directory tree nbankd made itself; missing paths are fine.

    Folders inside a tree are made writable first, so a tree whose modes were already
    set read-only can still be removed by its owner. Symbolic links are not followed.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    for dirpath, dirnames, _files in os.walk(path):
        for d in [dirpath, *(os.path.join(dirpath, n) for n in dirnames)]:
            dst = os.lstat(d)
            if stat.S_ISDIR(dst.st_mode) and (dst.st_mode & 0o700) != 0o700:
                os.chmod(d, stat.S_IMODE(dst.st_mode) | 0o700)
    if (st.st_mode & 0o700) != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
    shutil.rmtree(path)


#: an open folder, never through a link
DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_below(root: str | os.PathLike[str], rel: PurePath, *, last: int = DIR_NOFOLLOW) -> int:
    """Opens ``root/rel``: ``root`` as given (trusted: the archive's configured path),
    then each component of ``rel`` from the folder before it, never following a link
    (the last with the flags ``last``; default: a folder). A component that is a link
    raises OSError (ELOOP, or ENOTDIR for a folder), so a folder swapped for a link
    never leads the caller elsewhere. Returns the descriptor; ``rel`` must be relative,
    without ``..``."""
    parts = rel.parts
    if rel.is_absolute() or ".." in parts:
        raise ValueError(f"'{rel}' is not a path below a folder")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            nxt = os.open(part, last if i == len(parts) - 1 else DIR_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_ours_at(dir_fd: int, name: str) -> None:
    """:func:`remove_ours` of the entry ``name`` of the open folder ``dir_fd``: a file
    (or link) unlinked, a tree removed from descriptors (its read-only folders made
    writable first), never following a link; a missing entry is fine."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    top = _open_own_dir(dir_fd, name, st)
    try:
        _writable_tree(top)
    finally:
        os.close(top)
    shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based here: links are not followed


def _writable_tree(fd: int) -> None:
    """Gives the open folder ``fd`` and every folder below it its owner's rwx, so that
    its entries can be removed; walks from descriptors, never through a link."""
    st = os.fstat(fd)
    if (st.st_mode & 0o700) != 0o700:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    for entry in os.scandir(fd):
        if entry.is_dir(follow_symlinks=False):
            try:
                sub = _open_own_dir(fd, entry.name, entry.stat(follow_symlinks=False))
            except ValueError:
                continue  # swapped for a link meanwhile: removed as a link
            try:
                _writable_tree(sub)
            finally:
                os.close(sub)


def _open_own_dir(dir_fd: int, name: str, st: os.stat_result) -> int:
    """Opens the folder ``name`` of ``dir_fd`` (``st``: its status, read before)
    without following a link; a folder of ours we may not read (mode 000) is given
    its owner's rwx first, by a change that never follows a link (ValueError if the
    entry is a link by then)."""
    try:
        return os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)
    except PermissionError:
        if os.geteuid() == 0 or st.st_uid != os.geteuid():
            raise
    os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dir_fd, follow_symlinks=False)
    return os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes a directory's entries durable. Filesystems that cannot (EINVAL) are ignored."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def link_noreplace(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dir_fd: int | None = None
) -> None:
    """Gives the file ``src`` the name ``dst`` without ever replacing anything
    (FileExistsError if ``dst`` exists); with ``dir_fd``, both are names in that open
    folder. Where the filesystem has no hard links, ``src`` is renamed to ``dst`` by
    :func:`rename_noreplace` instead, so ``src`` may be gone afterwards."""
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        return
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    if dir_fd is None:
        rename_noreplace(src, dst)
    else:
        rename_noreplace_at(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst))


def publish_temp(
    tmp: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    replace: bool,
    dir_fd: int | None = None,
) -> None:
    """Puts the complete temporary file ``tmp`` (written and fsynced by the caller, in
    ``target``'s folder) at ``target``, then fsyncs that folder.

    With ``replace`` it is renamed over ``target``; without, it is linked to it
    (:func:`link_noreplace`: FileExistsError if ``target`` exists, ``tmp`` then left
    for the caller to remove) and the temporary name is dropped. With ``dir_fd``, both
    are names in that open folder.
    """
    if replace:
        os.replace(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        link_noreplace(tmp, target, dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):  # renamed, not linked
            os.unlink(tmp, dir_fd=dir_fd)
    if dir_fd is None:
        fsync_dir(Path(target).parent)
    else:
        fsync_fd(dir_fd)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
) -> None:
    """Writes ``path`` whole or not at all, durably.

    The data goes to a new temporary file in the same folder, which gets ``mode`` and
    (when allowed: root) ``owner`` (uid, gid), is fsynced, then renamed over ``path``
    or, with ``replace=False``, linked to it (FileExistsError if ``path`` exists:
    nothing is ever overwritten); then the folder is fsynced. On any error the
    temporary file is removed and ``path`` is as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None:
                with contextlib.suppress(PermissionError):  # not root: the file stays ours
                    os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        publish_temp(tmp, path, replace=replace)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


#: the longest torn tail :func:`append_durable` cuts off: far longer than any line it
#: writes (a receipt's paths are at most PATH_MAX bytes, six characters each escaped);
#: a longer run of bytes without a newline is not a line of ours and is kept
TORN_TAIL_MAX = 1 << 20


#: how a log is opened whatever it is opened for: never through a link, never waiting
#: (a FIFO with no writer, a device), never becoming a controlling terminal
_LOG_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
#: what open(2) answers, with ``_LOG_FLAGS``, for a path naming no regular file: a
#: symbolic link, a socket, a folder
_NOT_A_FILE_ERRNOS = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR})


def _not_a_log(path: str | os.PathLike[str], mode: int) -> NotALog:
    return NotALog(path, FileKind.of_mode(mode))


def open_log(path: str | os.PathLike[str], flags: int, mode: int = 0o640) -> int:
    """A blocking descriptor on the log at ``path``, opened with ``flags`` (``O_RDONLY``,
    or ``O_RDWR | O_APPEND | O_CREAT``) and ``mode`` for one it creates; the caller
    closes it. Anything but a regular file at ``path`` raises :class:`NotALog`: looked
    at before opening (a device is never opened), opened without waiting
    (``O_NONBLOCK``: a FIFO would wait for a writer, or take a receipt as if it were
    the log) and without following a link, and looked at again on the descriptor."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        pass  # made by ``O_CREAT``, or not found by open(2) below
    else:
        if not stat.S_ISREG(before.st_mode):
            raise _not_a_log(path, before.st_mode)
    try:
        fd = os.open(path, flags | _LOG_FLAGS, mode)
    except OSError as err:
        now = None
        if err.errno in _NOT_A_FILE_ERRNOS:  # swapped in since the look above
            with contextlib.suppress(OSError):
                now = os.lstat(path)
        if now is not None and not stat.S_ISREG(now.st_mode):
            raise _not_a_log(path, now.st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped in between the look and the open
            raise _not_a_log(path, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_durable(
    path: str | os.PathLike[str],
    line: bytes,
    *,
    mode: int = 0o640,
    owner: tuple[int, int] | None = None,
    sync: Callable[[int], None] = os.fsync,
) -> None:
    """Appends ``line`` (ending in a newline) to the log at ``path``, durably (``sync``:
    how the log's data is fsynced, e.g. with a round's others).

    Appenders take turns (an exclusive ``flock`` on the log, across threads and
    processes). A last line without its newline (a crash, or a full disk, cut an
    append short) is cut off first: it was never a whole line, and its append runs
    again in full (were it ended instead, a line cut just before its newline would
    become a whole line, and the rerun would log it twice). A write that fails takes
    back what it wrote, for the same reason. A log this call creates gets ``mode`` and
    (when allowed: root) ``owner``, and its folder is fsynced; anything but a regular
    file at ``path`` (a link, a FIFO, a socket, a device) is refused, unwritten
    (:class:`NotALog`, by :func:`open_log`).
    """
    if not line.endswith(b"\n"):
        raise ValueError("a log line ends with a newline")
    path = Path(path)
    fd = open_log(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, mode)
    try:
        # released below, explicitly: ``sync`` may keep a duplicate of ``fd`` open
        # (a round's fsyncs), which would otherwise hold the lock until then
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        created = size == 0  # new, or empty: its folder entry is fsynced too
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size = _without_torn_tail(fd, size)
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # not a line of ours: kept, ended
        if created and owner is not None:
            with contextlib.suppress(PermissionError):  # not root: the file stays ours
                os.fchown(fd, owner[0], owner[1])
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):  # no part of the line is left behind
                os.ftruncate(fd, size)
            raise
        sync(fd)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def _without_torn_tail(fd: int, size: int) -> int:
    """Cuts off the bytes after the last newline of the log open at ``fd`` (``size``
    bytes long) when they are no more than :data:`TORN_TAIL_MAX`; returns its size. A
    log that cannot be cut (append-only, ``chattr +a``) keeps them (the caller ends
    the torn line)."""
    start = max(0, size - TORN_TAIL_MAX - 1)
    tail = os.pread(fd, size - start, start)
    newline = tail.rfind(b"\n")
    if newline < 0 and start > 0:
        return size  # too long to be a torn line of ours
    cut = start + newline + 1
    try:
        os.ftruncate(fd, cut)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EINVAL):
            raise
        return size  # an append-only log (chattr +a): the torn line is ended instead
    return cut


__all__ = [
    "DIR_NOFOLLOW",
    "NoReplaceUnsupported",
    "NotALog",
    "append_durable",
    "fsync_dir",
    "fsync_fd",
    "link_noreplace",
    "move_noreplace_at",
    "open_below",
    "open_log",
    "publish_temp",
    "remove_ours",
    "remove_ours_at",
    "rename_noreplace",
    "rename_noreplace_at",
    "write_atomic",
]
