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

from nbankd.archive.fsops import DIR_NOFOLLOW, _open_own_dir

__all__ = ["remove_tree_at", "unremovable_below"]


#: how many times :func:`remove_tree_at` finds a folder it emptied filled again (a
#: writer who kept a descriptor of it) before it gives up (ENOTEMPTY)
_REFILLS = 1000


def _unlink_unless_dir(dir_fd: int, name: bytes) -> bool:
    """Unlinks the entry ``name`` of ``dir_fd`` unless it is a folder (False); a link
    is unlinked, never followed; a missing entry counts as removed."""
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
        raise
    return True


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


def remove_tree_at(dir_fd: int, name: bytes | str) -> None:
    """Removes the entry ``name`` of the open folder ``dir_fd``, a file or a whole tree,
    from descriptors only: every folder is opened from the one above it without
    following a link, listed once and emptied through its descriptor, and each mode
    change (a folder of ours made writable) is made on a descriptor, never on a path. A
    folder someone swaps for a link meanwhile (a writer who kept a descriptor of a
    folder of the tree) is unlinked as a link; one its writer moved out of the tree
    after it was opened is left where it now is (checked before it is listed): nothing
    outside the tree is read, changed or removed. Iterative: one descriptor per level,
    no recursion; each folder listed again only when its removal finds it filled again
    (at most :data:`_REFILLS` times in all, then ENOTEMPTY). A missing entry is fine."""
    name = os.fsencode(name)
    if _unlink_unless_dir(dir_fd, name):
        return
    top = _open_subdir(dir_fd, name)
    if top is None:  # no folder any more: a link or a file
        _unlink_unless_dir(dir_fd, name)
        return
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
                todo = [c for c in names if not _unlink_unless_dir(fd, c)]
                stack[-1] = (parent, entry, fd, todo)
            if todo:
                child = todo.pop()
                opened = _open_subdir(fd, child)
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


def unremovable_below(dir_fd: int, name: bytes | str, *, max_depth: int) -> str | None:
    """The first folder of the tree ``name`` (in the open folder ``dir_fd``) whose
    entries this process could not remove (what :func:`remove_tree_at` would fail on),
    as a path relative to the tree ("" for its top), or None when it could empty the
    whole tree. A folder holding entries is removable when it is this process's own
    (it is made writable first) or it may write and search it (``faccessat``, with the
    effective ids: ACLs, read-only and immutable folders count); in a sticky folder not
    its own, only its own entries. Walked from descriptors, without recursion, never
    through a link, at most ``max_depth`` levels below the top (deeper folders are not
    looked at). What cannot be opened or listed counts as unremovable."""
    euid = os.geteuid()
    try:
        top = os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return ""
    # (open folder, path below the top, its depth) of the folders still to look at
    todo: list[tuple[int, str, int]] = [(top, "", 0)]
    try:
        while todo:
            fd, rel, depth = todo.pop()
            try:
                st = os.fstat(fd)
                entries = list(os.scandir(fd))
                if not entries:
                    continue
                ours = st.st_uid == euid
                if not ours and not os.access(
                    f"/proc/self/fd/{fd}", os.W_OK | os.X_OK, effective_ids=True
                ):
                    return rel
                sticky = not ours and euid != 0 and bool(st.st_mode & stat.S_ISVTX)
                for entry in entries:
                    if sticky and entry.stat(follow_symlinks=False).st_uid != euid:
                        return rel
                    if depth < max_depth and entry.is_dir(follow_symlinks=False):
                        crel = f"{rel}/{entry.name}" if rel else entry.name
                        try:
                            sub = os.open(entry.name, DIR_NOFOLLOW, dir_fd=fd)
                        except (FileNotFoundError, NotADirectoryError):
                            continue  # gone, or swapped for a link (removed as one)
                        except OSError as err:
                            if err.errno == errno.ELOOP:
                                continue
                            return crel
                        todo.append((sub, crel, depth + 1))
            except OSError:
                return rel
            finally:
                os.close(fd)
    finally:
        for fd, _rel, _depth in todo:
            os.close(fd)
    return None
