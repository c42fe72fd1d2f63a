"""Which files the processes this one may look at hold open for writing, as ``/proc``
shows them: the fallback where the kernel's lease question cannot tell (a network
filesystem that refuses every lease, see :func:`nbankd.watch.writers.calibrate`, or
a file not the asker's own without ``CAP_LEASE``), and a check ``nbankctl`` makes as
its user before it hands files to a daemon that cannot see that user's processes.

Only processes whose ``/proc`` entries this process may read are seen: its user's
own (unless made non-dumpable: set-uid or file-capability programs), or every one
for root without a ``/proc`` restricted by ``hidepid`` or systemd's ``ProtectProc``.
Writers on other hosts are never seen; a shared mapping opened writable
(``rw-s`` in ``/proc/PID/maps``) counts as a writer. A file is named by its
filesystem's device number as mountinfo gives it (fdinfo's ``mnt_id``, through each
process's own ``/proc/PID/mountinfo``, so a writer in another mount namespace or
through a bind mount is recognised; on btrfs this is not ``st_dev``, so the files
asked about are named the same way, from this process's own fdinfo) and its inode
number (fdinfo's ``ino``, Linux 5.14 and later; on older kernels only mappings are
seen). No network file is ``stat``-ed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from nbankd.watch import writers

FileKey = tuple[int, int]  # (device number as mountinfo gives it, inode number)

_FDINFO_MAX = 4096  # bytes of one fdinfo file read (its first lines are the ones used)
_TABLE_MAX = 16 << 20  # bytes of one mountinfo or maps file read at most
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _fields(text: bytes) -> tuple[int | None, int | None, int | None]:
    """(flags, mnt_id, ino) of one fdinfo text; None for a field it lacks."""
    flags = mnt = ino = None
    for line in text.split(b"\n"):
        key, _, value = line.partition(b":")
        try:
            if key == b"flags":
                flags = int(value.strip(), 8)
            elif key == b"mnt_id":
                mnt = int(value)
            elif key == b"ino":
                ino = int(value)
        except ValueError:
            continue
    return flags, mnt, ino


def _devices(pid: str) -> dict[int, int]:
    """{mount id: device number} of the mounts process ``pid`` sees."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            text = f.read(_TABLE_MAX)
    except OSError:
        return {}
    found: dict[int, int] = {}
    for line in text.split(b"\n"):
        parts = line.split(b" ", 3)
        if len(parts) < 3:
            continue
        major, _, minor = parts[2].partition(b":")
        try:
            found[int(parts[0])] = os.makedev(int(major), int(minor))
        except ValueError:
            continue
    return found


def _writable(pid: str) -> Iterator[tuple[int, int]]:
    """(mnt_id, ino) of each writable descriptor of process ``pid``."""
    folder = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(folder)
    except OSError:  # another user's, or ended meanwhile
        return
    for name in names:
        try:
            with open(f"{folder}/{name}", "rb") as f:
                flags, mnt, ino = _fields(f.read(_FDINFO_MAX))
        except OSError:
            continue
        writable = flags is not None and flags & os.O_ACCMODE != os.O_RDONLY
        if writable and mnt is not None and ino is not None:
            yield mnt, ino


def _mapped_writable(pid: str) -> Iterator[FileKey]:
    """(device, inode) of each file process ``pid`` maps shared and writable (the
    kernel counts such a mapping as open for writing after its descriptor closed)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            text = f.read(_TABLE_MAX)
    except OSError:
        return
    for line in text.split(b"\n"):
        parts = line.split(None, 5)
        if len(parts) < 5 or parts[1][1:2] != b"w" or parts[1][3:4] != b"s":
            continue
        major, _, minor = parts[3].partition(b":")
        try:
            dev, ino = os.makedev(int(major, 16), int(minor, 16)), int(parts[4])
        except ValueError:
            continue
        if ino:
            yield dev, ino


class Writers:
    """The files seen open for writing at one moment (:func:`open_for_writing`), and
    questions about files and folders against them."""

    def __init__(self, keys: frozenset[FileKey], own: dict[int, int]) -> None:
        self.keys = keys
        self._own = own  # this process's {mount id: device}

    def holds(self, fd: int) -> bool | None:
        """Whether the file open on ``fd`` (in this process) is one of them; None when
        fdinfo does not say which file it is."""
        try:
            with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                _flags, mnt, ino = _fields(f.read(_FDINFO_MAX))
        except OSError:
            return None
        dev = self._own.get(mnt) if mnt is not None else None
        if dev is None or ino is None:
            return None
        return (dev, ino) in self.keys

    def holds_at(self, dir_fd: int, name: bytes) -> bool | None:
        """:meth:`holds` of ``name`` in the open folder ``dir_fd`` (never followed)."""
        try:
            fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            return self.holds(fd)
        finally:
            os.close(fd)

    def held(self, path: Path) -> bool:
        """True when ``path`` (a file, or a regular file below a folder, walked from
        descriptors without following links, at most
        :data:`~nbankd.watch.writers.MAX_DEPTH` levels) is one of them; what cannot be
        read or lies deeper is not seen."""
        if not self.keys:
            return False
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            name = os.fsencode(path.name)
            try:
                is_dir = os.path.isdir(path) and not os.path.islink(path)
            except OSError:
                return False
            if is_dir:
                return bool(writers.tree_open_for_writing_at(parent, name, self.holds_at))
            return bool(self.holds_at(parent, name))
        finally:
            os.close(parent)


def open_for_writing() -> Writers:
    """The files any process this one may look at (itself left out) holds open on a
    writable descriptor or maps shared and writable."""
    found: set[FileKey] = set()
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        pids = []
    tables: dict[str, dict[int, int]] = {}  # per mount namespace
    for pid in pids:
        found.update(_mapped_writable(pid))
        writable = list(_writable(pid))
        if not writable:
            continue
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            namespace = f"pid {pid}"
        devices = tables.get(namespace)
        if devices is None:
            devices = tables[namespace] = _devices(pid)
        for mnt, ino in writable:
            dev = devices.get(mnt)
            if dev is not None:
                found.add((dev, ino))
    return Writers(frozenset(found), _devices("self"))


__all__ = ["FileKey", "Writers", "open_for_writing"]
