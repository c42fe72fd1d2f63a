"""What an inbox's rejected folders hold, as status, metrics, alerts and requeue count it.

Anyone who can write the inbox can write its rejected folder: swap it for a link, plant
a FIFO or a file of nested JSON under a ``NAME.reason`` name, fill it with thousands of
entries. So the folder is reached from the inbox folder one component at a time with
``O_DIRECTORY | O_NOFOLLOW`` and listed from descriptors (never by a path a link could
redirect); a link or a file in its place is told, never followed (:attr:`RejectedContents.
not_folders`); a reason is read with :func:`~nbankd.daemon.explain_look.read_reason` (bounded,
never blocking, no link followed); the walk costs time linear in the entries and goes at
most :data:`WALK_DEPTH` folders down, one descriptor per level
(:class:`~nbankd.heldfolders.HeldFolders`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.archive.fsops import DIR_NOFOLLOW
from nbankd.config import InboxConfig
from nbankd.daemon.explain import shortened_reason_target
from nbankd.daemon.explain_look import read_reason
from nbankd.filekind import FileKind
from nbankd.heldfolders import HeldFolder, HeldFolders
from nbankd.names import MARKER_SUFFIX, PROBE_PREFIX, REASON_SUFFIX, SIDECAR_SUFFIXES

#: folder levels walked below a rejected folder; a folder deeper is told as not
#: looked in (an inbox's own walk goes nowhere near as deep)
WALK_DEPTH = 64

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the inbox folder, as configured


@dataclass(frozen=True)
class RejectedContents:
    """What rejected folders hold, as status, metrics and alerts count it (README:
    any file in a rejected folder keeps status degraded)."""

    #: each rejected input, one per ``NAME.reason``
    inputs: tuple[Path, ...] = ()
    #: every other entry that is not nbankd's own bookkeeping (a ``NAME.reason``, a
    #: reason's temporary file, a sidecar or marker beside what it belongs to): a
    #: rejected input whose ``NAME.reason`` was removed, a file a person put there
    unexplained: tuple[Path, ...] = ()
    #: (folder, why) for each folder in them that could not be listed: what is in it
    #: is not counted
    unreadable: tuple[tuple[Path, str], ...] = ()
    #: (path, what stands there) for each rejected folder, or folder on the way to
    #: it, that is a link or no folder: never followed, nothing behind it counted
    not_folders: tuple[tuple[Path, str], ...] = ()

    @property
    def entries(self) -> tuple[Path, ...]:
        """Everything waiting in the rejected folders: inputs, then the others."""
        return self.inputs + self.unexplained

    def __add__(self, other: RejectedContents) -> RejectedContents:
        return RejectedContents(
            self.inputs + other.inputs,
            self.unexplained + other.unexplained,
            self.unreadable + other.unreadable,
            self.not_folders + other.not_folders,
        )


def _bookkeeping(name: str) -> bool:
    """Whether ``name`` in a rejected folder is nbankd's own: a reason file, the
    temporary file a reason is written to (``.NAME.reason.tmp``, its name cut at 200
    bytes), a probe file made for a moment."""
    if name.endswith(REASON_SUFFIX) or name.startswith(PROBE_PREFIX):
        return True
    if name.startswith(".") and name.endswith(".tmp"):
        return name.endswith(REASON_SUFFIX + ".tmp") or len(os.fsencode(name)) == 205
    return False


def _kind_at(folder: int, name: str) -> str:
    """What stands at ``name`` in the open ``folder`` (a noun), never followed."""
    try:
        return FileKind.of(os.lstat(name, dir_fd=folder)).noun
    except OSError:  # gone meanwhile
        return "file"


class _Walk:
    """The listing of one rejected folder; see :func:`rejected_contents`."""

    def __init__(self, config: InboxConfig, folder: str) -> None:
        self.top = config.path / folder
        self.others = {config.path / d for d in config.rejected_dirs if d != folder}
        markers = (MARKER_SUFFIX,) if config.ready == "marker" else ()
        self.companions = (*SIDECAR_SUFFIXES, *markers)
        self.inputs: list[Path] = []
        self.unexplained: list[Path] = []
        self.unreadable: list[tuple[Path, str]] = []
        self.not_folders: list[tuple[Path, str]] = []

    def failed(self, where: Path, err: OSError) -> None:
        if errors.out_of_descriptors(err):  # nbankd's limit, not the folder's access
            raise err
        if not isinstance(err, FileNotFoundError):  # gone meanwhile: nothing in it
            self.unreadable.append((where, err.strerror or str(err)))

    def open_top(self, root: Path, parts: list[str]) -> int | None:
        """The rejected folder, opened from the inbox folder without following a link;
        None when it cannot be (told as it should be)."""
        try:
            fd = os.open(root, _ROOT_FLAGS)
        except OSError as err:
            self.failed(self.top, err)
            return None
        where = root
        for part in parts:
            where = where / part
            try:
                child = os.open(part, DIR_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    self.not_folders.append((where, _kind_at(fd, part)))
                else:
                    self.failed(self.top, err)
                os.close(fd)
                return None
            os.close(fd)
            fd = child
        return fd

    def list_one(self, fd: int, here_path: Path) -> list[str]:
        """Sorts out the entries of the open folder ``here_path``; returns the names of
        the sub-folders to walk."""
        dirs: set[str] = set()
        files: list[str] = []
        with os.scandir(fd) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    dirs.add(entry.name)
                else:
                    files.append(entry.name)
        files.sort()
        here = dirs.union(files)
        explained: set[str] = set()
        for name in files:
            if not name.endswith(REASON_SUFFIX):
                continue
            target = name[: -len(REASON_SUFFIX)]
            if target not in here:  # a shortened name: the reason says, in this folder
                reason = read_reason(Path(f"/proc/self/fd/{fd}", name)) or {}
                said = reason.get("rejected_path")
                # only the input beside it whose name it was made from (never elsewhere)
                beside = shortened_reason_target(name, reason)
                if beside is None or os.path.dirname(str(said)) != str(here_path):
                    continue
                target = beside
            if target in here and target not in explained:
                explained.add(target)
                self.inputs.append(here_path / target)
        walked = []
        for name in sorted(dirs):
            path = here_path / name
            if path not in self.others and name not in explained:
                walked.append(name)
        for name in files:
            if _bookkeeping(name) or name in explained:
                continue
            if any(name.endswith(c) and name[: -len(c)] in here for c in self.companions):
                continue  # told with what it belongs to
            self.unexplained.append(here_path / name)
        return walked

    def run(self, root: Path, folder: str) -> RejectedContents:
        top = self.open_top(root, [p for p in folder.split("/") if p])
        if top is not None:
            self.walk(top)
        return RejectedContents(
            tuple(self.inputs),
            tuple(self.unexplained),
            tuple(self.unreadable),
            tuple(self.not_folders),
        )

    def walk(self, top: int) -> None:
        # folders to list, last in first out: (path, depth, the folder to open it
        # from and its name there; None for the top, already open)
        stack: list[tuple[Path, int, tuple[HeldFolder, str] | None]] = [(self.top, 0, None)]
        with HeldFolders() as held:
            first = held.hold(top)
            while stack:
                path, depth, parent = stack.pop()
                if parent is None:
                    here = first
                else:
                    try:
                        fd = os.open(parent[1], DIR_NOFOLLOW, dir_fd=parent[0].fd)
                    except OSError as err:
                        if err.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced meanwhile
                            self.unexplained.append(path)
                        else:
                            self.failed(path, err)
                        continue
                    finally:
                        held.opened_from(parent[0])
                    here = held.hold(fd)
                try:
                    subs = self.list_one(here.fd, path)
                except OSError as err:
                    held.close(here)
                    self.failed(path, err)
                    continue
                if subs and depth + 1 > WALK_DEPTH:
                    held.close(here)
                    self.unreadable.append(
                        (path, f"more than {WALK_DEPTH} folder levels deep: not looked in")
                    )
                    continue
                for name in reversed(subs):  # listed in order, like the entries
                    held.below(here)
                    stack.append((path / name, depth + 1, (here, name)))
                held.listed(here)


def rejected_contents(config: InboxConfig, folder: str | None = None) -> RejectedContents:
    """What the inbox's rejected folder ``folder`` (relative to the inbox) holds;
    without ``folder``, the rejected folder's and then each earlier one's still there.
    A rejected input that is a folder is one entry (not walked); another rejected
    folder nested inside the one walked is left to its own walk. A folder that
    cannot be listed is in :attr:`RejectedContents.unreadable`, never taken for an
    empty one; one gone (or not made yet) holds nothing; a link or a file in the
    place of a rejected folder is in :attr:`RejectedContents.not_folders`, never
    followed. See the module docstring."""
    if folder is None:
        total = RejectedContents()
        for each in config.rejected_dirs:
            total += rejected_contents(config, each)
        return total
    return _Walk(config, folder).run(config.path, folder)


__all__ = ["WALK_DEPTH", "RejectedContents", "rejected_contents"]
