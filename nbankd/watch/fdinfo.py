"""Which files the processes this one may look at hold open for writing, as
``/proc/PID/fdinfo`` shows them: the fallback where the kernel's lease question cannot
tell (a network filesystem that refuses every lease, see
:func:`nbankd.watch.writers.calibrate`), and a check ``nbankctl`` makes as its user
before it hands files to a daemon that cannot see that user's processes.

Only processes whose ``/proc`` entries this process may read are seen: its user's
own (unless made non-dumpable: set-uid or file-capability programs), or every one
for root without a ``/proc`` restricted by ``hidepid`` or systemd's ``ProtectProc``.
Writers on other hosts are never seen; a shared writable memory mapping
(``/proc/PID/maps``) counts as a writer, as the kernel counts it. A file is named by
its device and inode number: fdinfo's ``mnt_id`` (Linux 5.14 and later also give
``ino``) is turned into the mount's device through that process's own
``/proc/PID/mountinfo``, so a writer in another mount namespace or through a bind
mount is recognised, and no network file is ``stat``-ed. On older kernels only
mappings are seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

FileKey = tuple[int, int]  # (st_dev, st_ino)

_FDINFO_MAX = 4096  # bytes of one fdinfo file read (its first lines are the ones used)
_MOUNTINFO_MAX = 16 << 20  # bytes of one mountinfo read at most


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
            text = f.read(_MOUNTINFO_MAX)
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
            text = f.read(_MOUNTINFO_MAX)
    except OSError:
        return
    for line in text.split(b"\n"):
        parts = line.split(None, 5)
        if len(parts) < 5 or len(parts[1]) < 4 or parts[1][1:2] != b"w" or parts[1][3:4] != b"s":
            continue
        major, _, minor = parts[3].partition(b":")
        try:
            dev, ino = os.makedev(int(major, 16), int(minor, 16)), int(parts[4])
        except ValueError:
            continue
        if ino:
            yield dev, ino


def open_for_writing() -> frozenset[FileKey]:
    """The files any process this one may look at (itself left out) holds open on a
    writable descriptor or maps shared and writable."""
    found: set[FileKey] = set()
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return frozenset()
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
    return frozenset(found)


def held(paths: Iterable[Path], seen: frozenset[FileKey]) -> Path | None:
    """The first regular file at or below ``paths`` (folders walked without following
    links) that is in ``seen``; None when none is."""
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            return top
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        for root, _dirs, names in os.walk(top, followlinks=False):
            for name in names:
                path = Path(root, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    return path
    return None


__all__ = ["FileKey", "held", "open_for_writing"]
