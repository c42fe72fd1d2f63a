"""The tar file an admin hands to nbankd by path (``tape-import``), pinned: walked
from ``/`` one folder at a time without following links, checked readable (and its
folders searchable) by the admin who asked, a regular file, and held open, so the
job reads that very file whatever its path names by then.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from nbankd.control.protocol import ProtocolError
from nbankd.control.server import Peer


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


_O_PATH = getattr(os, "O_PATH", 0)


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


def _gids(peer: Peer) -> set[int]:
    gids = {peer.gid}
    for name in peer.groups:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return gids


def _lets(peer: Peer, gids: set[int], st: os.stat_result, shift: int) -> bool:
    """Whether the mode bits let the peer read (shift 2) or search (shift 0)."""
    if peer.uid == st.st_uid:
        return bool(st.st_mode & (0o100 << shift))
    if st.st_gid in gids:
        return bool(st.st_mode & (0o010 << shift))
    return bool(st.st_mode & (0o001 << shift))


def pin_tar(tar: Path, peer: Peer | None) -> PinnedTar:
    """Opens the tar file ``tar`` (an absolute path without links) as its checks ask:
    every folder on the way searchable, and the file readable, by ``peer`` (root and
    the daemon's own user may read what the daemon can); a regular file. Raises
    ProtocolError naming the file and what to do."""
    check = peer is not None and peer.uid not in (0, os.geteuid())
    who = "you" if peer is None else repr(peer.user)
    gids = _gids(peer) if check and peer is not None else set()

    def refuse(why: str) -> ProtocolError:
        return ProtocolError(
            "usage",
            f"nbankd will not read {tar}: {why}; give the tar file's real path, one "
            f"{who} can read, or run the import as the archive's user without the "
            "daemon configuration",
        )

    fd = os.open("/", _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    at = Path("/")
    try:
        for name in tar.parts[1:]:
            st = os.fstat(fd)
            if check and peer is not None and not _lets(peer, gids, st, 0):
                raise refuse(f"{who} may not enter the folder {at}")
            last = name == tar.name and at / name == tar
            flags = _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as err:
                if err.errno == errno.ENOTDIR:  #: a link (never followed) or a file
                    raise refuse(f"{at / name} is a link or not a folder") from None
                raise ProtocolError(
                    "not-found", f"nbankd cannot read {tar}: {err.strerror or err}"
                ) from None
            os.close(fd)
            fd, at = nxt, at / name
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise refuse("it is a link")
        if not stat.S_ISREG(st.st_mode):
            raise refuse("it is not a regular file")
        if check and peer is not None and not _lets(peer, gids, st, 2):
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
