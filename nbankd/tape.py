"""The tape workflow: register a tar file written to tape, prune local copies, import back.

Semantics follow ``nbank archive register-tar | prune | import-tar`` (0.13):

- a tape archive has scheme ``tape``, root ``TAPE:FILE_NUMBER``, accessibility
  ``offline``, and by default the name ``TAPE-FILE_NUMBER``; a tar member is a
  resource when the stem of its name (``resources/ab/abcd.wav`` -> ``abcd``) is a
  registered identifier, and its location records the member name as ``key``;
- registering a tar (``register_tar``, in :mod:`nbankd.tape_register`) hashes
  each member first and keys only the locations whose SHA-1 matches, so a key
  on a tape location means "this member was read and matched";
- pruning local copies that are verifiably stored elsewhere (``prune``) lives in
  :mod:`nbankd.tape_prune`;
- importing a tar back into a local archive (``import_tar``) lives in
  :mod:`nbankd.tape_import`, built on the shared pieces here.

Every function takes a ``report`` callback receiving one :class:`Outcome` per
member or resource, and returns a :class:`Summary`.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nbankd import errors
from nbankd.hashing import SourceReadError
from nbankd.names import is_utf8
from nbankd.registry.base import SLUG_RE, ArchiveRecord, Registry
from nbankd.tape_stream import TarStream, open_tar_stream

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
def open_tar(path: str | os.PathLike[str]) -> Iterator[TarStream]:
    """Opens a tar file (or '-' for stdin), compressed or not, to be read once in
    order (:mod:`nbankd.tape_stream`: its end is checked); errors name the file."""
    with ExitStack() as stack:
        try:
            tar = stack.enter_context(open_tar_stream(path))
        except (OSError, *TAR_UNREADABLE) as err:
            reason = getattr(err, "strerror", None) or err
            raise errors.UsageError(
                f"cannot read tar file {path}: {reason}",
                hint="give the path of a readable tar file",
            ) from None
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
    "tape_archive",
    "tape_root",
]
