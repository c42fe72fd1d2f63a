"""Telling a folder on another mount from one on its parent's.

Another filesystem mounted inside an inbox, or a folder bind-mounted there (same
device number, another mount), is never an inbox's own: files on it cannot be
moved into the work folder, and removing a deposited folder input must never reach
into it. A mount is named by its key: the device number (``st_dev``) and the mount's
id as ``/proc/self/fdinfo`` gives it for an open descriptor (``mnt_id``; None where
``/proc`` does not say, when only the device numbers are compared).
"""

from __future__ import annotations

import os

#: (device number, mount id or None when unknown) of an open file
MountKey = tuple[int, int | None]

_FDINFO_MAX = 4096  # bytes of fdinfo read: ``mnt_id`` is on its first lines


def mount_id(fd: int) -> int | None:
    """The id of the mount the open file ``fd`` is on, or None when ``/proc`` does not
    say (not mounted, or a kernel without it)."""
    try:
        src = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(src, _FDINFO_MAX)
    except OSError:
        return None
    finally:
        os.close(src)
    for line in text.split(b"\n"):
        key, _, value = line.partition(b":")
        if key == b"mnt_id":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def mount_key(fd: int, st: os.stat_result | None = None) -> MountKey:
    """The mount key of the open file ``fd`` (``st``: its fstat, when already taken)."""
    dev = (st if st is not None else os.fstat(fd)).st_dev
    return dev, mount_id(fd)


def other_mount(here: MountKey, there: MountKey) -> bool:
    """True when ``there`` is another mount than ``here``. Where both mount ids are
    known they decide alone (a bind mount has another id on the same device; a btrfs
    subvolume has another device number on the same mount, and is the folder's own);
    otherwise another device number counts as another mount."""
    if here[1] is not None and there[1] is not None:
        return here[1] != there[1]
    return here[0] != there[0]
