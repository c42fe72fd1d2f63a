"""Removing what a user chose to remove from an archive (a leftover, a copy held
elsewhere), and moving a misplaced resource, from descriptors.

The archive's root is trusted (its configured path); every folder below it is opened
without following a link (:func:`~nbankd.archive.fsops.open_below`), so a stub folder
or ``staging/`` swapped for a link while a repair hashed or waited for an answer never
leads a removal outside the archive: the removal fails with OSError instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from nbankd.archive.fsops import fsync_fd, open_below, remove_ours_at, rename_noreplace_at
from nbankd.archive.layout import Archive


def _parent_below(archive: Archive, path: Path) -> tuple[int, str]:
    """The open folder holding ``path`` (inside ``archive``: ValueError otherwise),
    reached from the archive's root without following a link, and the entry's name."""
    rel = path.relative_to(archive.path)
    return open_below(archive.path, rel.parent), path.name


def check_below(archive: Archive, path: Path) -> None:
    """Raises OSError unless the folder holding ``path`` is reached from the archive's
    root without a link (before a step that would be hard to undo)."""
    fd, _name = _parent_below(archive, path)
    os.close(fd)


def remove_entry(archive: Archive, path: Path) -> None:
    """Removes the file or tree at ``path`` inside ``archive`` and fsyncs its folder."""
    fd, name = _parent_below(archive, path)
    try:
        remove_ours_at(fd, name)
        fsync_fd(fd)
    finally:
        os.close(fd)


def remove_empty_stub(archive: Archive, stub: Path) -> bool:
    """Removes the stub folder ``stub`` of ``resources/`` if it is empty; True if it
    went (not empty, in use, or a link put there: kept)."""
    if stub.parent != archive.resources_dir:
        return False
    top, name = _parent_below(archive, stub)
    try:
        try:
            os.rmdir(name, dir_fd=top)
        except OSError:
            return False
        fsync_fd(top)
        return True
    finally:
        os.close(top)


def remove_stored_copy(archive: Archive, path: Path) -> bool:
    """Removes a stored copy (file or folder) at ``path``, then its stub folder if now
    empty; True if the stub folder went."""
    remove_entry(archive, path)
    return remove_empty_stub(archive, path.parent)


def move_below(archive: Archive, src: Path, dst: Path) -> None:
    """Moves the entry ``src`` to ``dst``, both inside ``archive``, never replacing
    anything (FileExistsError) and never through a folder swapped for a link; both
    folders fsynced."""
    src_dir, src_name = _parent_below(archive, src)
    try:
        dst_dir, dst_name = _parent_below(archive, dst)
        try:
            rename_noreplace_at(src_dir, os.fsencode(src_name), dst_dir, os.fsencode(dst_name))
            fsync_fd(dst_dir)
            fsync_fd(src_dir)
        finally:
            os.close(dst_dir)
    finally:
        os.close(src_dir)


__all__ = ["check_below", "move_below", "remove_empty_stub", "remove_entry", "remove_stored_copy"]
