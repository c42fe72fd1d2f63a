"""Writing an output beside where it goes, then publishing it whole or not at all.

:class:`NewFile` and :class:`NewTree` write under a hidden temporary name in the
target's own folder (``.NAME.XXXXXXXX.partial``, NAME cut to fit in 255 bytes);
:meth:`publish` fsyncs the data, puts it in place without replacing anything
(``link(2)``, or ``renameat2(RENAME_NOREPLACE)`` for folders and filesystems without
hard links), and fsyncs the folder. Asked to replace (``nbankctl fetch -f``), a file
is renamed over its target, still atomically. Nothing partial is ever visible at the target:
on any error, :meth:`discard` removes the temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from nbankd import errors
from nbankd.archive.fsops import (
    NoReplaceUnsupported,
    fsync_dir,
    publish_temp,
    remove_ours,
    rename_noreplace,
)
from nbankd.hashing import write_all

_OPEN_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the longest file name, in bytes, of the filesystems archives and outputs live on
#: (NAME_MAX of ext4, xfs, btrfs, tmpfs, NFS)
NAME_MAX = 255
_TEMP_TAIL = ".00000000.partial"  # the token's length: secrets.token_hex(4)


def name_head(name: str, room: int) -> str:
    """The longest start of ``name`` whose encoded file name holds at most ``room``
    bytes: cut between characters, never inside a UTF-8 sequence; a byte that is not
    UTF-8 (kept by the filesystem encoding as a surrogate) counts as the one byte it is."""
    used = 0
    for i, ch in enumerate(name):
        used += 1 if ch.isascii() else _encoded_size(ch)
        if used > room:
            return name[:i]
    return name


def _encoded_size(ch: str) -> int:
    try:
        return len(os.fsencode(ch))
    except UnicodeEncodeError:  # a surrogate no file name holds: open() will say so
        return len(ch.encode("utf-8", "surrogatepass"))


def temp_name(target: Path) -> Path:
    """A fresh hidden name beside ``target`` for its copy in progress,
    ``.NAME.XXXXXXXX.partial``: NAME is cut so that the whole fits in :data:`NAME_MAX`
    bytes (a name the filesystem takes gets a temporary name it takes too)."""
    head = name_head(target.name, NAME_MAX - 1 - len(_TEMP_TAIL))
    return target.with_name(f".{head}.{secrets.token_hex(4)}.partial")


def exists_error(target: Path) -> errors.ResourceExists:
    return errors.ResourceExists(
        f"'{target}' already exists", hint="remove it or choose another destination"
    )


def _output_error(target: Path, err: OSError) -> errors.NbankdError:
    why = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        return errors.ArchiveError(f"cannot write '{target}': {why}", hint="check that filesystem")
    return errors.ArchiveError(
        f"cannot write '{target}': {why}", hint="check the folder's permissions"
    )


class NewFile:
    """A regular file written under a temporary name beside ``target``."""

    def __init__(self, target: Path, mode: int | None = None) -> None:
        self.target = target
        self.mode = 0o666 & ~current_umask() if mode is None else mode
        self.tmp = temp_name(target)
        try:
            self.fd = os.open(self.tmp, _OPEN_NEW, 0o600)
        except OSError as err:
            raise _output_error(target, err) from err
        self._open = True

    def write(self, data: memoryview | bytes) -> None:
        write_all(self.fd, memoryview(data))

    def publish(self, *, replace: bool = False, mtime_ns: int | None = None) -> Path:
        """Puts the complete file in place; ResourceExists if ``target`` exists (unless
        ``replace``)."""
        try:
            os.fchmod(self.fd, self.mode)
            if mtime_ns is not None:
                os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            os.fsync(self.fd)
            self._close()
            publish_temp(self.tmp, self.target, replace=replace)
        except FileExistsError:
            self.discard()
            raise exists_error(self.target) from None
        except OSError as err:
            self.discard()
            raise _output_error(self.target, err) from err
        return self.target

    def _close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)

    def discard(self) -> None:
        """Removes the temporary file (idempotent)."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class NewTree:
    """A folder written under a temporary name beside ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.tmp = temp_name(target)
        try:
            os.mkdir(self.tmp, 0o700)
        except OSError as err:
            raise _output_error(target, err) from err
        self._dirs: list[tuple[Path, int]] = []

    def path(self, relpath: str) -> Path:
        return self.tmp / relpath if relpath else self.tmp

    def mkdir(self, relpath: str) -> None:
        os.mkdir(self.path(relpath), 0o700)

    def note_dir(self, relpath: str, mtime_ns: int) -> None:
        """Remembers a folder's mtime, set once its contents are written."""
        self._dirs.append((self.path(relpath), mtime_ns))

    def publish(self) -> Path:
        """Gives every folder its mode and mtime, fsyncs them, and renames the tree into
        place without replacing anything."""
        umask = current_umask()
        try:
            for path, mtime_ns in reversed(self._dirs):  # deepest first
                os.chmod(path, 0o777 & ~umask)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.utime(path, ns=(mtime_ns, mtime_ns))
            rename_noreplace(self.tmp, self.target)
            fsync_dir(self.target.parent)
        except FileExistsError:
            self.discard()
            raise exists_error(self.target) from None
        except NoReplaceUnsupported as err:
            self.discard()
            raise errors.ArchiveError(
                f"cannot put folder '{self.target}' in place: the filesystem has no "
                "no-replace rename",
                hint="export folder resources to a tar or zip file there instead",
            ) from err
        except OSError as err:
            self.discard()
            raise _output_error(self.target, err) from err
        return self.target

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            remove_ours(self.tmp)


__all__ = [
    "NAME_MAX",
    "NewFile",
    "NewTree",
    "current_umask",
    "exists_error",
    "name_head",
    "temp_name",
]
