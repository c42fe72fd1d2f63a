"""``tape prune``: deleting the copies in a local archive that are verifiably stored
elsewhere (``nbank archive prune``).

:func:`prune` deletes a local copy only when the registry lists another copy that is
verified to exist (a local neurobank copy found and, by default, hashed; a tape copy
with a key naming a member tape import restores), never a resource without a
registered SHA-1 unless asked (``unverified``), and removes stub folders it empties.

It checks that second copy twice: once before it touches anything (a resource without
one is kept without a change to the registry), and again after it has removed its own
location and before it deletes the file, on the locations the registry lists then. The
second check is what makes prunes run at once safe (two archives holding a resource's
only two copies pruned by two people, or one prune started twice); see
:func:`_delete`. A copy whose second check fails is listed again and kept; one whose
location another run removed first is left to that run. A prune killed between its
two steps leaves the copy stored but not listed in its archive (never a location
without its file): prune skips it, saying so, and ``nbankctl check archive PATH
--fix`` offers to list it again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors, seams
from nbankd.archive import durable
from nbankd.archive.layout import Archive
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


def _others(locations: Iterable[LocationRecord], archive_name: str) -> list[LocationRecord]:
    """The locations of a resource other than ``archive_name`` (and nbank's ``registry``)."""
    by_archive = {loc.archive_name: loc for loc in locations}
    return [loc for name, loc in by_archive.items() if name not in ("registry", archive_name)]


def _second_copy(
    others: Iterable[LocationRecord], sha1: str | None, ours: Path, check_hash: bool
) -> tuple[str | None, list[Elsewhere]]:
    """Why the first of ``others`` verified to hold the resource counts (None if none
    does), and the refusals of those checked before it."""
    refusals: list[Elsewhere] = []
    for loc in others:
        found = verified_elsewhere(loc, sha1, ours, check_hash=check_hash)
        if found.ok:
            return found.why, refusals
        refusals.append(found)
    return None, refusals


@dataclass(frozen=True)
class _Done:
    """What happened to one resource's copy: an outcome's status, message and ok."""

    status: str
    text: str
    ok: bool = True


def _relist(registry: Registry, ours: LocationRecord, path: Path, archive: Archive) -> str:
    """Lists the kept copy at ``path`` in its archive again (unless another command
    has); on failure, what to say (the copy stays stored but unlisted), else ''."""
    try:
        registry.add_location(ours.resource_name, ours.archive_name, key=ours.key)
    except errors.NbankdError as err:
        with contextlib.suppress(errors.NbankdError):
            listed = registry.get_locations(ours.resource_name)
            if any(loc.archive_name == ours.archive_name for loc in listed):
                return ""  # listed already (by another command, or an answer lost)
        return (
            f"; listing it in '{ours.archive_name}' again failed ({err}): it is stored "
            f"there but not located, run 'nbankctl check archive {archive.path} --fix' "
            "to list it again"
        )
    return ""


def _delete(
    registry: Registry,
    archive: Archive,
    ours: LocationRecord,
    path: Path,
    sha1: str | None,
    check_hash: bool,
) -> _Done:
    """Removes our location, checks again that another copy is listed and verified,
    and only then deletes the file at ``path``; lists it again if that check fails.

    Why prunes run at once never delete every copy: each registry operation is atomic,
    and a prune deletes a copy only while its own removal of that copy's location holds
    (a run whose removal finds no location deletes nothing; a copy is listed again only
    by the run that keeps it). Of the runs that delete a copy of one resource, take the
    one whose second check read the locations last: it trusted a copy M listed at that
    read and found (and hashed) after it. A run deleting M must have removed M's
    location after that read, so its own second check read later still: not the last.
    So M is never deleted by a prune, and one copy always stays. At worst, two crossing
    prunes each find the other's location gone and both keep their copies (exit 1, to
    run again).
    """
    archive_name, id = ours.archive_name, ours.resource_name
    try:
        check_below(archive, path)  # a folder swapped for a link: refused first
    except OSError as err:
        return _Done("failed", f"cannot delete {path}: {err.strerror or err}; kept", ok=False)
    try:
        registry.remove_location(id, archive_name)
    except errors.NotFound:
        return _Done(
            "skipped",
            f"left {path} to another run: its location in '{archive_name}' was removed "
            "meanwhile (the same prune run twice at once?), and that run deletes the file "
            "or lists it again",
        )
    try:
        seams.reached("prune-location-removed")
        verified, why = _check_again(registry, ours, path, sha1, check_hash)
    except BaseException:  # interrupted mid-check (Ctrl-C): the copy stays, listed again
        with contextlib.suppress(errors.NbankdError):
            registry.add_location(id, archive_name, key=ours.key)
        raise
    if verified is None:
        text = f"kept {path}: once its location was removed, {why}" + _relist(
            registry, ours, path, archive
        )
        return _Done("kept", text + "; prune it again later", ok=False)
    try:
        stub_gone = remove_stored_copy(archive, path)
    except OSError as err:
        text = f"cannot delete {path}: {err.strerror or err}; kept"
        return _Done("failed", text + _relist(registry, ours, path, archive), ok=False)
    unhashed = "; unverified: no registered SHA-1" if sha1 is None else ""
    text = f"deleted {path} ({verified}{unhashed})"
    return _Done("deleted", text + (f"; remove empty {path.parent}" if stub_gone else ""))


def _check_again(
    registry: Registry, ours: LocationRecord, path: Path, sha1: str | None, check_hash: bool
) -> tuple[str | None, str]:
    """After our location's removal: why a copy listed now counts (None if none does),
    and why none does."""
    try:
        locations = registry.get_locations(ours.resource_name)
    except errors.NbankdError as err:
        return None, f"its locations could not be read again ({err})"
    if any(loc.archive_name == ours.archive_name for loc in locations):
        return None, f"another command listed it in '{ours.archive_name}' again meanwhile"
    verified, refusals = _second_copy(_others(locations, ours.archive_name), sha1, path, check_hash)
    if verified is not None:
        return verified, ""
    why = "; ".join(r.why for r in refusals) or "no other location is listed"
    return None, (
        f"no second copy is verified any more ({why}): another prune run at the same "
        "time may have removed the other copy's location meanwhile"
    )


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
    with no other copy at all is ``kept``; one whose second copy is gone by the
    time our location is removed (another prune at once) is ``kept`` and fails.
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
    for id in ids:
        try:
            locations = registry.get_locations(id)
            resource = registry.get_resource(id)
        except errors.NotFound:
            note(id, "failed", f"not in registry {registry.url}", ok=False, id=id)
            continue
        ours = next(
            (loc for loc in locations if loc.archive_name == archive_name != "registry"), None
        )
        if ours is None:
            stored = archive.stored_path(id)
            text = f"not in archive '{archive_name}'"
            if stored is not None:  # a prune killed between its two steps leaves this
                text += (
                    f", though stored at {stored} (not located there, so never deleted "
                    f"here): 'nbankctl check archive {archive.path} --fix' offers to "
                    "list it again"
                )
            note(id, "skipped", text, id=id)
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
        others = _others(locations, archive_name)
        verified, refusals = _second_copy(others, sha1, path, check_hash)
        if verified is None:
            why = "; ".join(r.why for r in refusals) or "this archive is the only location"
            fixable = any(r.fixable for r in refusals)
            status = "refused" if fixable else "kept"
            text = f"{status} {path}: no verified second copy ({why})"
            note(id, status, text.replace("refused", "refused to delete", 1), ok=not fixable, id=id)
            continue
        if dry_run:
            unhashed = "; unverified: no registered SHA-1" if sha1 is None else ""
            text = f"would delete {path} ({verified}{unhashed})"
            if len(os.listdir(path.parent)) == 1:
                text += f"; would remove empty {path.parent}"
            note(id, "deleted", text, id=id)
            continue
        done = _delete(registry, archive, ours, path, sha1, check_hash)
        note(id, done.status, done.text, ok=done.ok, id=id)
    return summary


__all__ = ["Elsewhere", "prune", "register_command", "verified_elsewhere"]
