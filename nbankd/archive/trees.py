"""Walks of folders published in place (``placement: rename``), from descriptors.

A folder moved into ``resources/`` by rename was written by someone else: every
entry is opened relative to its parent's descriptor with ``O_NOFOLLOW``, checked to
be the entry that was listed, and refused when it is a link, a hard link or a
special file, so a sub-folder swapped for a link never leads a walk out of the tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from nbankd import errors
from nbankd.archive.access import apply_access_fd
from nbankd.archive.layout import Archive
from nbankd.archive.staging import check_regular
from nbankd.mounts import MountKey, mount_key, other_mount


def settle_tree(
    archive: Archive, root: Path, at: Path, progress: Callable[[], None] | None
) -> None:
    """Gives every entry inside ``root`` (a folder published in place, to live at
    ``at``) the policy's group and mode and fsyncs it, deepest first, walking from
    descriptors: a link, hard link or special file met raises unsafe_input's error,
    and nothing is ever followed (a sub-folder swapped for a link is refused)."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _settle_dir(archive, top, root, at, progress, mount_key(top))
    finally:
        os.close(top)


_OPEN_ENTRY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _settle_dir(
    archive: Archive,
    dfd: int,
    shown: Path,
    at: Path,
    progress: Callable[[], None] | None,
    top_mount: MountKey,
) -> None:
    for name in sorted(os.listdir(dfd)):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir:
            check_regular(st, shown / name)
        fd = os.open(name, _OPEN_ENTRY | (os.O_DIRECTORY if is_dir else 0), dir_fd=dfd)
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise errors.InputChanged(f"'{shown / name}' was replaced while publishing")
            if is_dir:
                if other_mount(top_mount, mount_key(fd, fst)):  # never changed: not ours
                    raise errors.MountInside(
                        f"'{shown / name}' is a mount point (another filesystem or a bind "
                        "mount): nothing on it is the folder's own to publish",
                        hint="unmount it; the folder is published then",
                    )
                _settle_dir(archive, fd, shown / name, at / name, progress, top_mount)
            else:
                check_regular(fst, shown / name)
            apply_access_fd(archive, fd, at=at / name)
            os.fsync(fd)
        finally:
            os.close(fd)
        if progress is not None:
            progress()


def fsync_published_tree(root: Path) -> None:
    """fsyncs every file and folder of a folder stored in resources/ (published in place
    by a release that did not flush it), from descriptors, nothing followed."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _fsync_fd_tree(top)
    finally:
        os.close(top)


def _fsync_fd_tree(dfd: int) -> None:
    for name in os.listdir(dfd):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue
        fd = os.open(name, _OPEN_ENTRY, dir_fd=dfd)
        try:
            fst = os.fstat(fd)
            if stat.S_ISDIR(fst.st_mode):
                _fsync_fd_tree(fd)
            if stat.S_ISDIR(fst.st_mode) or stat.S_ISREG(fst.st_mode):
                os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(dfd)


def check_tree(root: Path) -> None:
    """Raises unsafe_input's error for the first link or special file inside root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                check_regular(st, path)


__all__ = ["check_tree", "fsync_published_tree", "settle_tree"]
