"""One pass over an inbox: what is there, what kind of thing it is, and its identity.

The scan never follows a symbolic link, never opens a file and never reads file
contents: it lists folders (``os.scandir``) and ``lstat``\\ s entries. That is what
lets it classify the things guarantee 7 forbids (symlinks, hard links, FIFOs,
sockets, devices) without touching them.

Decisions, documented here once:

**Names.** File names are arbitrary bytes on Linux. ``Entry.relpath`` is a ``str``
made by :func:`os.fsdecode` (the filesystem encoding with ``surrogateescape``), so
undecodable bytes become lone surrogates and :func:`os.fsencode` gives the exact
original bytes back. Every path the scan builds goes through the same two
functions, so a relpath can always be joined to the inbox root and opened again.
Names may contain newlines and control characters: use :func:`printable` (never
the raw relpath) in log lines and human-readable messages.

**Ignore patterns** (``ignore``) use :func:`fnmatch.fnmatchcase` (case-sensitive, as
Linux names are). A pattern without ``/`` is matched against *every component* of
the relative path, so ``.*`` hides dotfiles and dot-folders (``.nbank``,
``.git``, rsync's ``.name.XXXXXX`` temporaries) at any depth, and ``*.tmp`` hides a
file or a whole folder of that name. A pattern containing ``/`` is matched against
the whole relative POSIX path (``*`` then also matches ``/``). An ignored name is
skipped entirely: not reported, not descended. Ignore patterns do not apply
*inside* a directory resource: everything in it is part of the resource.

**Excluded folders** (``exclude``) are relative POSIX paths (normally the work
folder ``.nbank`` and the rejected folder) that are never listed, descended or
reported, whatever the ignore patterns say.

**Sidecars** (``NAME.nbank.yaml|json``) are reported as ``SIDECAR`` whatever their
type: a symlink, hard link, FIFO or device under a sidecar's name belongs to its
input, which the pipeline then rejects (``bad-sidecar``) without opening the sidecar.

**Directory resources.** With ``directories_as_resources`` each top-level folder is
one entry of kind ``DIRECTORY_RESOURCE`` whose identity summarises the whole tree
(:mod:`nbankd.watch.identity`).

**Unreadable folders** never stop a scan: each is reported as an entry of kind
``UNREADABLE`` with the OS error in ``problem``. An entry that vanishes between
listing and ``lstat`` (a writer's temporary file) is simply not reported. Only a
root that cannot be listed raises :class:`OSError` (the inbox itself is missing or
unreadable, which the caller must handle differently from "empty").
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
import os
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nbankd.filekind import FileKind
from nbankd.mounts import MountKey, mount_key
from nbankd.names import MARKER_SUFFIX, SIDECAR_SUFFIXES
from nbankd.watch.identity import Identity, OnAnotherMount, _Child, iter_folder, tree_summary


class EntryKind(enum.Enum):
    """What a scanned name is. Only ``FILE`` and ``DIRECTORY_RESOURCE`` are inputs."""

    FILE = "file"  # a regular file with one link: an input
    DIRECTORY_RESOURCE = "directory-resource"  # a top-level folder, one input (resources mode)
    SYMLINK = "symlink"  # never followed
    HARDLINK = "hardlink"  # regular file with nlink > 1: never read
    FIFO = "fifo"
    SOCKET = "socket"
    DEVICE = "device"  # character or block device
    SIDECAR = "sidecar"  # NAME.nbank.yaml / NAME.nbank.json, belongs to NAME
    MARKER = "marker"  # NAME.done, belongs to NAME
    DIRECTORY = "directory"  # a folder a non-recursive, files-mode scan does not enter
    UNREADABLE = "unreadable"  # a folder or entry that could not be listed or lstat'ed
    OTHER = "other"  # any other file type

    @property
    def is_input(self) -> bool:
        """True for the kinds the pipeline deposits."""
        return self in (EntryKind.FILE, EntryKind.DIRECTORY_RESOURCE)

    @property
    def is_unsafe(self) -> bool:
        """True for the kinds guarantee 7 forbids reading, following or archiving."""
        return self in _UNSAFE


# how a scan reports each kind of file (folders are listed, never classified here)
_ENTRY_KINDS = {
    FileKind.FILE: EntryKind.FILE,
    FileKind.HARDLINK: EntryKind.HARDLINK,
    FileKind.SYMLINK: EntryKind.SYMLINK,
    FileKind.FIFO: EntryKind.FIFO,
    FileKind.SOCKET: EntryKind.SOCKET,
    FileKind.DEVICE: EntryKind.DEVICE,
    FileKind.DIRECTORY: EntryKind.DIRECTORY,
    FileKind.OTHER: EntryKind.OTHER,
}

_UNSAFE = frozenset(
    {
        EntryKind.SYMLINK,
        EntryKind.HARDLINK,
        EntryKind.FIFO,
        EntryKind.SOCKET,
        EntryKind.DEVICE,
        EntryKind.OTHER,
    }
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing found in an inbox.

    ``relpath`` is POSIX, relative to the inbox root, decoded with surrogateescape
    (``os.fsencode(relpath)`` is the on-disk name). ``owner`` is set for sidecars and
    markers: the relpath of the input they belong to (which may be absent).
    ``identity`` is None only for ``UNREADABLE`` entries. ``problem`` explains an
    ``UNREADABLE`` entry, or what is wrong inside a directory resource.
    """

    relpath: str
    kind: EntryKind
    identity: Identity | None
    owner: str | None = None
    problem: str | None = None

    @property
    def name(self) -> str:
        """The last component of ``relpath``."""
        return self.relpath.rpartition("/")[2]

    def path(self, root: Path | str) -> Path:
        """The absolute path of this entry under ``root``."""
        return Path(root, self.relpath)


def owner_of(name: str, *, markers: bool = True) -> tuple[EntryKind, str] | None:
    """For a sidecar or marker basename, its kind and the basename it belongs to.

    ``markers=False`` (``ready: settle`` inboxes) treats ``NAME.done`` as a plain name.
    Returns None for any other name, and for a bare suffix (``.nbank.yaml``).
    """
    for suffix in SIDECAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return EntryKind.SIDECAR, name[: -len(suffix)]
    if markers and name.endswith(MARKER_SUFFIX) and len(name) > len(MARKER_SUFFIX):
        return EntryKind.MARKER, name[: -len(MARKER_SUFFIX)]
    return None


def is_excluded(relpath: str, exclude: Collection[str]) -> bool:
    """True when ``relpath`` is an excluded folder (the work folder, the rejected
    folder, the canary) or lies inside one: the one rule for scanner and watcher.
    Both are normalised relative paths (no ``.``, no empty or trailing parts)."""
    return any(relpath == ex or relpath.startswith(ex + "/") for ex in exclude)


def is_ignored(relpath: str, ignore: Sequence[str]) -> bool:
    """True when ``relpath`` (or any folder above it) matches an ignore pattern."""
    parts = relpath.split("/")
    for pattern in ignore:
        if "/" in pattern:
            if fnmatch.fnmatchcase(relpath, pattern):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def is_hidden(relpath: str, ignore: Sequence[str], *, markers: bool = True) -> bool:
    """True when ``relpath`` is ignored (:func:`is_ignored`), unless it is a sidecar or
    (``markers``: a ``ready: marker`` inbox) a marker of a name that is not: an input's
    sidecar and marker are never inputs themselves, and go with their input whatever
    the patterns (``ignore: ['*.json']`` still reads ``rec.dat.nbank.json``); one of
    an ignored name is ignored with it."""
    if not is_ignored(relpath, ignore):
        return False
    parent, _, name = relpath.rpartition("/")
    companion = owner_of(name, markers=markers)
    if companion is None:
        return True
    owner = f"{parent}/{companion[1]}" if parent else companion[1]
    return is_ignored(owner, ignore)


def scan_inbox(
    root: Path | str,
    *,
    recursive: bool,
    ignore: Sequence[str] = (),
    exclude: Collection[str] = (),
    directories_as_resources: bool = False,
    markers: bool = True,
    folders: dict[int, str] | None = None,
    known: Callable[[str], Identity | None] | None = None,
    root_id: tuple[int, int] | None = None,
) -> list[Entry]:
    """Lists an inbox once and classifies what it holds, sorted by on-disk name.

    ``recursive`` descends into sub-folders (files mode); otherwise top-level
    folders are reported as ``DIRECTORY`` and not entered. With
    ``directories_as_resources`` every top-level folder is one
    ``DIRECTORY_RESOURCE`` entry (``recursive`` is then irrelevant). ``exclude``
    holds relative paths never entered nor reported (the work and rejected
    folders); ``ignore`` holds fnmatch patterns (see the module docstring).
    ``markers`` makes ``NAME.done`` a ``MARKER`` (pass ``ready == "marker"``).
    ``folders``, when given, receives the inode number and relpath of every folder
    the scan listed (the root's relpath is ``""``): the watcher checks them against
    its watches. ``known``, when given, says the identity an earlier scan saw for a
    relpath (or None): an entry whose identity equals it holds that object, so a large
    unchanged inbox is not held twice while a scan is compared with the last one.
    ``root_id``, when given, is the (device, inode) ``root`` must still name (the
    folder the daemon checked just before): one swapped for a link or another folder
    since is never listed (FileNotFoundError).

    Raises :class:`OSError` only when ``root`` itself cannot be listed.
    """
    top = os.fsdecode(root)
    exclude = tuple(_norm(e) for e in exclude)
    entries: list[Entry] = []
    within = _mount_of(top)
    stack: list[tuple[str, int | None]] = [("", None)]
    first = True
    while stack:
        rel, ino = stack.pop()
        # one child at a time (a folder of 100,000 files never holds all their lstats);
        # a folder counts only once listed to the end, as before
        found: list[Entry] = []
        below: list[tuple[str, int | None]] = []
        try:
            where = os.path.join(top, rel) if rel else top
            listing = iter_folder(
                where, ino, expect_id=None if rel else root_id, within=within if rel else None
            )
            for name, child in listing:
                _take(
                    top,
                    rel,
                    name,
                    child,
                    found,
                    below,
                    exclude,
                    ignore,
                    recursive,
                    directories_as_resources,
                    markers,
                    known,
                    within,
                )
        except OnAnotherMount:
            entries.append(Entry(rel, EntryKind.UNREADABLE, None, problem=MOUNT_PROBLEM))
            continue
        except (FileNotFoundError, NotADirectoryError):
            if first:
                raise
            continue  # vanished (or replaced) since its parent was listed
        except OSError as err:
            if first:
                raise
            entries.append(Entry(rel, EntryKind.UNREADABLE, None, problem=_describe(err)))
            continue
        if folders is not None and ino is not None:
            folders[ino] = rel
        elif folders is not None:
            with contextlib.suppress(OSError):  # vanished just now: the next scan says so
                folders[os.stat(top).st_ino] = ""
        first = False
        entries.extend(found)
        stack.extend(below)
    entries.sort(key=lambda e: os.fsencode(e.relpath))
    return entries


def iter_inputs(entries: Sequence[Entry]) -> Iterator[Entry]:
    """The entries the pipeline deposits (``FILE`` and ``DIRECTORY_RESOURCE``)."""
    return (e for e in entries if e.kind.is_input)


# --- internals -------------------------------------------------------------------------


def _take(
    top: str,
    rel: str,
    name: str,
    child: _Child,
    found: list[Entry],
    below: list[tuple[str, int | None]],
    exclude: Collection[str],
    ignore: Sequence[str],
    recursive: bool,
    directories_as_resources: bool,
    markers: bool,
    known: Callable[[str], Identity | None] | None,
    within: MountKey | None,
) -> None:
    """Classifies one listed child of folder ``rel`` into ``found`` (entries) or
    ``below`` (sub-folders still to list); ``within`` is the inbox folder's mount."""
    crel = f"{rel}/{name}" if rel else name
    if is_excluded(crel, exclude) or is_hidden(crel, ignore, markers=markers):
        return
    try:
        st = child.stat(follow_symlinks=False)
    except FileNotFoundError:
        return  # vanished between listing and lstat
    except OSError as err:
        found.append(Entry(crel, EntryKind.UNREADABLE, None, problem=_describe(err)))
        return
    if stat.S_ISDIR(st.st_mode):
        if is_ignored(crel, ignore):  # a folder named like a companion: ignored
            return
        if directories_as_resources and not rel:
            resource = _directory_resource(top, crel, within)
            if resource is not None:
                found.append(resource)
        elif recursive:
            below.append((crel, st.st_ino))
        else:
            found.append(Entry(crel, EntryKind.DIRECTORY, Identity.of(st)))
        return
    found.append(_classify(crel, name, st, markers=markers, parent=rel, known=known))


#: what status says of a mount point inside an inbox (never entered nor deposited)
MOUNT_PROBLEM = (
    "a mount point inside the inbox (another filesystem or a bind mount): not scanned, "
    "since nothing on it can be moved into the work folder; unmount it, or copy its "
    "files into the inbox's own folders"
)


def _mount_of(top: str) -> MountKey | None:
    """The mount of the inbox folder ``top`` (None when it cannot be opened: the scan
    then fails on it as before)."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mount_key(fd)
    finally:
        os.close(fd)


def _norm(relpath: str) -> str:
    return "/".join(p for p in os.fsdecode(relpath).split("/") if p not in ("", "."))


def _describe(err: OSError) -> str:
    return f"{err.strerror or err} (errno {err.errno})" if err.errno else str(err)


def _classify(
    relpath: str,
    name: str,
    st: os.stat_result,
    *,
    markers: bool,
    parent: str,
    known: Callable[[str], Identity | None] | None = None,
) -> Entry:
    identity = Identity.of(st)
    if known is not None:
        seen = known(relpath)
        if seen is not None and seen == identity:
            identity = seen  # the earlier scan's object: one per unchanged file
    companion = owner_of(name, markers=False)
    if companion is not None:
        # a sidecar of any type stays with its input (never split off to be rejected on
        # its own while the input is deposited without it); the pipeline refuses one
        # that is not a plain file (bad-sidecar) without ever opening it
        owner = companion[1]
        return Entry(
            relpath, EntryKind.SIDECAR, identity, owner=f"{parent}/{owner}" if parent else owner
        )
    kind = FileKind.of(st)
    if kind is FileKind.FILE:
        companion = owner_of(name, markers=markers)
        if companion is not None:
            marker, owner = companion
            return Entry(relpath, marker, identity, owner=f"{parent}/{owner}" if parent else owner)
    return Entry(relpath, _ENTRY_KINDS[kind], identity)


def _directory_resource(top: str, relpath: str, within: MountKey | None = None) -> Entry | None:
    """The entry of a top-level folder in resources mode; None if it vanished. One that
    is a mount point (``within``: the inbox folder's mount) is not entered."""
    try:
        summary = tree_summary(os.path.join(top, relpath), within=within)
    except FileNotFoundError:
        return None
    except OSError as err:
        return Entry(relpath, EntryKind.UNREADABLE, None, problem=_describe(err))
    if "" in summary.unreadable:
        return Entry(relpath, EntryKind.UNREADABLE, None, problem="folder cannot be listed")
    if "" in summary.mounts:
        return Entry(relpath, EntryKind.UNREADABLE, None, problem=MOUNT_PROBLEM)
    return Entry(relpath, EntryKind.DIRECTORY_RESOURCE, summary.identity, problem=summary.problem)
