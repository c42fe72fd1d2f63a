"""Looking at a path below an inbox for ``nbankctl explain``, the way a scan would:
from the inbox's folder down, one name at a time, never following a symbolic link.

A linked folder on the way is reported as such and nothing beyond it is looked at,
so explain cannot be used to learn whether a file exists where the link points (a
folder its caller may not be able to read, the daemon's user can). A ``.reason`` is
read the same way (:func:`read_reason_below`), not by its whole path: a folder
swapped for a link between the look and the read is not gone through either.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbankd.deposit.bounded import load_json
from nbankd.smallfile import SmallFileError, read_regular, read_regular_at

#: a folder on the way, opened only to look up the next name in it
_STEP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: bytes a ``.reason`` file may hold
_REASON_MAX = 1 << 20


@dataclass(frozen=True)
class Look:
    """What is at a path below an inbox."""

    st: os.stat_result | None = None  # its lstat; None when nothing is there (or unseen)
    link: Path | None = None  # the first folder on the way that is a symbolic link
    blocked: tuple[Path, str] | None = None  # the first folder on the way not listable


def look(inbox: Path, rel: str) -> Look:
    """``lstat`` of ``inbox/rel`` reached without following a link below ``inbox``; a
    folder on the way that is a link (or stops being a folder while walked) ends the
    walk with ``link`` set. ``blocked`` names the first folder on the way that the
    daemon's user cannot list (read and search), as scans must."""
    parts = rel.split("/")
    try:
        fd = os.open(inbox, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Look()
    folder = Path(inbox)
    blocked: tuple[Path, str] | None = None
    try:
        for part in parts[:-1]:
            try:
                sub = os.open(part, _STEP, dir_fd=fd)
            except PermissionError as err:
                return Look(blocked=blocked or (folder, _why(err)))
            except OSError:  # nothing there, or below a file
                return Look(blocked=blocked)
            os.close(fd)
            fd, folder = sub, folder / part
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                return Look(link=folder)
            if not stat.S_ISDIR(mode):
                return Look(blocked=blocked)
            if blocked is None:
                blocked = _unlistable(fd, folder)
        try:
            return Look(st=os.lstat(parts[-1], dir_fd=fd), blocked=blocked)
        except PermissionError as err:
            return Look(blocked=blocked or (folder, _why(err)))
        except OSError:
            return Look(blocked=blocked)
    finally:
        os.close(fd)


def exists_below(inbox: Path, path: Path) -> bool:
    """Whether something is at ``path`` (in ``inbox``), reached without following a
    link below ``inbox``."""
    rel = os.path.relpath(path, inbox)
    if rel == "." or rel == ".." or rel.startswith("../"):
        return False
    seen = look(inbox, rel)
    return seen.st is not None


def read_reason(path: Path) -> dict[str, Any] | None:
    """The ``NAME.reason`` at ``path`` (a JSON object), else None. Anyone who can write
    the inbox can put a file there: a link at its last name (never followed), a FIFO
    (never waited on), anything but a regular file, over 1 MiB, or text nested past the
    limits of :func:`~nbankd.deposit.bounded.load_json` is no readable reason. The
    folders on the way are followed: for a path reached from a descriptor of its own
    (``/proc/self/fd/N/NAME``); else see :func:`read_reason_below`."""
    try:
        raw, _ = read_regular(path, _REASON_MAX, follow=False)
    except (OSError, SmallFileError):
        return None
    return _reason_of(raw)


def read_reason_below(top: Path, rel: str) -> dict[str, Any] | None:
    """The ``NAME.reason`` at ``top/rel`` as :func:`read_reason` reads it, reached from
    ``top`` one name at a time without following a link (as :func:`look` walks): a
    folder on the way that is a link, or is swapped for one at any moment, is never
    gone through, since each name is opened in the folder open before it."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    try:
        fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            sub = os.open(part, _STEP, dir_fd=fd)
            os.close(fd)
            fd = sub
            if not stat.S_ISDIR(os.fstat(fd).st_mode):  # a link (or a file) there
                return None
        raw, _ = read_regular_at(fd, parts[-1], _REASON_MAX)
    except (OSError, SmallFileError):
        return None
    finally:
        os.close(fd)
    return _reason_of(raw)


def _reason_of(raw: bytes) -> dict[str, Any] | None:
    try:
        data = load_json(raw.decode("utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _unlistable(fd: int, folder: Path) -> tuple[Path, str] | None:
    try:
        os.close(os.open(".", _LIST, dir_fd=fd))
    except PermissionError as err:
        return folder, _why(err)
    except OSError:
        return None
    return None


def _why(err: OSError) -> str:
    return err.strerror or os.strerror(err.errno or errno.EACCES)


__all__ = ["Look", "exists_below", "look", "read_reason", "read_reason_below"]
