"""The tape workflow: register a tar file written to tape, prune local copies, import back.

Semantics follow ``nbank archive register-tar | prune | import-tar`` (0.13):

- a tape archive has scheme ``tape``, root ``TAPE:FILE_NUMBER``, accessibility
  ``offline``, and by default the name ``TAPE-FILE_NUMBER``; a tar member is a
  resource when the stem of its name (``resources/ab/abcd.wav`` -> ``abcd``) is a
  registered identifier, and its location records the member name as ``key``;
- registering a tar (``register_tar``, in :mod:`nbankd.tape_register`) hashes
  each member first and keys only the locations whose SHA-1 matches, so a key
  on a tape location means "this member was read and matched";
- :func:`prune` deletes a local copy only when the registry lists another copy that
  is verified to exist (a local neurobank copy found and, by default, hashed; a tape
  copy with a key naming a member tape import restores), never a resource without a
  registered SHA-1 unless asked (``unverified``); it removes the location first and
  the file second (a crash in between leaves an unregistered copy, never a record
  without its file), and removes stub folders it empties;
- importing a tar back into a local archive (``import_tar``) lives in
  :mod:`nbankd.tape_import`, built on the shared pieces here.

Every function takes a ``report`` callback receiving one :class:`Outcome` per
member or resource, and returns a :class:`Summary`.
"""

from __future__ import annotations

import lzma
import os
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import open_archive
from nbankd.archive.removal import check_below, remove_stored_copy
from nbankd.hashing import SourceReadError
from nbankd.names import is_utf8
from nbankd.registry.base import SLUG_RE, ArchiveRecord, LocationRecord, Registry

TAPE_SCHEME = "tape"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Outcome:
    """What happened to one member or resource. ``ok`` False counts as a failure."""

    item: str
    status: str
    message: str
    ok: bool = True
    id: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "item": self.item,
            "id": self.id,
            "status": self.status,
            "ok": self.ok,
            "message": self.message,
        }


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    archive: str | None = None

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    def counts(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes)


Report = Callable[[Outcome], None]
#: called with the number of bytes (or members) just processed
Advance = Callable[[int], None]


def noop(*_args: object) -> None:
    return None


class Recorder:
    """Appends each outcome to a summary and passes it to the report callback."""

    def __init__(self, summary: Summary, report: Report | None) -> None:
        self.summary = summary
        self.report = report or noop

    def __call__(
        self, item: str, status: str, message: str, *, ok: bool = True, id: str | None = None
    ) -> None:
        outcome = Outcome(item, status, message, ok, id)
        self.summary.outcomes.append(outcome)
        self.report(outcome)


@contextmanager
def open_tar(path: str | os.PathLike[str]) -> Iterator[tarfile.TarFile]:
    """Opens a tar file (or '-' for stdin, read as a stream); errors name the file."""
    try:
        if str(path) == "-":
            tar = tarfile.open(fileobj=sys.stdin.buffer, mode="r|*")  # noqa: SIM115
        else:
            tar = tarfile.open(path, mode="r:*")  # noqa: SIM115
    except (OSError, tarfile.TarError) as err:
        reason = getattr(err, "strerror", None) or err
        raise errors.UsageError(
            f"cannot read tar file {path}: {reason}", hint="give the path of a readable tar file"
        ) from None
    with tar:
        yield tar


#: what reading a tar file's members raises when it is cut short or damaged:
#: tarfile's own errors, and those of the gzip, bzip2 and xz streams below it (a
#: compressed tar cut short ends with EOFError; damaged data with zlib.error,
#: LZMAError or, reading a member's bytes, SourceReadError); reading the next
#: header, any OSError too (nothing but the tar is read then)
TAR_UNREADABLE: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    SourceReadError,
)


def has_control_character(name: str) -> bool:
    """Whether a member's name holds a control character (an escape, a newline, a tab,
    DEL): tape import refuses such a member, so tape register records none."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


#: tarfile's extraction filter (PEP 706), a second opinion after member_problem's own
#: checks, which alone refuse everything it would (tarfile extracts nothing: the
#: bytes are written by nbankd); absent before Python 3.11.4
_DATA_FILTER = getattr(tarfile, "data_filter", None)
#: the folder a member's name is judged against when nothing is extracted (tape
#: register, check tar, prune): only its name and kind matter then, and the rule's own
#: checks already refuse every name that would leave any folder
NO_DESTINATION = Path("/nonexistent/nbankd-tape")


def member_problem(
    member: tarfile.TarInfo, dest: Path = NO_DESTINATION, max_size: int | None = None
) -> str | None:
    """Why tape import refuses a member, or None: the one rule of the tape commands
    (``tape import`` refuses such a member, ``tape register`` locates none, ``check
    tar`` fails it, ``tape prune`` trusts no tape key naming one). Our checks first,
    then data_filter where this Python has it; ``max_size`` is import's own limit."""
    name = member.name
    path = PurePosixPath(name)
    if not name or "\0" in name:
        return "an empty or invalid name"
    if has_control_character(name):
        return "a name with a control character (a newline, a tab, ...)"
    if not is_utf8(name):
        return "a name that is not UTF-8 (registry keys and folder hashes are UTF-8)"
    if name.startswith("/") or path.is_absolute():
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..'"
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if not (member.isreg() or member.isdir()):
        return "not a regular file or folder"
    if member.isreg() and max_size is not None and member.size > max_size:
        return f"{member.size} bytes, more than the limit of {max_size}"
    if _DATA_FILTER is not None:  # Python 3.11.4+ (Debian 12's 3.11.2 lacks it)
        try:
            _DATA_FILTER(member, str(dest))
        except tarfile.FilterError as err:
            return f"refused by tarfile's data filter: {err}"
    return None


def key_problem(key: str) -> str | None:
    """Why tape import would refuse the member a tape location's key names (judged as
    a regular file: the rule looks at its name only then), or None. A location keyed
    before tape register applied :func:`member_problem` may name one."""
    return member_problem(tarfile.TarInfo(key))


def member_id(name: str) -> str | None:
    """The resource identifier a member name stands for, or None if it cannot be one."""
    stem = PurePosixPath(name).stem
    return stem if SLUG_RE.match(stem) else None


# --- register --------------------------------------------------------------------------


def tape_root(tape: str, file_number: int) -> str:
    return f"{tape}:{file_number}"


def tape_archive(
    registry: Registry, tape: str, file_number: int, name: str | None, *, dry_run: bool
) -> tuple[ArchiveRecord | None, str]:
    """The archive record for a tape file, created if missing (not in a dry run).

    Returns (record or None in a dry run that would create it, message).
    """
    root = tape_root(tape, file_number)
    wanted = name or f"{tape}-{file_number}"
    existing = registry.find_archive_by_root(root, scheme=TAPE_SCHEME)
    if existing is not None:
        if name is not None and existing.name != name:
            raise errors.ArchiveTaken(
                f"tape file {root} is already registered as archive '{existing.name}'",
                hint=f"drop -n, or give -n {existing.name}",
            )
        return existing, f"resuming archive '{existing.name}' ({TAPE_SCHEME}:{root})"
    other = registry.get_archive(wanted)
    if other is not None:
        raise errors.ArchiveTaken(
            f"archive name '{wanted}' is taken by {other.scheme}:{other.root}",
            hint="give another archive name with -n NAME",
        )
    if not SLUG_RE.match(wanted):
        raise errors.UsageError(
            f"'{wanted}' cannot be an archive name (letters, digits, '-' and '_' only)",
            hint="give a name with -n NAME",
        )
    if dry_run:
        return None, f"would create archive '{wanted}' ({TAPE_SCHEME}:{root}) (dry run)"
    record = registry.add_archive(wanted, TAPE_SCHEME, root, "offline")
    return record, f"created archive '{record.name}' ({TAPE_SCHEME}:{root})"


# --- prune -----------------------------------------------------------------------------


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


__all__ = [
    "TAR_UNREADABLE",
    "Advance",
    "Outcome",
    "Recorder",
    "Report",
    "Summary",
    "has_control_character",
    "key_problem",
    "member_id",
    "member_problem",
    "noop",
    "open_tar",
    "prune",
    "register_command",
    "tape_archive",
    "tape_root",
    "verified_elsewhere",
]
