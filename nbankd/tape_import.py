"""``import_tar``: copies the registered resources of a tar file into a local archive.

The tar never chooses where bytes go: each member is read as a stream, checked by
:func:`~nbankd.tape.member_problem` (path, type and size, with our own checks and
:func:`tarfile.data_filter`; the rule tape register and check tar apply too),
refused when bigger than the staging folder's free space, copied into ``staging/``
under a name made from the registered identifier, checked against the registered
SHA-1, published with the durable primitives of deposits, re-read from storage, then
located in the registry.
A folder resource (a folder member whose stem is a registered identifier, and the
members below it) is imported whole by :mod:`nbankd.tape_import_folder`, with the
same checks on each of its members and neurobank's directory hash.

The shared pieces of the tape workflow (:class:`~nbankd.tape.Outcome`,
:class:`~nbankd.tape.Summary`, :func:`~nbankd.tape.open_tar`,
:func:`~nbankd.tape.member_id`) live in :mod:`nbankd.tape`.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from nbankd import errors
from nbankd.archive import durable, opening
from nbankd.archive.access import require_owner
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.archive.staging import process_staged_name
from nbankd.hashing import sha1_stream
from nbankd.registry.base import Registry
from nbankd.streaming import totals_to_deltas
from nbankd.tape import (
    MANIFEST_NAME,
    TAR_UNREADABLE,
    Advance,
    Recorder,
    Report,
    Summary,
    member_id,
    member_problem,
    noop,
    open_tar,
)
from nbankd.tape_import_folder import FolderRefused, Members, import_folder, skip_folder

STAGED_PREFIX = durable.STAGED_PREFIX + "tar-"


def _staged_name(id: str) -> str:
    """A staged name no other process uses (two imports of one identifier at once, by
    hand, without the state lock); a killed import's is a leftover (``check archive
    --fix``)."""
    return process_staged_name(STAGED_PREFIX, id)


class _Refused(Exception):
    """One member is not imported: (status, message, ok)."""

    def __init__(self, status: str, message: str, *, ok: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.ok = status, message, ok


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


#: a member's outcomes that a later member of the same resource may make good
_PASSED_OVER = frozenset({"refused", "failed"})


def _done(
    remaining: set[str] | None,
    passed: dict[str, list[tuple[str, str, str]]],
    id: str | None,
    note: Recorder,
    *,
    instead: str | None = None,
) -> None:
    """Ends the search for resource ``id``: reports the members of it passed over
    before, as failures, or, when member ``instead`` was imported (or checked, in a dry run)
    instead, as notes."""
    if id is None:
        return
    if remaining is not None:
        remaining.discard(id)
    for name, status, message in passed.pop(id, ()):
        if instead is None:
            note(name, status, message, ok=False, id=id)
        else:
            note(name, "passed-over", f"{message}; member {instead!r} taken instead", id=id)


def import_tar(
    registry: Registry,
    tar_path: str | os.PathLike[str],
    archive_path: str | os.PathLike[str],
    *,
    wanted: Collection[str] | None = None,
    dry_run: bool = False,
    max_size: int | None = None,
    report: Report | None = None,
    advance: Advance | None = None,
) -> Summary:
    """Imports the registered resources of a tar file into a local neurobank archive.

    With ``wanted``, only members whose identifier is in it are read (the others
    are passed over without a word), reading stops once each has been met, and
    each one the tar does not hold (or that is not registered) is a failure.
    """
    archive = open_archive(archive_path)
    if not dry_run:
        require_owner(archive, "an import")
    record = registry.find_archive_by_root(str(archive.path))
    if record is None:
        raise errors.NotFound(
            f"no archive with root {archive.path} in registry {registry.url}",
            hint="register it with nbankctl init (new folders) or ask the registry's admin",
        )
    summary = Summary(archive=record.name)
    note = Recorder(summary, report)
    staging = archive.staging_dir if dry_run else opening.ensure_staging(archive)
    remaining = set(wanted) if wanted is not None else None
    # members of a resource refused or not matching its SHA-1, reported once it is
    # known whether a later member of it (``tar -r`` appends one) was imported instead
    passed: dict[str, list[tuple[str, str, str]]] = {}
    stopped = False
    with open_tar(tar_path) as tar:
        members = Members(tar)
        while remaining is None or remaining:
            try:
                member = members.next()
            except (*TAR_UNREADABLE, OSError) as err:
                note(str(tar_path), "failed", f"unreadable from here on: {err}", ok=False)
                stopped = True
                break
            if member is None:
                break
            id = member_id(member.name)
            if remaining is not None and (id is None or id not in remaining):
                continue
            try:
                problem = member_problem(member, staging, max_size)
                if problem is not None:
                    raise _Refused("refused", f"refused member {member.name!r}: {problem}")
                if member.name == MANIFEST_NAME:
                    continue
                message = _import_member(
                    registry, archive, record.name, members, member, dry_run, max_size,
                    advance or noop,
                )  # fmt: skip
            except _Refused as why:
                if wanted is not None and why.status == "skipped":  # asked for by name
                    note(member.name, "failed", f"'{id}' is not in the registry", ok=False, id=id)
                elif id is not None and why.status in _PASSED_OVER:
                    passed.setdefault(id, []).append((member.name, why.status, why.message))
                    continue  # a later member of it may still be imported
                elif why.message:
                    note(member.name, why.status, why.message, ok=why.ok, id=id)
                _done(remaining, passed, id, note)
                continue
            except TAR_UNREADABLE as err:
                note(member.name, "failed", f"the tar file ends early or cannot be read: {err}",
                     ok=False, id=id)  # fmt: skip
                stopped = True
                break
            except (errors.RegistryRejected, errors.ResourceExists, errors.NotFound) as err:
                note(member.name, "failed", str(err), ok=False, id=id)
                _done(remaining, passed, id, note)
                continue
            _done(remaining, passed, id, note, instead=member.name)
            note(member.name, "imported", message, id=id)
    for id in list(passed):
        _done(remaining, passed, id, note)
    why = "not reached: reading the tar stopped" if stopped else f"not in tar file {tar_path}"
    for id in sorted(remaining or ()):
        note(id, "missing", f"{why}", ok=False, id=id)
    return summary


def _import_member(
    registry: Registry,
    archive: Archive,
    archive_name: str,
    members: Members,
    member: tarfile.TarInfo,
    dry_run: bool,
    max_size: int | None,
    advance: Advance,
) -> str:
    """Imports one safe member (a file, or a folder with the members below it);
    returns what was done or raises _Refused."""
    tar = members.tar
    id = member_id(member.name)
    resource = registry.get_resource(id) if id is not None else None
    if resource is None:  # unregistered: a note for files, nothing for folders
        text = f"'{id}' is not in the registry, skipping" if member.isreg() else ""
        raise _Refused("skipped", text, ok=True)
    if archive_name in resource.locations:
        if member.isdir():
            skip_folder(members, member)
        raise _Refused("already", f"'{id}' is already in '{archive_name}'", ok=True)
    if member.isdir():
        try:
            return import_folder(
                registry, archive, archive_name, members, member, resource,
                staged_name=_staged_name(id), dry_run=dry_run, check=member_problem,
                max_size=max_size, advance=advance,
            )  # fmt: skip
        except FolderRefused as why:
            raise _Refused(why.status, why.message) from None
    if not dry_run and member.size > _free_bytes(archive.staging_dir):
        raise _Refused("refused", f"refused member {member.name!r}: {member.size} bytes, "
                       f"more than the free space in {archive.staging_dir}")  # fmt: skip
    stream = tar.extractfile(member)
    assert stream is not None  # a regular member always has data
    sha1 = resource.sha1
    mismatch = f"of {member.name!r} does not match the registered {sha1} of '{id}'"
    unverified = "" if sha1 else " (no registered hash to check)"
    if dry_run:
        digest = sha1_stream(stream)
        advance(member.size)
        if sha1 and digest != sha1.lower():
            raise _Refused("failed", f"SHA-1 {digest} {mismatch}")
        return f"'{id}' checks OK{unverified} (dry run)"
    staged = durable.stage_copy(
        archive, stream, _staged_name(id), progress=totals_to_deltas(advance)
    )
    if staged.size != member.size or (sha1 and staged.sha1 != sha1.lower()):
        durable.discard_staged(archive, staged.path)
        raise _Refused("failed", f"SHA-1 {staged.sha1} {mismatch}; not imported")
    target = archive.new_resource_path(id, PurePosixPath(member.name).name)
    try:
        published = durable.publish(archive, staged.path, target, sha1=staged.sha1)
    except errors.ArchiveUnavailable:
        raise
    except errors.ArchiveError as err:  # this member's name or place: the others go on
        durable.discard_staged(archive, staged.path)
        raise _Refused("failed", f"'{id}' not imported: {err}") from None
    if not durable.verify_from_storage(published.path, staged.sha1):
        raise _Refused("failed", f"{published.path} does not read back with SHA-1 "
                       f"{staged.sha1}; check the archive's storage")  # fmt: skip
    with contextlib.suppress(errors.LocationTaken):  # added by a concurrent run
        registry.add_location(id, archive_name)
    return f"{published.path}{unverified}"


__all__ = ["import_tar", "member_problem"]
