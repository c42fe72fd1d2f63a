"""Owner, group and mode checks against an archive's access policy, as ``nbank archive check``.

neurobank 0.13 (``nbank.archive.mode_policy``) gives every path *required* bits and
*forbidden* bits rather than one exact mode: nothing may have a bit the umask
forbids; ``resources/``, its stub folders and ``staging/`` need every bit the umask
allows plus setgid; folders inside a resource need read and search, files read;
with ``read_only_resources`` nothing in a resource may be writable. A path is
reported when it lacks a required bit or has a forbidden one, and the detail names
the mode it has and the mode neurobank's fix would give it. Owners must be the
policy's user (when it names one) and group (when it names one).

Shared by the daemon's audits and ``nbankctl archive check``. Pure but for the
user and group database lookups.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from nbankd.archive.layout import Archive
from nbankd.audit.model import PERMISSION, Finding


def uid_of(name: str | None) -> int | None:
    """The uid of user ``name``; None for no user, -1 for a user that does not exist."""
    if name is None:
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return -1  # nobody can own files as a user that does not exist


def gid_of(name: str | None) -> int | None:
    """The gid of group ``name``; None for no group, -1 for a group that does not exist."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return -1


def mode_policy(archive: Archive, path: Path, *, is_dir: bool) -> tuple[int, int]:
    """(required, forbidden) mode bits of ``path`` under the archive's policy (see above)."""
    access = archive.policy.access
    umask = access.umask
    try:
        in_resource = len(path.relative_to(archive.resources_dir).parts) >= 2
    except ValueError:
        in_resource = False
    forbidden = umask
    if in_resource and access.read_only_resources:
        forbidden |= 0o222
    if is_dir and not in_resource:
        return (0o777 & ~umask) | stat.S_ISGID, umask
    if is_dir:
        return 0o555 & ~umask, forbidden
    return 0o444 & ~umask, forbidden


def owners(archive: Archive) -> tuple[int | None, int | None]:
    """(uid, gid) the policy asks for (None: any; -1: a name that does not exist)."""
    access = archive.policy.access
    return uid_of(access.user), gid_of(access.group)


def permission_findings(
    archive: Archive,
    path: Path,
    st: os.stat_result,
    resource: str | None = None,
    *,
    ids: tuple[int | None, int | None] | None = None,
) -> Iterator[Finding]:
    """Findings for one path whose ``lstat`` is ``st``: wrong owner, group or mode.

    ``ids`` is :func:`owners` of the archive, looked up once by callers that check
    many paths.
    """
    access = archive.policy.access
    uid, gid = ids if ids is not None else owners(archive)
    if uid is not None and st.st_uid != uid:
        yield Finding(PERMISSION, resource, path, f"owner is uid {st.st_uid}, not {access.user}")
    if gid is not None and st.st_gid != gid:
        yield Finding(PERMISSION, resource, path, f"group is gid {st.st_gid}, not {access.group}")
    required, forbidden = mode_policy(archive, path, is_dir=stat.S_ISDIR(st.st_mode))
    have = stat.S_IMODE(st.st_mode)
    if (required & ~have) or (have & forbidden):
        want = (have | required) & ~forbidden
        yield Finding(PERMISSION, resource, path, f"mode {have:04o}, expected {want:04o}")


def still_wrong(archive: Archive, finding: Finding) -> bool:
    """A permission finding holds at the end of the audit too (a stub folder a deposit
    just made gets its mode a moment after mkdir; that is not a problem)."""
    if finding.path is None:
        return True
    try:
        st = os.lstat(finding.path)
    except OSError:
        return False
    return any(True for _ in permission_findings(archive, finding.path, st, finding.resource))


__all__ = ["gid_of", "mode_policy", "owners", "permission_findings", "still_wrong", "uid_of"]
