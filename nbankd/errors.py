"""The one error tree of nbankd and nbankctl, and its mapping to exit codes.

Every error a user can cause names the file, key or thing at fault and what to do.
Errors carry two machine-readable facts used across the project:

- ``code``: a short stable string, written into rejection reasons and JSON output;
- ``transient``: True when retrying later may succeed (outages), False when the
  input or the request itself is wrong (retrying would fail the same way).

Exit codes (SPEC section 4) are decided in :func:`exit_code_for`, nowhere else.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import ClassVar

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: errno values no retry can fix: the request itself is wrong (a name the filesystem
#: refuses, a move across filesystems); every layer judges OS errors by this one set
PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EXDEV})


class NbankdError(Exception):
    """Base of every error nbankd raises on purpose."""

    code: ClassVar[str] = "error"
    transient: ClassVar[bool] = False
    exit_code: ClassVar[int] = EXIT_PROBLEMS

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# --- usage and configuration -------------------------------------------------------


class UsageError(NbankdError):
    code = "usage"
    exit_code = EXIT_USAGE


class ConfigError(NbankdError):
    """A configuration file is missing, malformed or has a bad value."""

    code = "config"
    exit_code = EXIT_USAGE


class ProblemsFound(NbankdError):
    """An operation ran and found problems (audit findings, verify mismatch)."""

    code = "problems"
    exit_code = EXIT_PROBLEMS


# --- archives on disk ----------------------------------------------------------------


class ArchiveError(NbankdError):
    code = "archive"


class NotAnArchive(ArchiveError):
    """A folder has no readable, well-formed ``nbank.json``."""

    code = "not-an-archive"
    exit_code = EXIT_USAGE


class ArchiveUnavailable(ArchiveError):
    """An archive cannot be written right now: unmounted, full, or I/O error."""

    code = "archive-unavailable"
    transient = True
    exit_code = EXIT_UNREACHABLE


class ArchiveUnregistered(ArchiveError):
    """The registry does not record the archive under its configured name with its
    configured folder as root (no such archive, or that name at another root): a
    deposit there would be located where its file is not. Its inputs wait."""

    code = "archive-unregistered"
    transient = True


class ResourceExists(ArchiveError):
    """A different file is already stored under this identifier."""

    code = "stored-elsewhere"


class StoredUnderOtherName(ResourceExists):
    """The identifier is already stored in the archive under another stored name
    (another extension, or the other stub folder of a one-character identifier)."""

    def __init__(self, message: str, *, hint: str = "", stored: str = "") -> None:
        super().__init__(message, hint=hint)
        self.stored = stored


class DirectoryNotAllowed(ArchiveError):
    code = "directory-not-allowed"


class UnsafeInput(ArchiveError):
    """A symlink, hard link, FIFO, socket or device: never followed, read or archived."""

    code = "unsupported"


class MountInside(NbankdError):
    """A folder being emptied holds a mount point (another filesystem or a bind mount):
    what is on it is never the folder's own to remove."""

    code = "mount-inside"
    transient = True


class InputProtected(NbankdError):
    """An entry of an input (or of a deposited folder being removed) carries the
    immutable or append-only attribute: no user may remove or change it."""

    code = "input-protected"
    transient = True


class InboxNotWritable(NbankdError):
    """A folder of an inbox cannot be changed (its permissions, an immutable attribute,
    a read-only mount, a full disk): an input waits where it is, nothing is lost. The
    inbox's problem, never the archive's."""

    code = "inbox-not-writable"
    transient = True


class InvalidIdentifier(NbankdError):
    """An identifier breaks the registry's slug rule ``[-_0-9a-zA-Z]+``."""

    code = "invalid-name"


class InputChanged(NbankdError):
    """A claimed input changed between claiming and publishing (still being written)."""

    code = "changed"
    transient = True


class StillOpenForWriting(InputChanged):
    """A file of a claimed input is still open for writing by some program."""

    code = "open-for-writing"


# --- registries ----------------------------------------------------------------------


class RegistryError(NbankdError):
    code = "registry"


class RegistryUnavailable(RegistryError):
    """Connection refused, timeout, or a 5xx answer: retry later."""

    code = "registry-unavailable"
    transient = True
    exit_code = EXIT_UNREACHABLE


class RegistryAuthError(RegistryError):
    """The registry refused the credentials, or none were given for a write."""

    code = "auth"
    exit_code = EXIT_UNREACHABLE


class NotFound(RegistryError):
    """The registry has no such resource, archive or location (404)."""

    code = "not-found"


class RegistryRejected(RegistryError):
    """A 400 answer: the request is invalid and will stay invalid.

    ``fields`` maps each field to its messages, as django-neurobank returns them.
    """

    code = "rejected"

    def __init__(
        self, message: str, *, fields: Mapping[str, list[str]] | None = None, hint: str = ""
    ) -> None:
        super().__init__(message, hint=hint)
        self.fields: dict[str, list[str]] = {k: list(v) for k, v in (fields or {}).items()}


class NotFoundRejection(RegistryRejected):
    """A request named a resource the registry does not have (400 on a location POST)."""

    code = "not-found"


class InvalidName(RegistryRejected):
    code = "invalid-name"


class NameTaken(RegistryRejected):
    code = "name-taken"


class Sha1Taken(RegistryRejected):
    code = "sha1-taken"


class UnknownDatatype(RegistryRejected):
    code = "unknown-dtype"


class UnknownArchive(RegistryRejected):
    code = "unknown-archive"


class InvalidUser(RegistryRejected):
    """``experimenter`` or ``animal`` names no user/animal the registry knows."""

    code = "invalid-field"


class DatatypeTaken(RegistryRejected):
    code = "dtype-taken"


class ArchiveTaken(RegistryRejected):
    code = "archive-taken"


class LocationTaken(RegistryRejected):
    code = "location-taken"


# --- daemon control ------------------------------------------------------------------


class DaemonUnreachable(NbankdError):
    code = "daemon-unreachable"
    transient = True
    exit_code = EXIT_UNREACHABLE


class PermissionDenied(NbankdError):
    """The control socket refused a request for this user."""

    code = "denied"
    exit_code = EXIT_USAGE


def exit_code_for(err: BaseException) -> int:
    """Returns the process exit status for an error that ended a command."""
    if isinstance(err, NbankdError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 130
    return EXIT_PROBLEMS


def reason_fields(err: NbankdError) -> dict[str, str]:
    """Returns the machine-readable part of an error for rejection reasons and JSON."""
    return {"code": err.code, "message": err.message, "hint": err.hint}
