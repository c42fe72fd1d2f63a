"""How an error raised by a deposit step's I/O is judged: a pure table.

Transient errors make the input wait and retry with backoff (outages, full disks,
permissions an administrator can fix); permanent ones reject it with a code (the
input itself is wrong). Credentials, unregistered archives and any registry answer
but its field errors (a 400 naming what was wrong with the record) are the operator's
or the site's to fix and never the input's fault, so they wait. OS errors are judged by errno
with the same table the archive layer uses (:data:`nbankd.errors.PERMANENT_ERRNOS`);
the process out of file descriptors (EMFILE, ENFILE) or threads is nbankd's own
problem (``open-file-limit``, ``thread-limit``), whatever step met it.
"""

from __future__ import annotations

import errno

from nbankd import errors
from nbankd.deposit import policy
from nbankd.deposit.lifecycle import REPEATING_RESTAGES, Outcome
from nbankd.hashing import SourceReadError


def _codes(base: type[errors.NbankdError]) -> frozenset[str]:
    found = {base.code}
    for sub in base.__subclasses__():
        found |= _codes(sub)
    return frozenset(found)


#: error codes of waiting items, by what is at fault (status, metrics and alerts); a
#: restage that repeats (a bad read-back, ``verify-failed``; a staged copy replaced in
#: the archive's staging/, ``staged-changed``) is the archive's
REGISTRY_CODES = _codes(errors.RegistryError)
ARCHIVE_CODES = _codes(errors.ArchiveError) | {"os-error"} | REPEATING_RESTAGES
#: nbankd's own limits (open files, threads): never the input's, inbox's or archive's
PROCESS_CODES = _codes(errors.ProcessLimit)


#: errno values of an outage or of something an administrator fixes: the input waits
WAITING_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ESTALE,
        errno.ENOTCONN,
    }
)
#: codes of the errno values no retry can fix (see :data:`errors.PERMANENT_ERRNOS`)
PERMANENT_CODES = {
    errno.ENAMETOOLONG: "name-too-long",
    errno.EILSEQ: "invalid-name",
    errno.EXDEV: "cross-device",
}


def outcome_for(err: BaseException) -> Outcome:
    """The outcome of a step that raised ``err``."""
    if isinstance(err, policy.PolicyError):
        return Outcome("permanent", err.code, err.message, err.hint)
    if isinstance(err, errors.RegistryAuthError | errors.UnknownArchive):
        return Outcome("transient", err.code, err.message, err.hint)
    if isinstance(err, errors.RegistryError) and not isinstance(err, errors.RegistryRejected):
        # the site's answers other than its field errors (a 404 of an endpoint, 405,
        # 407, a redirect, a 400 without fields): never the input's fault, so it waits
        return Outcome("transient", err.code, err.message, err.hint)
    if isinstance(err, errors.NbankdError):
        kind = "transient" if err.transient else "permanent"
        return Outcome(kind, err.code, err.message, err.hint)
    if isinstance(err, SourceReadError):
        # the input's own reads failed (a bad sector, a dead mount of the inbox): the
        # input's problem, told against its inbox, never the archive's
        return Outcome(
            "transient",
            "input-unreadable",
            f"reading the input failed: {err}",
            "check the disk or mount the inbox is on; the input is kept and read again",
        )
    if errors.out_of_descriptors(err):
        assert isinstance(err, OSError)
        limit = errors.open_file_limit(err, f"depositing ({err.strerror})")
        return Outcome("transient", limit.code, limit.message, limit.hint)
    if errors.thread_refused(err):
        limit = errors.thread_limit("depositing")
        return Outcome("transient", limit.code, limit.message, limit.hint)
    if isinstance(err, OSError):
        if err.errno in errors.PERMANENT_ERRNOS:
            return Outcome("permanent", PERMANENT_CODES[err.errno], f"{err}")
        if err.errno in WAITING_ERRNOS:
            return Outcome("transient", "archive-unavailable", f"{err}")
        return Outcome("transient", "os-error", f"{err}")
    return Outcome("transient", "internal", f"{type(err).__name__}: {err}")


__all__ = [
    "ARCHIVE_CODES",
    "PERMANENT_CODES",
    "PROCESS_CODES",
    "REGISTRY_CODES",
    "WAITING_ERRNOS",
    "outcome_for",
]
