"""Which files the processes this one may look at hold open for writing, as
``/proc/PID/fdinfo`` shows them: the fallback where the kernel's lease question cannot
tell (a network filesystem that refuses every lease, see
:func:`nbankd.watch.writers.calibrate`).

Only processes whose ``/proc`` entries this process may read are seen: its user's
own, or every one for root without a ``/proc`` restricted by ``hidepid`` or systemd's
``ProtectProc``. Writers on other hosts are never seen. A file is named by its mount
and inode number (``mnt_id``, ``ino`` of fdinfo, Linux 5.14 and later), which needs no
``stat`` of a network file; on older kernels nothing is seen.
"""

from __future__ import annotations

import os

FileKey = tuple[int, int]  # (mnt_id, inode number)

_FDINFO_MAX = 4096  # bytes of one fdinfo file read (its first lines are the ones used)


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


def key_of(fd: int) -> FileKey | None:
    """The (mnt_id, inode) of this process's open file ``fd``; None when fdinfo does
    not say (an older kernel)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            _flags, mnt, ino = _fields(f.read(_FDINFO_MAX))
    except OSError:
        return None
    return None if mnt is None or ino is None else (mnt, ino)


def open_for_writing() -> frozenset[FileKey]:
    """The files any process this one may look at (itself left out) holds open on a
    writable descriptor."""
    found: set[FileKey] = set()
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return frozenset()
    for pid in pids:
        folder = f"/proc/{pid}/fdinfo"
        try:
            names = os.listdir(folder)
        except OSError:  # another user's, or ended meanwhile
            continue
        for name in names:
            try:
                with open(f"{folder}/{name}", "rb") as f:
                    flags, mnt, ino = _fields(f.read(_FDINFO_MAX))
            except OSError:
                continue
            if flags is None or mnt is None or ino is None:
                continue
            if flags & os.O_ACCMODE != os.O_RDONLY:
                found.add((mnt, ino))
    return frozenset(found)


__all__ = ["FileKey", "key_of", "open_for_writing"]
