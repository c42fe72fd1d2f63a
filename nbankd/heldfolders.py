"""The folders a walk from descriptors holds open, one per level at most.

A walk that opens every folder from its parent's descriptor (never by a path: no
path length limits it, and a folder swapped for a link on the way is never entered)
keeps a folder open only until the last of its sub-folders is opened from it, so a
deep tree costs one descriptor per level and a wide one no more than a narrow one.
:class:`HeldFolders` counts that, and closes whatever is still open when the walk
ends, however it ends.
"""

from __future__ import annotations

import os
from types import TracebackType


class HeldFolder:
    """One open folder of a walk and how many of its sub-folders are still to be
    opened from it."""

    __slots__ = ("fd", "left")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.left = 0


class HeldFolders:
    """The open folders of one walk (a context manager: all closed at its end)."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: list[HeldFolder] = []

    def hold(self, fd: int) -> HeldFolder:
        """Keeps the open folder ``fd`` (closed by this object from now on)."""
        folder = HeldFolder(fd)
        self._open.append(folder)
        return folder

    def below(self, folder: HeldFolder) -> None:
        """One more sub-folder of ``folder`` is to be opened from it."""
        folder.left += 1

    def opened_from(self, folder: HeldFolder) -> None:
        """A sub-folder of ``folder`` was opened (or tried): closed after its last."""
        folder.left -= 1
        self.listed(folder)

    def listed(self, folder: HeldFolder) -> None:
        """``folder`` was listed: closed now if no sub-folder is to be opened from it."""
        if folder.left <= 0:
            self.close(folder)

    def close(self, folder: HeldFolder) -> None:
        """Closes ``folder`` now, whatever is left to open from it."""
        if folder in self._open:
            self._open.remove(folder)
            os.close(folder.fd)

    def __enter__(self) -> HeldFolders:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for folder in self._open:
            os.close(folder.fd)
        self._open.clear()


__all__ = ["HeldFolder", "HeldFolders"]
