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
import resource
from collections.abc import Mapping
from typing import ClassVar

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: errno values no retry can fix: the request itself is wrong (a name the filesystem
#: refuses, a move across filesystems); every layer judges OS errors by this one set
PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EXDEV})

#: errno values of the process (or the system) out of file descriptors: never the fault
#: of the file, folder, archive or registry being used, and never a permanent problem
DESCRIPTOR_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


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


# --- the process's own limits --------------------------------------------------------


class ProcessLimit(NbankdError):
    """nbankd itself ran out of file descriptors or threads: no input, inbox, archive
    or registry is at fault; the work waits and is retried."""

    code = "process-limit"
    transient = True


class OpenFileLimit(ProcessLimit):
    code = "open-file-limit"


class ThreadLimit(ProcessLimit):
    code = "thread-limit"


def out_of_descriptors(err: BaseException) -> bool:
    """Whether ``err`` says the process (EMFILE) or the system (ENFILE) has no file
    descriptor left."""
    return isinstance(err, OSError) and err.errno in DESCRIPTOR_ERRNOS


def thread_refused(err: BaseException) -> bool:
    """Whether ``err`` is Python's refusal to start a thread (the limit on tasks or
    processes reached: RuntimeError "can't start new thread")."""
    return isinstance(err, RuntimeError) and "can't start new thread" in str(err)


def open_file_limit(err: OSError, doing: str) -> OpenFileLimit:
    """The error telling that ``doing`` failed for want of a file descriptor: the
    open-file limit (or the system's file table) named, with what to do."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if err.errno == errno.ENFILE:
        return OpenFileLimit(
            f"the system's table of open files is full ({err.strerror}) while {doing}",
            hint="raise fs.file-max (sysctl) or find the process holding them; "
            "the work waits and is retried",
        )
    return OpenFileLimit(
        f"nbankd has used up its open-file limit (RLIMIT_NOFILE {soft}) while {doing}",
        hint="raise LimitNOFILE= in nbankd's systemd unit (or ulimit -n) and restart "
        "nbankd; the work waits and is retried",
    )


def thread_limit(doing: str) -> ThreadLimit:
    """The error telling that ``doing`` failed because no thread could be started."""
    return ThreadLimit(
        f"nbankd cannot start a thread while {doing}: its limit on threads is reached "
        "(systemd TasksMax=, or RLIMIT_NPROC)",
        hint="raise TasksMax= in nbankd's systemd unit (or ulimit -u), or retry when "
        "fewer threads run",
    )


def process_limit_problem(err: BaseException, doing: str) -> str | None:
    """The one line telling that ``err`` is the process short of descriptors or
    threads (with what to do), or None when it is not: every place that turns an OS
    error into a message about a file, folder or archive asks this first."""
    if out_of_descriptors(err):
        assert isinstance(err, OSError)
        return str(open_file_limit(err, doing))
    if thread_refused(err):
        return str(thread_limit(doing))
    return None


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
