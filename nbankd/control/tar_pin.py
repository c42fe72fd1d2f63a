"""The tar file an admin hands to nbankd by path (``tape-import``), pinned: walked
from ``/`` one folder at a time without following links, checked readable (and its
folders searchable) by the admin who asked, a regular file, and held open, so the
job reads that very file whatever its path names by then.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from nbankd.control.peer_rights import READ, PeerRights
from nbankd.control.peers import Peer
from nbankd.control.protocol import ProtocolError


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


class PinnedTar(os.PathLike[str]):
    """A tar file opened (``O_PATH``) after its checks: opening it again goes through
    ``/proc/self/fd``, so it is that very file whatever its path names since; its
    text is the path nbankctl gave, for messages."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def __fspath__(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def __str__(self) -> str:
        return str(self.path)

    def close(self) -> None:
        os.close(self.fd)


def pin_tar(tar: Path, peer: Peer | None) -> PinnedTar:
    """Opens the tar file ``tar`` (an absolute path without links) as its checks ask:
    every folder on the way searchable, and the file readable, by ``peer`` (root and
    the daemon's own user may read what the daemon can; see
    :class:`~nbankd.control.peer_rights.PeerRights`); a regular file. Raises
    ProtocolError naming the file and what to do."""
    rights = PeerRights(peer)
    who = rights.who

    def refuse(why: str) -> ProtocolError:
        return ProtocolError(
            "usage",
            f"nbankd will not read {tar}: {why}; give the tar file's real path, one "
            f"{who} can read, or run the import as the archive's user without the "
            "daemon configuration",
        )

    try:
        fd = rights.walk(tar, refuse)
    except OSError as err:
        raise ProtocolError(
            "not-found", f"nbankd cannot read {tar}: {err.strerror or err}"
        ) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise refuse("it is a link")
        if not stat.S_ISREG(st.st_mode):
            raise refuse("it is not a regular file")
        try:
            readable = rights.allows(fd, READ)
        except (OSError, ValueError) as err:
            raise refuse(f"its permissions cannot be read ({err})") from None
        if not readable:
            raise refuse(f"{who} may not read it")
    except BaseException:
        os.close(fd)
        raise
    pinned = PinnedTar(fd, tar)
    if not os.access(os.fspath(pinned), os.R_OK):
        pinned.close()
        raise ProtocolError(
            "usage",
            f"nbankd (running as {_me()!r}) cannot read {tar} as a file: give a tar file "
            "it can read, or run the import as the archive's user without the daemon "
            "configuration",
        )
    return pinned


__all__ = ["PinnedTar", "pin_tar"]
