"""What must stay the same for an input to count as unchanged, and how it is read.

An :class:`Identity` is taken from one ``lstat``: of a file for a plain input, and
summed over a whole tree for a directory resource (:func:`tree_summary`). Folders
are listed through one descriptor each, opened without following links
(:func:`list_folder`; a tree's sub-folders each from its parent's descriptor), so
nothing outside the inbox is ever read.

A directory resource's identity summarises the whole tree
(:func:`tree_identity`): the folder's own device, inode, mode and owner; ``size`` the
total size of its regular files; ``mtime_ns``/``ctime_ns`` the largest over every
node (folders included, so creating, deleting or renaming anything changes them);
``nlink`` the number of nodes below the folder; and ``digest`` a BLAKE2b over every
node's (path, inode, size, mtimes, mode), so any change anywhere inside changes
the identity. Members the pipeline must never read (symlinks, hard links, FIFOs,
sockets, devices) and unreadable sub-folders are listed in ``Entry.problem``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from nbankd.heldfolders import HeldFolder, HeldFolders
from nbankd.mounts import MountKey, mount_key, other_mount
from nbankd.names import printable
from nbankd.watch.writers import MAX_DEPTH

#: folder levels a tree summary walks below its top: twice the deepest a deposit
#: copies or zips (:data:`~nbankd.watch.writers.MAX_DEPTH`), so every folder a deposit
#: could take is in its summary; a deeper one is refused by the copy anyway
SUMMARY_DEPTH = 2 * MAX_DEPTH

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Identity:
    """What must stay the same for a file to count as unchanged (guarantee 5).

    For a directory resource see :func:`tree_identity` for what each field sums up;
    ``digest`` is empty for everything else. Equality compares every field.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    mode: int
    uid: int
    digest: str = ""

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        """Builds the identity of one lstat (or fstat) result."""
        return cls(
            dev=_common(st.st_dev),
            ino=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            nlink=st.st_nlink,
            mode=_common(st.st_mode),
            uid=_common(st.st_uid),
        )

    def same_file(self, other: Identity) -> bool:
        """True when device, inode, size, mtime and ctime agree (guarantee 5's check)."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )


class Interner(Generic[T]):
    """Hands out one object for each distinct (equal, hashable, immutable) value, so
    the many records of a large inbox share them instead of each holding its own copy;
    forgets everything once it holds ``limit`` values (a bound, not a cache policy)."""

    def __init__(self, limit: int) -> None:
        self._known: dict[T, T] = {}
        self._limit = limit

    def __call__(self, value: T) -> T:
        """``value``, or an equal object handed out before."""
        known = self._known.get(value)
        if known is not None:
            return known
        if len(self._known) >= self._limit:
            self._known.clear()
        self._known[value] = value
        return value


#: device, mode and owner numbers: they repeat across files, each lstat makes new ints
_common: Interner[int] = Interner(1024)


class _Child:
    """One listed name and its lstat, taken while its folder was open."""

    __slots__ = ("_err", "_st")

    def __init__(self, st: os.stat_result | None, err: OSError | None) -> None:
        self._st, self._err = st, err

    def stat(self, *, follow_symlinks: bool = False) -> os.stat_result:
        if self._err is not None:
            raise self._err
        assert self._st is not None
        return self._st


def list_folder(folder: str, expect_ino: int | None = None) -> list[tuple[str, _Child]]:
    """Lists one folder completely and lstats what it holds, through one descriptor.

    A sub-folder (``expect_ino`` given: the inode its parent's listing showed) is
    opened without following a link and must still be that inode; otherwise it
    was swapped for another folder or a link since, and is reported as vanished
    (FileNotFoundError): a scan never lists anything outside its inbox.
    """
    return list(iter_folder(folder, expect_ino))


class OnAnotherMount(OSError):
    """A folder listed inside an inbox is a mount point (another filesystem or a bind
    mount): never entered."""


def iter_folder(
    folder: str,
    expect_ino: int | None = None,
    *,
    expect_id: tuple[int, int] | None = None,
    within: MountKey | None = None,
) -> Iterator[tuple[str, _Child]]:
    """:func:`list_folder` one child at a time, so a caller that keeps less than the
    lstat of each child never holds a whole large folder's lstats at once.
    ``expect_id`` (an inbox folder, which may be named through a configured link): the
    (device, inode) the folder opened must have, else it counts as vanished.
    ``within``: the mount the folder must be on, else :class:`OnAnotherMount` (EXDEV).

    The folder is opened (and checked) by this call, so the errors
    :func:`list_folder` raises for the folder itself are raised here; a listing
    error part-way is raised by the iteration. Iterate it to the end (or close it):
    the descriptor is closed then.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if expect_ino is not None:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(folder, flags)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileNotFoundError(err.errno, "replaced by a link", folder) from None
        raise
    try:
        st = os.fstat(fd)
        if expect_ino is not None and st.st_ino != expect_ino:
            raise FileNotFoundError(errno.ENOENT, "replaced since it was listed", folder)
        if expect_id is not None and (st.st_dev, st.st_ino) != expect_id:
            raise FileNotFoundError(errno.ENOENT, "replaced since it was checked", folder)
        if within is not None and other_mount(within, mount_key(fd, st)):
            raise OnAnotherMount(errno.EXDEV, "a mount point inside the inbox", folder)
    except BaseException:
        os.close(fd)
        raise
    return _children(fd)


def _children(fd: int) -> Iterator[tuple[str, _Child]]:
    try:
        yield from _children_of(fd)
    finally:
        os.close(fd)


def _children_of(fd: int) -> Iterator[tuple[str, _Child]]:
    """Each name in the open folder ``fd`` with its lstat; ``fd`` stays open."""
    with os.scandir(fd) as it:
        for child in it:
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as err:
                yield child.name, _Child(None, err)
            else:
                yield child.name, _Child(st, None)


def identity_of_path(path: Path | str) -> Identity:
    """The identity of ``path`` itself (lstat: a symlink is not followed).

    Raises :class:`OSError` (e.g. ``FileNotFoundError``) as ``os.lstat`` does.
    """
    return Identity.of(os.lstat(path))


@dataclass(frozen=True, slots=True)
class TreeSummary:
    """:func:`tree_summary`'s answer: the tree's identity and what is wrong inside.

    ``unsafe``, ``unreadable``, ``too_deep`` and ``mounts`` hold paths relative to the
    folder; ``mounts`` names the folders on another mount than the top's ("": the top
    itself is not on the mount it had to be on).
    """

    identity: Identity
    files: int
    unsafe: tuple[str, ...]
    unreadable: tuple[str, ...]
    too_deep: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()

    @property
    def problem(self) -> str | None:
        """A one-line description of the unsafe, unreadable and too deep members, or None."""
        parts = []
        if self.unsafe:
            parts.append(f"{len(self.unsafe)} member(s) that are not plain files or folders")
            parts[-1] += f" (first: {printable(self.unsafe[0])})"
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable folder(s)")
            parts[-1] += f" (first: {printable(self.unreadable[0])})"
        if self.too_deep:
            parts.append(f"folders nested more than {SUMMARY_DEPTH} levels deep")
            parts[-1] += f" (first: {printable(self.too_deep[0])})"
        if self.mounts:
            parts.append(f"{len(self.mounts)} mount point(s) of another filesystem")
            parts[-1] += f" (first: {printable(self.mounts[0] or '.')})"
        return "; ".join(parts) or None


def tree_summary(
    path: Path | str, *, dir_fd: int | None = None, within: MountKey | None = None
) -> TreeSummary:
    """Summarises a folder and everything under it without following symlinks.

    ``path`` is looked up in the open folder ``dir_fd`` when one is given. Every
    folder is opened from its parent's descriptor (never by a path, so no path
    length limits the walk and a folder swapped for a link on the way is never
    entered), at most :data:`SUMMARY_DEPTH` levels below the top; deeper folders are
    listed in ``too_deep``, not entered. A folder on another mount than the top's (or,
    with ``within``, the top itself on another mount than that) is named in ``mounts``
    and not entered. See the module docstring for what each identity field means.
    Raises :class:`OSError` if ``path`` itself cannot be lstat'ed or opened
    (FileNotFoundError when it was replaced since its lstat).
    """
    top = os.fsdecode(path)
    st = os.stat(top, dir_fd=dir_fd, follow_symlinks=False)
    digest = hashlib.blake2b(digest_size=16)
    size = 0
    files = 0
    nodes = 0
    mtime = st.st_mtime_ns
    ctime = st.st_ctime_ns
    unsafe: list[str] = []
    unreadable: list[str] = []
    too_deep: list[str] = []
    mounts: list[str] = []
    top_mount = within
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    # folders to list, last in first out: (relative path, name, inode, depth, parent)
    stack: list[tuple[str, str, int, int, HeldFolder | None]] = [("", top, st.st_ino, 0, None)]
    with HeldFolders() as opened:
        while stack:
            rel, name, ino, depth, parent = stack.pop()
            where = dir_fd if parent is None else parent.fd
            try:
                fd = os.open(name, flags, dir_fd=where)
            except OSError as err:
                fd = -1
                failed: OSError | None = err
            else:
                failed = None
            finally:
                if parent is not None:
                    opened.opened_from(parent)
            if failed is not None:
                if failed.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    if not rel:
                        raise FileNotFoundError(errno.ENOENT, "replaced since it was seen", top)
                    continue  # vanished since its parent was listed (its mtime moved)
                unreadable.append(rel)
                digest.update(b"unreadable\0" + os.fsencode(rel) + b"\0")
                continue
            here = opened.hold(fd)
            try:
                fst = os.fstat(fd)
                want = (st.st_dev, st.st_ino) if not rel else (fst.st_dev, ino)
                if (fst.st_dev, fst.st_ino) != want:
                    raise FileNotFoundError(errno.ENOENT, "replaced since it was seen", top)
                key = mount_key(fd, fst)
                if top_mount is None:
                    top_mount = key
                elif other_mount(top_mount, key):  # never entered: not the folder's own
                    mounts.append(rel)
                    opened.close(here)
                    continue
                children = list(_children_of(fd))
            except FileNotFoundError:
                opened.close(here)
                if not rel:
                    raise
                continue  # replaced or gone since its parent was listed
            except OSError:
                opened.close(here)
                unreadable.append(rel)
                digest.update(b"unreadable\0" + os.fsencode(rel) + b"\0")
                continue
            for cname, child in children:
                crel = f"{rel}/{cname}" if rel else cname
                try:
                    cst = child.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    unreadable.append(crel)
                    continue
                nodes += 1
                mtime = max(mtime, cst.st_mtime_ns)
                ctime = max(ctime, cst.st_ctime_ns)
                digest.update(
                    b"%s\0%d %d %d %d %d\n"
                    % (
                        os.fsencode(crel),
                        cst.st_ino,
                        cst.st_size,
                        cst.st_mtime_ns,
                        cst.st_ctime_ns,
                        cst.st_mode,
                    )
                )
                if stat.S_ISDIR(cst.st_mode):
                    if depth >= SUMMARY_DEPTH:
                        too_deep.append(crel)
                        continue
                    opened.below(here)  # kept open until this sub-folder is opened from it
                    stack.append((crel, cname, cst.st_ino, depth + 1, here))
                elif stat.S_ISREG(cst.st_mode) and cst.st_nlink == 1:
                    size += cst.st_size
                    files += 1
                else:
                    unsafe.append(crel)
            opened.listed(here)
    identity = Identity(
        dev=st.st_dev,
        ino=st.st_ino,
        size=size,
        mtime_ns=mtime,
        ctime_ns=ctime,
        nlink=nodes,
        mode=st.st_mode,
        uid=st.st_uid,
        digest=digest.hexdigest(),
    )
    return TreeSummary(
        identity,
        files,
        tuple(sorted(unsafe)),
        tuple(sorted(unreadable)),
        tuple(sorted(too_deep)),
        tuple(sorted(mounts)),
    )


def tree_identity(path: Path | str, *, dir_fd: int | None = None) -> Identity:
    """The identity of a directory resource: changes when anything inside changes."""
    return tree_summary(path, dir_fd=dir_fd).identity
