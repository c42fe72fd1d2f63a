"""Could this peer do it: what the user at the other end of the control socket could do
to a file by themselves, asked before the daemon does it for them.

The daemon runs as root or as the archives' user, with rights an admin may not have:
reading another user's file, moving a file out of a folder the admin may not write. So
a path an admin hands to it is checked against that admin's own rights, as the kernel
decides them for a process of theirs: the user and groups of the peer credentials (a
:class:`~nbankd.control.peers.Peer`, from the control server, never from the client)
against each file's owner, group, mode bits and POSIX access control list. Root and
the daemon's own user are not checked (they could do it themselves), nor is a request
without a peer (a handler called in-process).

A path is walked from ``/`` one folder at a time without following links, each folder
checked searchable, so no link leads the check elsewhere. ``tape-import``
(:func:`nbankd.control.tar_pin.pin_tar`), ``deposit`` and ``check-registry`` ask here.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbankd.control.peers import Peer

#: what a peer may want of a file (the bits of a mode's class, and of an ACL entry)
READ, WRITE, SEARCH = 4, 2, 1

_O_PATH = getattr(os, "O_PATH", 0)
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_HEAD, _ACL_ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ACL = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}


def peer_of(args: dict[str, Any]) -> Peer | None:
    """Who asked, as the control server gives it (``args["peer"]``: a client cannot
    send a Peer, only JSON)."""
    peer = args.get("peer")
    return peer if isinstance(peer, Peer) else None


def _acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The access ACL of the file open at ``fd`` as (tag, perm, id) entries, or None
    when it has none (its mode bits say it all). OSError when it cannot be read,
    ValueError when it is not an ACL this code knows."""
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError as err:
        if err.errno in _NO_ACL:
            return None
        raise
    if len(raw) < _ACL_HEAD.size or (len(raw) - _ACL_HEAD.size) % _ACL_ENTRY.size:
        raise ValueError("a POSIX ACL of an unknown length")
    if _ACL_HEAD.unpack_from(raw)[0] != _ACL_VERSION:
        raise ValueError("a POSIX ACL of an unknown version")
    return [tuple(e) for e in _ACL_ENTRY.iter_unpack(raw[_ACL_HEAD.size :])]  # type: ignore[misc]


class PeerRights:
    """The rights of one peer over files, by the kernel's rules for its user and groups."""

    def __init__(self, peer: Peer | None) -> None:
        self.peer = peer
        #: False for root, the daemon's own user, and no peer: they may do anything
        self.checked = peer is not None and peer.uid not in (0, os.geteuid())
        self.gids: frozenset[int] = frozenset()
        if peer is not None and self.checked:
            self.gids = frozenset(peer.gids) | {peer.gid} if peer.gids else _gids(peer)

    @property
    def who(self) -> str:
        """The peer's user as messages name it (``'alice'``), or ``you`` with no peer."""
        return "you" if self.peer is None else repr(self.peer.user)

    def allows(self, fd: int, want: int) -> bool:
        """Whether the peer may ``want`` (READ, WRITE, SEARCH or'ed) the file open at
        ``fd`` (any descriptor, ``O_PATH`` too), by its owner, group, mode and ACL."""
        if not self.checked or self.peer is None:
            return True
        st = os.fstat(fd)
        acl = _acl(fd)
        uid = self.peer.uid
        if acl is None:
            if uid == st.st_uid:
                bits = st.st_mode >> 6
            elif st.st_gid in self.gids:
                bits = st.st_mode >> 3
            else:
                bits = st.st_mode
            return bits & want == want
        # acl(5), "access check algorithm": the first class that matches decides
        mask = next((p for t, p, _ in acl if t == _MASK), 0o7)
        if uid == st.st_uid:
            return next((p for t, p, _ in acl if t == _USER_OBJ), 0) & want == want
        named = [p for t, p, i in acl if t == _USER and i == uid]
        if named:
            return named[0] & mask & want == want
        groups = [
            p
            for t, p, i in acl
            if (t == _GROUP_OBJ and st.st_gid in self.gids) or (t == _GROUP and i in self.gids)
        ]
        if groups:
            return any(p & mask & want == want for p in groups)
        return next((p for t, p, _ in acl if t == _OTHER), 0) & want == want

    def may_move(self, folder: int, entry: os.stat_result) -> bool:
        """Whether the peer may rename the entry ``entry`` (its lstat) out of the folder
        open at ``folder``: write and search there, and where the folder is sticky
        (``/tmp``), owning the entry or the folder; a folder moved elsewhere also needs
        write on itself (its ``..``), which the caller asks of it."""
        if not self.checked or self.peer is None:
            return True
        if not self.allows(folder, WRITE | SEARCH):
            return False
        st = os.fstat(folder)
        sticky = bool(st.st_mode & stat.S_ISVTX)
        return not sticky or self.peer.uid in (st.st_uid, entry.st_uid)

    def walk(self, path: Path, refuse: Callable[[str], Exception]) -> int:
        """Opens ``path`` (absolute) with ``O_PATH``, one component at a time from ``/``,
        following no link, each folder on the way searchable by the peer; the caller
        closes the descriptor returned. Raises ``refuse(why)`` for a folder the peer
        may not enter or a link (or non-folder) on the way; OSError for a missing one.
        The last component is opened as it is (a link stays a link: check its kind)."""
        fd = os.open("/", _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        at = Path("/")
        try:
            for n, name in enumerate(path.parts[1:], start=2):
                try:
                    enters = self.allows(fd, SEARCH)
                except (OSError, ValueError) as err:
                    raise refuse(
                        f"the permissions of the folder {at} cannot be read ({err})"
                    ) from None
                if not enters:
                    raise refuse(f"{self.who} may not enter the folder {at}")
                last = n == len(path.parts)
                flags = _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                try:
                    nxt = os.open(name, flags, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ENOTDIR, errno.ELOOP):  # a link, or a file
                        raise refuse(f"{at / name} is a link or not a folder") from None
                    raise
                os.close(fd)
                fd, at = nxt, at / name
        except BaseException:
            os.close(fd)
            raise
        return fd


def _gids(peer: Peer) -> frozenset[int]:
    """The peer's groups by number, from their names (a Peer made without ``gids``)."""
    gids = {peer.gid}
    for name in peer.groups:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return frozenset(gids)


__all__ = ["READ", "SEARCH", "WRITE", "PeerRights", "peer_of"]
