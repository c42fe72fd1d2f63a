"""Neurobank archives on disk: create, open, name resources, list them, apply the policy.

The layout is neurobank 0.13's (see SPEC section 2)::

    ARCHIVE/nbank.json            configuration and policy
    ARCHIVE/README.md             what this folder is
    ARCHIVE/.gitignore            resources/ and staging/
    ARCHIVE/staging/              work in progress, safe to delete
    ARCHIVE/resources/ab/abcdef12[.ext]

Permissions follow neurobank's mode policy, so ``nbank archive check`` finds nothing
to report: ``resources/``, its two-character stub folders and ``staging/`` get every
bit the umask allows plus setgid (``2775`` with umask ``002``); a stored file gets
``0444 & ~umask`` when resources are read-only (else ``0664 & ~umask``), and folders
inside a directory resource ``0555 & ~umask`` (else ``0775 & ~umask``). The group is
the policy's ``access.group``; nbankd changes groups where it may but never owners
(the service user is the archive's ``access.user``).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from nbankd import errors

CONFIG_NAME = "nbank.json"
README_NAME = "README.md"
GITIGNORE_NAME = ".gitignore"
RESOURCES_NAME = "resources"
STAGING_NAME = "staging"
CONFIG_SCHEMA = "https://melizalab.github.io/neurobank/config.json#"
DEFAULT_UMASK = 0o002
POLICY_KEYS = (
    "auto_identifiers",
    "auto_id_type",
    "keep_extensions",
    "allow_directories",
    "require_hash",
)


@dataclass(frozen=True)
class AccessPolicy:
    """Who owns the archive's files and which permissions they get."""

    user: str | None
    group: str | None
    umask: int = DEFAULT_UMASK
    read_only_resources: bool = True


@dataclass(frozen=True)
class ArchivePolicy:
    """The deposit policy recorded in ``nbank.json``."""

    auto_identifiers: bool = False
    auto_id_type: str | None = None
    keep_extensions: bool = True
    allow_directories: bool = False
    require_hash: bool = True
    access: AccessPolicy = field(default_factory=lambda: AccessPolicy(None, None))


@dataclass(frozen=True)
class Anomaly:
    """Something under ``resources/`` that is not a well-placed resource.

    ``kind`` sorts them: ``unlistable`` (a folder that cannot be listed), ``stray``
    (not a stub folder), ``partial`` (``.NAME.partial``, an incomplete transfer),
    ``nfs`` (``.nfs*``, NFS's name for a file deleted while open), ``hidden`` (another
    dot-file), ``symlink``, ``misplaced`` (a resource in the wrong stub folder; ``id``
    names it).
    """

    path: Path
    reason: str
    kind: str = "stray"
    id: str | None = None


#: lists a folder: (entry name, kind), kind being "dir", "file", "link" or "other"
Lister = Callable[[Path], Iterable[tuple[str, str]]]


def candidate_stubs(id: str) -> tuple[str, ...]:
    """The stub folders a resource ``id`` may be found in: ``id[:2]``, where it belongs
    (as ``nbank``'s check and ``resource_path`` look), and for a one-character
    identifier also ``id + "."``, where nbank 0.13's deposit files ``a.json``."""
    return (id[:2],) if len(id) > 1 else (id, id + ".")


def stored_file(archive_path: Path, id: str, stored_name: str) -> Path:
    """``archive_path/resources/<id[:2]>/<stored_name>``: a resource filed by its
    identifier (the one home of this rule for deposits, receipts and explanations)."""
    return _stub_folder(archive_path, id[:2]) / stored_name


@functools.lru_cache(maxsize=1024)
def _stub_folder(archive_path: Path, stub: str) -> Path:
    """``archive_path/resources/<stub>``, joined once per stub (every step of every
    deposit asks for its stored file: pathlib's joins were a tenth of a small file's
    CPU)."""
    return archive_path / RESOURCES_NAME / stub


#: every name nbankd uses in ``staging/`` starts with this (nbank uses other names)
STAGED_PREFIX = ".nbankd-"


class StagedName(NamedTuple):
    """A deposit's staged name, parsed: the item's journal token and the instance of
    the process that wrote it (None: a name from a release before instances)."""

    token: str
    instance: str | None


def staged_name(token: str, instance: str | None = None) -> str:
    """The name of a deposit's staged copy in ``staging/``: ``.nbankd-TOKEN-INSTANCE``
    (``instance``: the writing process's, so no two processes share a name), or
    ``.nbankd-TOKEN`` without one, as releases before instances named every copy
    (journals in flight from them still use it). The one home of this rule; read
    back by :func:`parse_staged_name`."""
    return f"{STAGED_PREFIX}{token}" if instance is None else f"{STAGED_PREFIX}{token}-{instance}"


def parse_staged_name(name: str) -> StagedName | None:
    """The token and instance of a staged name :func:`staged_name` built (either form);
    None for a name not starting with :data:`STAGED_PREFIX`. Tokens and instances are
    hexadecimal, so the first ``-`` after the prefix separates them (the copies of
    tape imports and transfers, ``.nbankd-tar-...`` and ``.nbankd-copy-...``, parse
    to tokens no journal holds)."""
    if not name.startswith(STAGED_PREFIX):
        return None
    token, dash, instance = name[len(STAGED_PREFIX) :].partition("-")
    return StagedName(token, instance if dash else None)


class Listing:
    """The names of one stub folder, indexed by the identifier each would file (the
    part before its first dot: ``abc`` and ``abc.wav`` are ``abc``'s), for
    :meth:`Archive.stored_entries` to find an identifier's names without a pass over
    all of them. Kept up to date by its owner (:meth:`add`, :meth:`discard`). Compact:
    an identifier filed by one name (the usual case) costs one dictionary entry."""

    __slots__ = ("_by_id", "_count")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._by_id: dict[str, str | set[str]] = {}
        self._count = 0
        for name in names:
            self.add(name)

    def __len__(self) -> int:
        return self._count

    def add(self, name: str) -> None:
        key = name.partition(".")[0]
        have = self._by_id.get(key)
        if have is None:
            self._by_id[key] = name
        elif isinstance(have, str):
            if have == name:
                return
            self._by_id[key] = {have, name}
        elif name in have:
            return
        else:
            have.add(name)
        self._count += 1

    def discard(self, name: str) -> None:
        key = name.partition(".")[0]
        have = self._by_id.get(key)
        if have == name:
            del self._by_id[key]
        elif isinstance(have, set) and name in have:
            have.discard(name)
            if len(have) == 1:
                self._by_id[key] = next(iter(have))
        else:
            return
        self._count -= 1

    def of(self, id: str) -> list[str]:
        """The names that file ``id``: ``id`` itself and ``id.*``."""
        have = self._by_id.get(id.partition(".")[0])
        names = [] if have is None else [have] if isinstance(have, str) else list(have)
        if "." in id:  # indexed under the part before its first dot
            names = [n for n in names if n == id or n.startswith(id + ".")]
        return names


#: :meth:`Archive.stored_entries`'s ``known``: the names of stub folder ``stub`` that
#: file ``id`` as known without listing it (a :class:`Listing` made earlier, or
#: :class:`~nbankd.archive.stubnames.StubNames`), or None to list it now; raises the
#: OSError listing it raised (FileNotFoundError: no such folder)
Known = Callable[[Path, str], "list[str] | None"]


def _entry_kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "link"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "file" if entry.is_file(follow_symlinks=False) else "other"


def scan_dir(path: Path) -> list[tuple[str, str]]:
    """The default :data:`Lister`: ``os.scandir``, links not followed."""
    with os.scandir(path) as it:
        return [(e.name, _entry_kind(e)) for e in it]


def _stem(name: str) -> str:
    """``PurePath(name).stem`` without making a path (an archive has 100k names)."""
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name


_NFS_REASON = "NFS placeholder of a file deleted while still open; it goes when it is closed"


def _classify(stub: Path, name: str, kind: str) -> Anomaly | None:
    """The anomaly an entry of stub folder ``stub`` is, or None for a well-placed resource."""
    path = stub / name
    if name.startswith(".") and name.endswith(".partial"):
        return Anomaly(path, "left over from an incomplete transfer", "partial", _stem(name[1:-8]))
    if name.startswith(".nfs"):
        return Anomaly(path, _NFS_REASON, "nfs")
    if name.startswith("."):
        return Anomaly(
            path, "hidden file: not a resource (identifiers never start with '.')", "hidden"
        )
    if kind == "link":
        return Anomaly(path, "symbolic link", "symlink")
    id = _stem(name)
    if id[:2] != stub.name:
        return Anomaly(path, f"in the wrong stub folder (expected {id[:2]})", "misplaced", id)
    return None


@dataclass(frozen=True)
class Archive:
    """An opened neurobank archive. ``path`` is absolute; ``config`` is nbank.json as read."""

    path: Path
    registry_url: str
    policy: ArchivePolicy
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def resources_dir(self) -> Path:
        return self.path / RESOURCES_NAME

    @functools.cached_property
    def staging_dir(self) -> Path:
        return self.path / STAGING_NAME

    @functools.cached_property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def name(self) -> str:
        """The default registry name of the archive: its folder name (as ``nbank init``)."""
        return self.path.name

    def resource_path(self, id: str, ext: str | None = None) -> Path:
        """Returns ``resources/<id[:2]>/<id>[.ext]``; ``ext`` may be given with or without a dot."""
        if not id or "/" in id or id in (".", ".."):
            raise errors.InvalidIdentifier(f"'{id}' is not a usable resource identifier")
        name = id
        if ext:
            name += ext if ext.startswith(".") else f".{ext}"
        return self.resources_dir / id[:2] / name

    def stored_file(self, id: str, stored_name: str) -> Path:
        """Where the resource ``id`` stored as ``stored_name`` is filed: the stub is the
        identifier's first two characters (``a.json`` of identifier ``a`` is in ``a/``)."""
        return stored_file(self.path, id, stored_name)

    def new_resource_path(self, id: str, source_name: str) -> Path:
        """Returns where a new resource goes: with the source's suffix if extensions are kept."""
        suffix = Path(source_name).suffix if self.policy.keep_extensions else ""
        return self.resource_path(id, suffix or None)

    def stored_path(self, id: str, *, lister: Lister | None = None) -> Path | None:
        """Returns the entry stored for ``id`` whatever its extension, or None.

        The first of :meth:`stored_entries`: where the identifier files it before the
        other stub a one-character identifier may have been filed under.
        """
        found = self.stored_entries(id, lister=lister)
        return found[0] if found else None

    def stored_entries(
        self, id: str, *, lister: Lister | None = None, known: Known | None = None
    ) -> list[Path]:
        """Every entry stored for ``id`` whatever its extension, in both stub folders
        it can be in (:func:`candidate_stubs`), the proper one first.

        Any directory entry counts, including symbolic links and directories, so a
        caller that finds none may publish without replacing anything. ``lister``
        lists a stub folder (default: ``os.listdir``; audits list without touching
        the folder's atime); ``known`` answers without a listing, for the folders it
        can (:data:`Known`: no pass over a folder's thousands of names per identifier).
        """
        exact = self.resource_path(id)  # validates the identifier
        found: list[Path] = []
        for stub_name in candidate_stubs(id):
            stub = self.resources_dir / stub_name
            try:
                listed = known(stub, id) if known is not None else None
                if listed is not None:
                    ours = listed
                else:
                    if lister is None:
                        names = os.listdir(stub)
                    else:
                        names = [name for name, _kind in lister(stub)]
                    # a stub folder may hold many thousands of names: filter, then sort
                    ours = [n for n in names if n.startswith(id)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                raise unavailable(self, err, f"listing {stub}") from err
            if exact.name in ours:
                found.append(stub / exact.name)
            found += [stub / n for n in sorted(ours) if n.startswith(id + ".")]
        return found

    def iter_resources(
        self,
        anomalies: list[Anomaly] | None = None,
        *,
        lister: Lister | None = None,
        listed: list[Path] | None = None,
    ) -> Iterator[tuple[str, Path]]:
        """Yields ``(id, path)`` for every stored resource, in sorted order.

        Symbolic links are never followed. Entries that are not well-placed resources
        (stray files, symlinks, leftovers of partial transfers, dot-files, files in the
        wrong stub folder, folders that cannot be listed) are skipped and appended to
        ``anomalies`` if given (see :class:`Anomaly`). A stub folder that vanished
        since ``resources/`` was listed (pruned meanwhile) is skipped silently; each
        stub folder listed successfully is appended to ``listed`` if given. ``lister``
        lists a folder (default: :func:`scan_dir`).
        """
        found = anomalies if anomalies is not None else []
        ls = lister or scan_dir
        base = self.resources_dir
        try:
            stubs = sorted(ls(base))
        except OSError as err:
            found.append(Anomaly(base, _unlistable(err), "unlistable"))
            return
        for stub_name, kind in stubs:
            stub = base / stub_name
            if stub_name.startswith(".nfs"):
                found.append(Anomaly(stub, _NFS_REASON, "nfs"))
                continue
            if kind != "dir":
                found.append(Anomaly(stub, "not a stub folder"))
                continue
            try:
                entries = sorted(ls(stub))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed since resources/ was listed (pruned)
            except OSError as err:
                found.append(Anomaly(stub, _unlistable(err), "unlistable"))
                continue
            if listed is not None:
                listed.append(stub)
            for name, entry_kind in entries:
                anomaly = _classify(stub, name, entry_kind)
                if anomaly is None:
                    yield _stem(name), stub / name
                else:
                    found.append(anomaly)


# --- errors -------------------------------------------------------------------------


def _unlistable(err: OSError) -> str:
    """An anomaly's reason for a folder that cannot be listed, with what to do."""
    why = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM):
        what = "check its owner and mode against nbank.json (nbank archive check --fix)"
    elif err.errno == errno.EIO:
        what = "an I/O error: check the disk or the NFS server"
    else:
        what = "check the folder"
    return f"unable to list: {why}; {what}"


def unavailable(archive: Archive | Path, err: OSError, doing: str) -> errors.NbankdError:
    """Classifies an archive-side OSError: transient (ArchiveUnavailable) unless hopeless.

    Disk full (ENOSPC, EDQUOT), I/O errors, read-only or vanished mounts (EROFS,
    ESTALE, ENOTCONN, ENOENT of the archive's own folders) and permission errors
    (EACCES, EPERM: an administrator can fix them while the work waits) are
    transient. Names the filesystem rejects (ENAMETOOLONG, EILSEQ) and cross-device
    placement (EXDEV) are permanent :class:`~nbankd.errors.ArchiveError`. The process
    out of file descriptors is :class:`~nbankd.errors.OpenFileLimit` (its own problem).
    """
    root = archive.path if isinstance(archive, Archive) else Path(archive)
    if errors.out_of_descriptors(err):  # nbankd's own limit, never the archive's
        return errors.open_file_limit(err, f"{doing} in archive {root}")
    reason = err.strerror or str(err)
    message = f"archive {root}: {reason} while {doing}"
    if err.errno in errors.PERMANENT_ERRNOS:
        return errors.ArchiveError(message)
    hints = {
        errno.ENOSPC: "free space on the archive's filesystem",
        errno.EDQUOT: "raise the quota of the service user",
        errno.EROFS: "the filesystem is mounted read-only",
        errno.EACCES: "check the archive's owner, group and modes",
        errno.EPERM: "check the archive's owner, group and modes",
        errno.ENOENT: "is the filesystem mounted?",
        errno.ESTALE: "is the filesystem mounted?",
    }
    return errors.ArchiveUnavailable(message, hint=hints.get(err.errno or 0, "retrying later"))


__all__ = [
    "STAGED_PREFIX",
    "AccessPolicy",
    "Anomaly",
    "Archive",
    "ArchivePolicy",
    "Known",
    "Lister",
    "Listing",
    "StagedName",
    "candidate_stubs",
    "parse_staged_name",
    "scan_dir",
    "staged_name",
    "stored_file",
    "unavailable",
]
