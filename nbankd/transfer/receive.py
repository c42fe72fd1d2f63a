"""Copying a stored resource into another neurobank archive on this host.

The copy goes through the deposit pipeline's durable primitives
(:mod:`nbankd.archive.durable`): the source is read once into the destination's
``staging/`` under a name of this process (hashing in the same pass), compared with
the registered SHA-1, published into ``resources/`` with the destination's access
policy and without replacing anything (under the identifier lock a daemon
depositing into the same archive also takes), read back from storage, and only then
located in the registry. A copy the registry refuses is removed again; a copy made
while the registry cannot be reached stays, for ``nbankctl archive check`` to find.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.fsops import fsync_dir, remove_ours
from nbankd.archive.layout import Archive, candidate_stubs, unavailable
from nbankd.archive.staging import process_staged_name
from nbankd.hashing import SourceReadError
from nbankd.registry.base import Registry
from nbankd.streaming import totals_to_deltas
from nbankd.transfer.reading import Advance, check_sha1, read_resource

STAGED_PREFIX = durable.STAGED_PREFIX + "copy-"
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Copied:
    """A copied (or, in a dry run, checked) resource.

    ``path`` is the stored copy (None in a dry run); ``created`` is False when an
    identical copy was already there; ``verified`` False when nothing is registered
    to check against.
    """

    path: Path | None
    sha1: str
    size: int
    verified: bool
    created: bool = False


def _open_file(path: Path) -> int:
    try:
        fd = os.open(path, _OPEN_FILE)
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, str(path)) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise durable.unsafe_input(path, "not a regular file")
    return fd


def _totals(advance: Advance | None) -> Callable[[int], None] | None:
    """Turns advance(block) into progress(total so far), as staging reports it."""
    return None if advance is None else totals_to_deltas(advance)


def _stage(archive: Archive, source: Path, id: str, advance: Advance | None) -> durable.Staged:
    name = process_staged_name(STAGED_PREFIX, id)
    try:
        is_dir = stat.S_ISDIR(os.lstat(source).st_mode)
    except OSError as err:
        raise SourceReadError(err.errno, err.strerror, str(source)) from err
    if is_dir:
        # a stored resource, registered as it is: copied whatever its depth
        return durable.stage_copy_tree(
            archive, source, name, progress=_totals(advance), max_depth=None
        )
    fd = _open_file(source)
    try:
        return durable.stage_copy(archive, fd, name, progress=_totals(advance))
    finally:
        os.close(fd)


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file or folder (st_dev and st_ino, whatever the
    paths); False when either cannot be looked at."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_own_copy(archive: Archive, source: Path, id: str) -> None:
    """Raises UsageError when the stored copy ``source`` of ``id`` is already in
    ``archive`` itself: the same folder reached by another path (a bind mount, one
    NAS mounted at two paths, registered as two archives). Copying it there would find
    the source as its "identical existing copy" and register a second location for a
    single stored file."""
    target = archive.new_resource_path(id, source.name)
    stubs = [archive.resources_dir / stub for stub in candidate_stubs(id)]
    if _same(source, target) or any(_same(source.parent, stub) for stub in stubs):
        raise errors.UsageError(
            f"'{source}' of '{id}' is already in the destination archive {archive.path} "
            "(the same folder reached by another path): copying it would register a "
            "second location for one stored file",
            hint="copy into an archive on other storage; ask the registry's admin to "
            "merge the archives registered for this one folder",
        )


def copy_resource(
    archive: Archive,
    source: Path,
    id: str,
    registered: str | None,
    *,
    dry_run: bool = False,
    advance: Advance | None = None,
) -> Copied:
    """Stores the resource ``id`` read from ``source`` in ``archive``, checked against
    ``registered``; with ``dry_run`` only reads and checks it.

    Raises UsageError when ``source`` is in ``archive`` itself
    (:func:`refuse_own_copy`), :class:`~nbankd.transfer.reading.Mismatch` (nothing kept),
    :class:`~nbankd.errors.ResourceExists` when the archive holds something else
    under the identifier, SourceReadError or the archive's errors.
    """
    refuse_own_copy(archive, source, id)
    if dry_run:
        read = read_resource(source, advance=advance)
        return Copied(None, read.sha1, read.size, check_sha1(read.sha1, registered, str(source)))
    staged = _stage(archive, source, id, advance)
    try:
        verified = check_sha1(staged.sha1, registered, str(source))
    except errors.NbankdError:
        durable.discard_staged(archive, staged.path)
        raise
    target = archive.new_resource_path(id, source.name)
    published = durable.publish(archive, staged.path, target, sha1=staged.sha1, id=id)
    if not durable.verify_from_storage(published.path, staged.sha1):
        raise errors.ArchiveError(
            f"{published.path} does not read back with SHA-1 {staged.sha1}",
            hint="check the destination archive's storage (nbankctl archive check)",
        )
    return Copied(published.path, staged.sha1, staged.size, verified, published.created)


def register_copy(registry: Registry, archive: Archive, copied: Copied, id: str, name: str) -> None:
    """Adds the location of a copy in archive ``name``; removes a copy made by this run
    if the registry refuses it (its field errors). When the registry is out of reach,
    refuses the credentials or answers something else (a proxy's page), the copy stays
    and the error says so: a second run adds the location."""
    assert copied.path is not None
    try:
        registry.add_location(id, name)
    except errors.LocationTaken:
        return  # a concurrent run located it first
    except errors.RegistryRejected as err:
        located = _located(registry, id, name)
        if located:
            return  # a concurrent run located it first (the refusal was its race)
        if located is None:  # cannot tell: the copy may be the one the registry lists
            raise errors.RegistryRejected(
                f"the registry refused the location of '{id}' in '{name}': {err}",
                hint=f"'{copied.path}' was kept (the registry could not say whether it "
                "lists it); run the same nbankctl copy again, or nbankctl archive check",
            ) from err
        if copied.created:
            with contextlib.suppress(OSError):
                remove_ours(copied.path)
                fsync_dir(copied.path.parent)
        raise errors.RegistryRejected(
            f"the registry refused the location of '{id}' in '{name}': {err}",
            hint="the copy was removed again",
        ) from err
    except errors.RegistryError as err:  # out of reach, credentials, the site's own answer
        if _located(registry, id, name):
            return  # a concurrent run located it first
        raise type(err)(
            f"'{copied.path}' was stored but not registered: {err.message}",
            hint="run the same nbankctl copy again once the registry answers",
        ) from err
    except OSError as err:
        raise unavailable(archive, err, f"registering {copied.path}") from err


def _located(registry: Registry, id: str, name: str) -> bool | None:
    """Whether the registry now lists archive ``name`` for ``id``: a copy it locates
    is never removed, whatever the refusal said (None when it cannot tell: the copy
    is kept then too)."""
    try:
        return any(loc.archive_name == name for loc in registry.get_locations(id))
    except errors.NbankdError:
        return None


__all__ = ["STAGED_PREFIX", "Copied", "copy_resource", "refuse_own_copy", "register_copy"]
