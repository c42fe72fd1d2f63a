"""What kind of file a ``stat`` result is: the one classification every reader shares.

Guarantee 7 says nbankd never follows, reads or archives a symbolic link, a hard
link (a regular file with other names), a FIFO, a socket, a device or any other
special file. The scanner, ``explain`` and the staging copy each ask this module
which of those a name is, so they cannot disagree; each phrases the answer for
its own reader from :attr:`FileKind.noun`.
"""

from __future__ import annotations

import enum
import os
import stat


class FileKind(enum.Enum):
    """The kinds of file nbankd tells apart; the value is the noun shown to people."""

    FILE = "regular file"  # one link: the only kind of file ever read
    DIRECTORY = "folder"
    HARDLINK = "hard link"  # a regular file with more than one name
    SYMLINK = "symbolic link"
    FIFO = "FIFO"
    SOCKET = "socket"
    DEVICE = "device file"  # character or block device
    OTHER = "special file"

    @classmethod
    def of(cls, st: os.stat_result) -> FileKind:
        """The kind of an ``lstat`` result (never of what a link points to)."""
        return cls.of_mode(st.st_mode, st.st_nlink)

    @classmethod
    def of_mode(cls, mode: int, nlink: int = 1) -> FileKind:
        """The kind of a file of ``st_mode`` ``mode`` with ``nlink`` names."""
        if stat.S_ISREG(mode):
            return cls.HARDLINK if nlink > 1 else cls.FILE
        if stat.S_ISDIR(mode):
            return cls.DIRECTORY
        if stat.S_ISLNK(mode):
            return cls.SYMLINK
        if stat.S_ISFIFO(mode):
            return cls.FIFO
        if stat.S_ISSOCK(mode):
            return cls.SOCKET
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return cls.DEVICE
        return cls.OTHER

    @property
    def noun(self) -> str:
        return self.value

    @property
    def unsafe(self) -> bool:
        """True for the kinds guarantee 7 forbids following, reading or archiving."""
        return self not in (FileKind.FILE, FileKind.DIRECTORY)
