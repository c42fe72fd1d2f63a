"""Emptying a tree its writer may still change (a deposited folder input in an
inbox's work folder), from descriptors only, never following a link:
:func:`remove_tree_at` removes it, :func:`unremovable_below` says beforehand whether
this process could.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from nbankd import errors, fileflags
from nbankd.archive.fsops import DIR_NOFOLLOW, _open_own_dir
from nbankd.heldfolders import HeldFolder, HeldFolders
from nbankd.mounts import mount_key, other_mount

__all__ = ["Unremovable", "remove_tree_at", "unremovable_below"]


#: how many times :func:`remove_tree_at` finds a folder it emptied filled again (a
#: writer who kept a descriptor of it) before it gives up (ENOTEMPTY)
_REFILLS = 1000


def _unlink_unless_dir(dir_fd: int, name: bytes, shown: Callable[[], str] | None = None) -> bool:
    """Unlinks the entry ``name`` of ``dir_fd`` unless it is a folder (False); a link
    is unlinked, never followed; a missing entry counts as removed. ``shown`` makes its
    path, for the error of one with the immutable or append-only attribute."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        return False
    except PermissionError:
        # unlink(2) of a folder answers EISDIR on Linux, EPERM by POSIX: tell them apart
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            return False
        _refuse_if_protected(dir_fd, name, shown() if shown else os.fsdecode(name))
        raise
    return True


def _refuse_if_protected(dir_fd: int, name: bytes, shown: str) -> None:
    """Raises InputProtected when ``name`` (in the open folder ``dir_fd``; ``shown``,
    its path in the tree), or that folder, carries the immutable or append-only
    attribute (why it cannot go)."""
    flag = fileflags.protected_at(dir_fd, name)
    what = f"'{shown}'"
    if flag is None:
        flag = fileflags.protected(dir_fd)
        what = f"the folder holding '{shown}'"
    if flag is not None:
        raise errors.InputProtected(
            f"{what} in the folder being removed is {flag}: no user may remove it",
            hint="clear the attribute (chattr -i -a); the removal goes on then",
        )


def _shown(
    top: str, stack: list[tuple[int, bytes, int, list[bytes] | None]], child: bytes = b""
) -> str:
    """The path of the folder on top of ``stack`` (or of its entry ``child``), the tree's
    top shown as ``top``, for messages."""
    parts = [top, *(os.fsdecode(e[1]) for e in stack[1:])]
    if child:
        parts.append(os.fsdecode(child))
    return "/".join(parts)


def _open_subdir(dir_fd: int, name: bytes) -> int | None:
    """The folder ``name`` of ``dir_fd`` opened without following a link, made
    writable when it is ours (so that its entries can be removed), by its descriptor;
    None when it is no folder any more (swapped for a link or a file, or gone)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            return None
        fd = _open_own_dir(dir_fd, os.fsdecode(name), st)
    except (FileNotFoundError, NotADirectoryError, ValueError, NotImplementedError):
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EOPNOTSUPP):
            return None
        raise
    try:
        fst = os.fstat(fd)
        if fst.st_uid == os.geteuid() and (fst.st_mode & 0o700) != 0o700:
            os.fchmod(fd, stat.S_IMODE(fst.st_mode) | 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_entry(dir_fd: int, name: bytes, fd: int) -> bool:
    """Whether the entry ``name`` of ``dir_fd`` is the open file ``fd``."""
    try:
        return os.path.samestat(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), os.fstat(fd))
    except FileNotFoundError:
        return False


def remove_tree_at(dir_fd: int, name: bytes | str, *, shown: str | None = None) -> None:
    """Removes the entry ``name`` of the open folder ``dir_fd``, a file or a whole tree,
    from descriptors only: every folder is opened from the one above it without
    following a link, listed once and emptied through its descriptor, and each mode
    change (a folder of ours made writable) is made on a descriptor, never on a path. A
    folder someone swaps for a link meanwhile (a writer who kept a descriptor of a
    folder of the tree) is unlinked as a link; one its writer moved out of the tree
    after it was opened is left where it now is (checked before it is listed): nothing
    outside the tree is read, changed or removed. Iterative: one descriptor per level,
    no recursion; each folder listed again only when its removal finds it filled again
    (at most :data:`_REFILLS` times in all, then ENOTEMPTY). A missing entry is fine.
    ``shown``: the tree's path in messages (default: ``name``)."""
    name = os.fsencode(name)
    top_shown = shown if shown is not None else os.fsdecode(name)
    if _unlink_unless_dir(dir_fd, name):
        return
    top = _open_subdir(dir_fd, name)
    if top is None:  # no folder any more: a link or a file
        _unlink_unless_dir(dir_fd, name)
        return
    try:
        top_mount = mount_key(top)
    except BaseException:
        os.close(top)
        raise
    # (folder above, name there, open folder, its sub-folders still to empty, or None
    # while it is to be listed) from the top down
    stack: list[tuple[int, bytes, int, list[bytes] | None]] = [(dir_fd, name, top, None)]
    refills = 0
    try:
        while stack:
            parent, entry, fd, todo = stack[-1]
            if todo is None:  # not listed yet (or filled again): list it once
                names = os.listdir(fd)
                # still in the tree, just before its entries go (a writer may move it out
                # at any instant: this narrows the window to the unlinks that follow)
                if not _same_entry(parent, entry, fd):  # moved out of the tree: not ours
                    stack.pop()
                    os.close(fd)
                    continue
                # (each entry's path made only for an error, while this folder is on top)
                todo = [
                    c
                    for c in names
                    if not _unlink_unless_dir(fd, c, partial(_shown, top_shown, stack, c))
                ]
                stack[-1] = (parent, entry, fd, todo)
            if todo:
                child = todo.pop()
                opened = _open_subdir(fd, child)
                if opened is not None and other_mount(top_mount, mount_key(opened)):
                    os.close(opened)
                    where = _shown(top_shown, stack, child)
                    raise errors.MountInside(
                        f"'{where}' in the folder being removed is a mount point (another "
                        "filesystem or a bind mount): nothing on it is removed",
                        hint="unmount it; the removal goes on then",
                    )
                if opened is not None:
                    stack.append((fd, child, opened, None))
                else:
                    _unlink_unless_dir(fd, child)  # swapped for a link meanwhile
                continue
            try:
                os.rmdir(entry, dir_fd=parent)
            except FileNotFoundError:
                pass  # moved away by its writer: no longer ours to remove
            except NotADirectoryError:
                _unlink_unless_dir(parent, entry)  # a link took its name: the folder is
                # elsewhere in the tree (listed again above) or left it
            except OSError as err:
                if err.errno == errno.EPERM:
                    _refuse_if_protected(parent, entry, _shown(top_shown, stack))
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if _same_entry(parent, entry, fd):
                    refills += 1
                    if refills > _REFILLS:
                        raise
                    stack[-1] = (parent, entry, fd, None)  # filled again: listed again
                    continue
                # another folder of the tree took its name: both are found by the
                # listing of the folder above
            stack.pop()
            os.close(fd)
    finally:
        for _parent, _entry, fd, _todo in stack:
            with contextlib.suppress(OSError):
                os.close(fd)


class Unremovable(NamedTuple):
    """Where :func:`unremovable_below` found a tree it could not empty, and why."""

    rel: str  # the place, relative to the tree ("" for its top)
    why: str  # in words, after the place's name
    #: the file attribute ("immutable", "append-only") that forbids it, which no
    #: permission helps with; None when permissions (or a failed look) are the reason
    flag: str | None = None


def unremovable_below(
    dir_fd: int, name: bytes | str, *, max_depth: int, permissions: bool = True
) -> Unremovable | None:
    """The first place in the tree ``name`` (in the open folder ``dir_fd``) this process
    could not empty (what :func:`remove_tree_at` would fail on), as a path relative to
    the tree ("" for its top) and why, or None when it could empty the whole tree. A
    folder holding entries is removable when it is this process's own (it is made
    writable first) or it may write and search it (``faccessat``, with the effective
    ids: ACLs and read-only folders count); in a sticky folder not its own, only its
    own entries. A folder or file with the immutable or append-only attribute never
    is. ``permissions=False`` looks at those attributes only (a folder moved whole,
    never emptied, whose members still have their modes changed). Walked from
    descriptors, without recursion, never through a link, one
    descriptor per level at most, at most ``max_depth`` levels below the top (deeper
    folders are not looked at). What cannot be opened or listed counts as unremovable."""
    euid = os.geteuid()
    try:
        top = os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)
    except OSError as err:
        return Unremovable("", f"it cannot be opened ({err.strerror})")
    # (folder above, or None for the top; name there; path below the top; its depth)
    todo: list[tuple[HeldFolder | None, str, str, int]] = [(None, "", "", 0)]
    with HeldFolders() as opened:
        first = opened.hold(top)
        while todo:
            parent, entry_name, rel, depth = todo.pop()
            if parent is None:
                here = first
            else:
                try:
                    fd = os.open(entry_name, DIR_NOFOLLOW, dir_fd=parent.fd)
                except (FileNotFoundError, NotADirectoryError):
                    fd = -1  # gone, or swapped for a link (removed as one)
                except OSError as err:
                    if err.errno != errno.ELOOP:
                        return Unremovable(rel, f"it cannot be opened ({err.strerror})")
                    fd = -1
                finally:
                    opened.opened_from(parent)
                if fd < 0:
                    continue
                here = opened.hold(fd)
            try:
                st = os.fstat(here.fd)
                entries = list(os.scandir(here.fd))
            except OSError as err:
                return Unremovable(rel, f"it cannot be listed ({err.strerror})")
            flag = fileflags.protected(here.fd)  # even empty: it cannot be removed
            if flag is not None:
                return Unremovable(rel, f"it is {flag}", flag)
            sticky = False
            if entries and permissions:
                ours = st.st_uid == euid
                if not ours and not os.access(
                    f"/proc/self/fd/{here.fd}", os.W_OK | os.X_OK, effective_ids=True
                ):
                    return Unremovable(rel, "the daemon's user may not remove what it holds")
                sticky = not ours and euid != 0 and bool(st.st_mode & stat.S_ISVTX)
            for entry in entries:
                crel = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    return Unremovable(crel, f"it cannot be looked at ({err.strerror})")
                if sticky and est.st_uid != euid:
                    return Unremovable(rel, "a sticky folder holding another user's entry")
                if stat.S_ISDIR(est.st_mode):
                    if depth < max_depth:
                        opened.below(here)
                        todo.append((here, entry.name, crel, depth + 1))
                elif stat.S_ISREG(est.st_mode):
                    flag = fileflags.protected_at(here.fd, entry.name)
                    if flag is not None:
                        return Unremovable(crel, f"it is {flag}", flag)
            opened.listed(here)
    return None
