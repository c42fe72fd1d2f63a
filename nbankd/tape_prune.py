"""``tape prune``: deleting the copies in a local archive that are verifiably stored
elsewhere (``nbank archive prune``).

:func:`prune` deletes a local copy only when the registry lists another copy that is
verified to exist (a local neurobank copy found and, by default, hashed; a tape copy
with a key naming a member tape import restores), never a resource without a
registered SHA-1 unless asked (``unverified``); it removes the location first and the
file second (a crash in between leaves an unregistered copy, never a record without
its file), and removes stub folders it empties.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import open_archive
from nbankd.archive.removal import check_below, remove_stored_copy
from nbankd.registry.base import LocationRecord, Registry
from nbankd.tape import TAPE_SCHEME, Recorder, Report, Summary, key_problem, member_id


def register_command(loc: LocationRecord) -> str:
    """The nbankctl command that hashes a tape file's tar and keys this tape location."""
    tape, _, number = loc.root.rpartition(":")
    name = "" if loc.archive_name == f"{tape}-{number}" else f"-n {loc.archive_name} "
    return f"nbankctl tape register {name}{tape} {number} TAR"


@dataclass(frozen=True)
class Elsewhere:
    """Whether another location of a resource is verified to hold it, and why (not).

    ``fixable`` marks a copy that is refused for a reason the user can mend.
    """

    ok: bool
    why: str
    fixable: bool = False


def verified_elsewhere(
    loc: LocationRecord, sha1: str | None, ours: Path, *, check_hash: bool
) -> Elsewhere:
    """Whether another location of a resource is verified to hold it.

    A tape copy counts only with a key (its member path, recorded by ``tape
    register`` after hashing the member) naming a member tape import would restore
    (:func:`key_problem`) as this very resource (:func:`member_id`: a key another tool
    set may name another resource's member). A local copy that is the very file at
    ``ours`` (the same archive reached by another path, e.g. a bind mount) does
    not count.
    """
    where = f"'{loc.archive_name}' ({loc.scheme}:{loc.root})"
    if loc.scheme == TAPE_SCHEME:
        problem = key_problem(loc.key) if loc.key else None
        if loc.key and problem is not None:  # keyed before tape register refused such names
            return Elsewhere(
                False,
                f"the tape copy in {where} is member {loc.key!r}, which tape import refuses "
                f"({problem}): it could not be restored from there; write the file to tape "
                f"again under a plain name and run '{register_command(loc)}'",
                fixable=True,
            )
        if loc.key and member_id(loc.key) != loc.resource_name:  # set by another tool
            return Elsewhere(
                False,
                f"the tape copy in {where} is member {loc.key!r}, which tape import would "
                f"restore as {member_id(loc.key) or 'no resource'}, not as "
                f"{loc.resource_name}: it could not be restored from there; run "
                f"'{register_command(loc)}' with TAR the tar file written there",
                fixable=True,
            )
        if loc.key:
            return Elsewhere(True, f"on tape in {where} as {loc.key}")
        return Elsewhere(
            False,
            f"the tape copy in {where} was never hashed (no member name); run "
            f"'{register_command(loc)}' with TAR the tar file written there, then prune again",
            fixable=True,
        )
    if loc.scheme != "neurobank":
        return Elsewhere(False, f"copy in {where} cannot be checked from this host")
    try:
        other = open_archive(loc.root)
        path = other.stored_path(loc.resource_name)
    except errors.NbankdError:
        return Elsewhere(False, f"archive {where} is not on this host")
    if path is None:
        return Elsewhere(False, f"copy in {where} is missing")
    if os.path.samefile(path, ours) or os.path.samefile(path.parent, ours.parent):
        return Elsewhere(False, f"{path} is this very copy (the same folder under another path)")
    if check_hash and sha1 is not None and not durable.verify_from_storage(path, sha1):
        return Elsewhere(False, f"copy {path} does not match the registered SHA-1")
    return Elsewhere(True, f"copy at {path}")


def prune(
    registry: Registry,
    archive_name: str,
    ids: Iterable[str],
    *,
    dry_run: bool = False,
    check_hash: bool = True,
    unverified: bool = False,
    report: Report | None = None,
) -> Summary:
    """Deletes the copies of ``ids`` in a local archive that are verifiably stored elsewhere.

    A resource without a registered SHA-1 is kept (status ``refused``) unless
    ``unverified``. A resource whose only other copies are refused for a reason
    the user can mend (a tape location without a key) is ``refused`` too; one
    with no other copy at all is ``kept``.
    """
    record = registry.get_archive(archive_name)
    if record is None:
        raise errors.NotFound(
            f"no archive '{archive_name}' in registry {registry.url}",
            hint="list archives with: nbankctl archive list",
        )
    if record.scheme != "neurobank":
        raise errors.UsageError(f"'{archive_name}' is a {record.scheme} archive, not neurobank")
    if not os.path.isdir(record.root):
        raise errors.UsageError(
            f"archive '{archive_name}' is not on this host ({record.root})",
            hint="run nbankctl tape prune on the host that mounts it",
        )
    archive = open_archive(record.root)
    summary = Summary(archive=archive_name)
    note = Recorder(summary, report)
    prefix = "would " if dry_run else ""
    for id in ids:
        try:
            locations = registry.get_locations(id)
            resource = registry.get_resource(id)
        except errors.NotFound:
            note(id, "failed", f"not in registry {registry.url}", ok=False, id=id)
            continue
        by_archive = {loc.archive_name: loc for loc in locations if loc.archive_name != "registry"}
        if archive_name not in by_archive:
            note(id, "skipped", f"not in archive '{archive_name}'", id=id)
            continue
        path = archive.stored_path(id)
        if path is None:
            note(
                id,
                "failed",
                f"registered in '{archive_name}' but not in {archive.path}",
                ok=False,
                id=id,
            )
            continue
        sha1 = resource.sha1 if resource is not None else None
        if sha1 is None and not unverified:
            note(
                id,
                "refused",
                f"refused to delete {path}: '{id}' has no registered SHA-1, so no copy of it "
                "can be verified; give --unverified to prune it on the strength of its locations",
                ok=False,
                id=id,
            )
            continue
        refusals: list[Elsewhere] = []
        verified = None
        for name, loc in by_archive.items():
            if name == archive_name:
                continue
            found = verified_elsewhere(loc, sha1, path, check_hash=check_hash)
            if found.ok:
                verified = found.why
                break
            refusals.append(found)
        if verified is None:
            why = "; ".join(r.why for r in refusals) or "this archive is the only location"
            fixable = any(r.fixable for r in refusals)
            status = "refused" if fixable else "kept"
            text = f"{status} {path}: no verified second copy ({why})"
            note(id, status, text.replace("refused", "refused to delete", 1), ok=not fixable, id=id)
            continue
        if sha1 is None:
            verified += "; unverified: no registered SHA-1"
        if not dry_run:
            try:
                check_below(archive, path)  # a folder swapped for a link: refused first
                registry.remove_location(id, archive_name)
                try:
                    stub_gone = remove_stored_copy(archive, path)
                except OSError:
                    registry.add_location(id, archive_name)  # the copy stays: listed again
                    raise
            except OSError as err:
                note(id, "failed", f"cannot delete {path}: {err.strerror or err}; kept",
                     ok=False, id=id)  # fmt: skip
                continue
        else:
            stub_gone = len(os.listdir(path.parent)) == 1
        text = f"{prefix}delete {path} ({verified})" if dry_run else f"deleted {path} ({verified})"
        if stub_gone:
            text += f"; {prefix}remove empty {path.parent}"
        note(id, "deleted", text, id=id)
    return summary


__all__ = ["Elsewhere", "prune", "register_command", "verified_elsewhere"]
