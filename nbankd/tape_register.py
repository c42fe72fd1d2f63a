"""``register_tar``: records where a tar file's registered resources are on tape, verified.

The tar is read once, as a stream. Every member that could be a resource (its
stem is a valid identifier) is hashed on the way: a regular file by the SHA-1
of its bytes, a folder by neurobank's directory hash over the files below it
(:class:`~nbankd.hashing.DirectoryHasher`, paths relative to the folder).
Only then is the registry asked, in bulk, which of them are resources. A tape
location is recorded, with the member's path as its ``key``, only for a member
whose hash equals the registered SHA-1; a mismatch is reported and recorded
nowhere. A resource registered without a SHA-1 is located but reported as
unverified (``tape prune`` will not trust it without ``--unverified``).

Run again on the same tape file it resumes: an existing keyed location is left
alone, and a keyless one (as ``nbank archive register-tar`` writes them) gets
the member's path as its key once the member's hash matches.

A member tape import refuses (:func:`~nbankd.tape.member_problem`: a control
character, bytes that are not UTF-8, an absolute path, ``..``, a link or a device,
what tarfile's data filter refuses) is never located. Each is reported, its name
escaped, as not registered, and so is a folder resource holding one.

The tar is read before the tape archive's record is created: a tar that cannot be
opened leaves the registry as it was.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from nbankd import errors
from nbankd.hashing import DirectoryHasher, copy_hashing
from nbankd.names import is_utf8
from nbankd.registry.base import LocationRecord, Registry, ResourceRecord
from nbankd.streaming import totals_to_deltas
from nbankd.tape import (
    MANIFEST_NAME,
    TAPE_SCHEME,
    TAR_UNREADABLE,
    Advance,
    Recorder,
    Report,
    Summary,
    member_id,
    member_problem,
    noop,
    open_tar,
    tape_archive,
    tape_root,
)
from nbankd.tape_import_folder import FolderTree
from nbankd.tape_stream import TarStream


@dataclass
class TarEntry:
    """A member that may be a resource, with its hash once the tar has been read."""

    name: str
    id: str
    is_dir: bool
    sha1: str | None = None
    #: why the member could not be hashed (a link inside a folder, a repeated path...)
    problem: str | None = None
    #: why tape import refuses this very member (:func:`~nbankd.tape.member_problem`)
    refused: str | None = None


class _Folder:
    """A folder member being hashed: its entry, hash and the paths met below it."""

    def __init__(self, path: PurePosixPath, entry: TarEntry) -> None:
        self.path, self.entry = path, entry
        self.hasher, self.tree = DirectoryHasher(), FolderTree()

    def fail(self, why: str) -> None:
        """Makes the folder unverifiable, for the first reason given."""
        self.entry.problem = self.entry.problem or why


def _hash_member(tar: TarStream, member: tarfile.TarInfo, advance: Advance) -> str:
    stream = tar.extractfile(member)
    assert stream is not None  # a regular member always has data
    return copy_hashing(stream, None, progress=totals_to_deltas(advance)).sha1


_SCATTERED = (
    "its members do not all follow it in the tar (some were appended later, as "
    "tar -r does): tape import could not restore it from this tar"
)


def scan_tar(
    tar_path: str | os.PathLike[str],
    advance: Advance | None = None,
    *,
    refused: list[tuple[str, str]] | None = None,
) -> tuple[list[TarEntry], str | None]:
    """Hashes every member of a tar that may be a resource, reading it once, in tar order.

    A folder's hash covers the regular files below it, which must follow it in the
    tar (tape import reads them so: one that comes after another resource, or a
    second member for the folder, makes it unverifiable, as does any other kind of
    member below it, a link or a device). Its run of members is judged by the rule
    tape import reads it by (:class:`~nbankd.tape_import_folder.FolderTree`): the
    folder's own name again, a path twice, a file where a folder goes make it
    unverifiable.
    Returns the entries and, if the tar could not be read to the end, why: then
    the files read whole keep their hashes and every folder is unverifiable (the
    rest of its files may lie in the unread part). Every member tape import refuses
    (:func:`~nbankd.tape.member_problem`) is appended to ``refused`` when given, as
    (its name, why), and marks its own entry, if it has one (``TarEntry.refused``).
    """
    step = advance or noop
    entries: list[TarEntry] = []
    folders: dict[PurePosixPath, _Folder] = {}
    broken: str | None = None
    reading: list[PurePosixPath] = []  # the folders whose members follow them now
    with open_tar(tar_path) as tar:
        while True:
            try:
                member = tar.next()
                if member is None:
                    break
                path = PurePosixPath(member.name)
                if path == PurePosixPath(MANIFEST_NAME):
                    continue
                id = member_id(member.name)
                # tape import reads a folder's members while they follow it, the
                # folder's own name again included (which it refuses)
                reading = [f for f in reading if f == path or f in path.parents]
                above = [folders[p] for p in path.parents if p in folders]
                for folder in above:
                    if folder.path not in reading:
                        folder.fail(_SCATTERED)
                    elif not is_utf8(member.name):
                        folder.fail(
                            f"it holds {member.name!r}, a name that is not UTF-8 (the folder "
                            "hash covers UTF-8 names only)"
                        )
                if path in reading:  # the folder itself a second time
                    above.append(folders[path])
                within = [f for f in above if f.path in reading]
                for folder in within:  # the rule tape import reads the folder by
                    if why := folder.tree.claim(path.relative_to(folder.path), member.isdir()):
                        folder.fail(f"it holds {member.name!r}: {why}")
                problem = member_problem(member)
                if problem is not None:
                    if refused is not None:
                        refused.append((member.name, problem))
                    for folder in above:  # tape import refuses the folder then
                        folder.fail(
                            f"it holds {member.name!r}, which tape import refuses ({problem})"
                        )
                if member.isreg():
                    if id is None and not above:
                        continue
                    digest = _hash_member(tar, member, step)
                    if id is not None:
                        entries.append(TarEntry(member.name, id, False, digest, refused=problem))
                    for folder in within:
                        if folder.entry.problem is None:
                            folder.hasher.add(path.relative_to(folder.path), digest)
                elif member.isdir():
                    if id is not None and path in folders and path not in reading:
                        folders[path].fail(_SCATTERED)
                    elif id is not None and path not in folders:
                        entry = TarEntry(member.name, id, True, refused=problem)
                        entries.append(entry)
                        folders[path] = _Folder(path, entry)
                        reading.append(path)
                else:
                    for folder in above:  # said plainly, whatever was said before
                        folder.entry.problem = f"it holds {member.name!r}, not a file or folder"
            except (*TAR_UNREADABLE, OSError) as err:
                broken = f"{getattr(err, 'strerror', None) or err}"
                break
    for folder in folders.values():
        if broken is not None:
            folder.fail("the tar file could not be read to its end")
        elif folder.entry.problem is None:
            folder.entry.sha1 = folder.hasher.hexdigest()
    return entries, broken


def _set_key(registry: Registry, id: str, archive: str, key: str) -> None:
    """Gives a resource's existing location in ``archive`` the key ``key`` (one
    request: the location is never absent, even for a moment)."""
    registry.set_location_key(id, archive, key)


def _verify(entry: TarEntry, record: ResourceRecord) -> tuple[str | None, str]:
    """(None, a note) if the member may be located, else (failed status, message)."""
    what = "folder" if entry.is_dir else "member"
    if entry.problem is not None:
        return "failed", (
            f"cannot hash {what} {entry.name!r} of resource '{entry.id}': {entry.problem}"
        )
    if record.sha1 is None:
        return None, " (no registered SHA-1 to check: tape prune needs --unverified)"
    if entry.sha1 != record.sha1.lower():
        return "mismatch", (
            f"SHA-1 {entry.sha1} of {what} {entry.name!r} does not match the registered "
            f"{record.sha1} of resource '{entry.id}'"
        )
    return None, " (SHA-1 checked)"


def _refuse_members(
    entries: list[TarEntry], odd: list[tuple[str, str]], note: Recorder
) -> list[TarEntry]:
    """Reports each member of ``odd`` (one tape import refuses, and why) as not
    registered; returns the entries to go on with, without those members' own
    (a folder holding one is unverifiable already: :func:`scan_tar`). Another
    member of the same name (a folder named like a refused link) stays: register
    and import must agree on which folder the members below it belong to."""
    for name, why in odd:
        note(
            name,
            "failed",
            f"not registered: tape import refuses this member ({why}); write the tar "
            "again with that file renamed or stored as a plain file",
            ok=False,
            id=member_id(name),
        )
    return [e for e in entries if e.refused is None]


def register_tar(
    registry: Registry,
    tar_path: str | os.PathLike[str],
    tape: str,
    file_number: int,
    *,
    archive_name: str | None = None,
    dry_run: bool = False,
    report: Report | None = None,
    advance: Advance | None = None,
) -> Summary:
    """Locates each registered resource of a tar file in the tape archive, after hashing it."""
    # checked first (a name taken, a bad name), created only once the tar has been read
    record, message = tape_archive(registry, tape, file_number, archive_name, dry_run=True)
    odd: list[tuple[str, str]] = []
    entries, broken = scan_tar(tar_path, advance, refused=odd)
    if record is None and not dry_run:
        record, message = tape_archive(registry, tape, file_number, archive_name, dry_run=False)
    name = record.name if record is not None else archive_name or f"{tape}-{file_number}"
    summary = Summary(archive=name)
    note = Recorder(summary, report)
    note(name, "archive", message)
    entries = _refuse_members(entries, odd, note)
    if broken is not None:
        note(
            str(tar_path),
            "failed",
            f"unreadable from some point on ({broken}); what was read whole is "
            "registered below; check the tar file (or tape) and run again",
            ok=False,
        )
    records = {r.name: r for r in registry.get_resources({e.id for e in entries})}
    located = registry.get_locations_bulk(i for i, r in records.items() if name in r.locations)
    root = tape_root(tape, file_number)
    inside: PurePosixPath | None = None
    for entry in entries:
        path = PurePosixPath(entry.name)
        if inside is not None and path.is_relative_to(inside):
            continue  # a file of a folder resource
        resource = records.get(entry.id)
        if resource is None:
            if not entry.is_dir:
                note(entry.name, "skipped", "no match in registry, skipping", id=entry.id)
            continue
        if entry.is_dir:
            inside = path
        here = [loc for loc in located.get(entry.id, []) if loc.archive_name == name]
        failed, checked = _verify(entry, resource)
        if failed is not None:
            if not here:
                checked += "; no location recorded"
            elif here[0].key is None:
                checked += f"; its location in '{name}' stays keyless (tape prune ignores it)"
            else:
                checked += f"; its location in '{name}' is left as it was: check the tape"
            note(entry.name, failed, checked, ok=False, id=entry.id)
            continue
        if here and here[0].key is not None:
            key = here[0].key
            text = "already registered" if key == entry.name else f"already as {key}"
            note(entry.name, "already", f"{text} in '{name}'{checked}", id=entry.id)
            continue
        if dry_run:
            text = "would record the member name" if here else f"would add location in '{name}'"
            note(
                entry.name, "keyed" if here else "added", f"{text}{checked} (dry run)", id=entry.id
            )
            continue
        try:
            if here:  # located by nbank register-tar, which records no member name
                _set_key(registry, entry.id, name, entry.name)
            else:
                registry.add_location(entry.id, name, key=entry.name)
        except errors.RegistryRejected as err:
            if isinstance(err, errors.LocationTaken) and not here and "key" not in err.fields:
                note(entry.name, "already", f"already registered in '{name}'", id=entry.id)
            else:  # e.g. another resource holds this member path as its key
                note(
                    entry.name, "failed", f"registry refused the key: {err}", ok=False, id=entry.id
                )
            continue
        new = LocationRecord(name, TAPE_SCHEME, root, entry.id, entry.name)
        others = [loc for loc in located.get(entry.id, []) if loc.archive_name != name]
        located[entry.id] = [*others, new]
        text = "recorded the member name" if here else f"added location in '{name}'"
        note(entry.name, "keyed" if here else "added", f"{text}{checked}", id=entry.id)
    return summary


__all__ = ["TarEntry", "register_tar", "scan_tar"]
