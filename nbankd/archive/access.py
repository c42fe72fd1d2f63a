"""The archive's access policy: the group and exact mode of every path nbankd writes.

Follows neurobank 0.13's mode policy (``nbank.archive.mode_policy``), so that
``nbank archive check`` reports no permission problems; see :mod:`.layout`.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nbankd import errors

if TYPE_CHECKING:
    from nbankd.archive.layout import Archive

SETGID = stat.S_ISGID


def _depth(archive: Archive, path: Path) -> int | None:
    """Parts below resources/ (0 = resources/ itself, 1 = stub, 2+ = resource), or None."""
    try:
        return len(path.relative_to(archive.resources_dir).parts)
    except ValueError:
        return None


def target_mode(archive: Archive, path: Path, *, is_dir: bool) -> int:
    """Returns the exact mode nbankd gives ``path`` under the archive's policy."""
    access = archive.policy.access
    umask = access.umask
    depth = _depth(archive, path)
    in_resource = depth is not None and depth >= 2
    if is_dir and not in_resource:  # resources/, stub folders, staging/
        return (0o777 & ~umask) | SETGID
    writable = 0 if access.read_only_resources and in_resource else 0o220
    if is_dir:
        return (0o555 | writable) & ~umask
    return (0o444 | writable) & ~umask


#: seconds a group's id, once looked up, is used without asking the group database
#: again (every deposit applies the policy's group to a few entries; with NSS files
#: each lookup reads and parses /etc/group): a group renumbered or removed is noticed
#: within this time
GROUP_TTL = 30.0

_GROUPS_LOCK = threading.Lock()
_GROUPS: dict[str, tuple[float, int]] = {}


def group_id(archive: Archive) -> int | None:
    """Returns the gid of the policy's group, or None when the policy names none.

    Raises ArchiveUnavailable if the group cannot be resolved (it may be an LDAP outage).
    A group found is remembered for :data:`GROUP_TTL` seconds; one not found is asked
    for again each time.
    """
    name = archive.policy.access.group
    if name is None:
        return None
    now = time.monotonic()
    with _GROUPS_LOCK:
        known = _GROUPS.get(name)
    if known is not None and now - known[0] < GROUP_TTL:
        return known[1]
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        with _GROUPS_LOCK:
            _GROUPS.pop(name, None)
        raise errors.ArchiveUnavailable(
            f"archive {archive.path}: group '{name}' of its access policy does not exist",
            hint="create the group or fix policy.access.group in nbank.json",
        ) from None
    with _GROUPS_LOCK:
        if len(_GROUPS) >= 64:
            _GROUPS.clear()
        _GROUPS[name] = (now, gid)
    return gid


def chgrp(archive: Archive, path: Path, st: os.stat_result | None = None) -> bool:
    """Gives ``path`` the policy's group if permitted; True if the group was changed."""
    gid = group_id(archive)
    if gid is None:
        return False
    st = st or os.lstat(path)
    if st.st_gid == gid:
        return False
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        return False  # not a member of the group: `nbank archive check` will say so
    return True


def _chgrp_fd(archive: Archive, fd: int, st: os.stat_result) -> bool:
    """:func:`chgrp` of an open file or folder."""
    gid = group_id(archive)
    if gid is None or st.st_gid == gid:
        return False
    try:
        os.fchown(fd, -1, gid)
    except PermissionError:
        return False
    return True


def require_owner(archive: Archive, doing: str) -> None:
    """Raises UsageError naming the user unless this process runs as the archive's
    ``access.user`` (files it writes would otherwise belong to someone else: the
    audit reports them, and the daemon's user may not manage them)."""
    user = archive.policy.access.user
    if user is None:
        return
    me = pwd.getpwuid(os.geteuid()).pw_name
    if me != user:
        raise errors.UsageError(
            f"archive {archive.path} belongs to {user!r} (access.user in its nbank.json); "
            f"{doing} run as {me!r} would leave files {user!r} does not own",
            hint=f"run it as {user} (e.g. sudo -u {user} nbankctl ...)",
        )


def apply_access(archive: Archive, path: Path, *, at: Path | None = None) -> bool:
    """Sets the policy's group (when permitted) and mode on one path; never follows
    symlinks. True if anything changed (the caller fsyncs it when that matters).

    ``at`` is where the path will live in the archive when that is not where it is now
    (a staged file gets the mode of its future place). Raises OSError (the caller
    classifies it) if the mode cannot be set.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return False
    changed = chgrp(archive, path, st)
    if changed:
        st = os.lstat(path)  # a change of group may clear set-id bits
    mode = target_mode(archive, at or path, is_dir=stat.S_ISDIR(st.st_mode))
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
        changed = True
    return changed


def apply_access_fd(archive: Archive, fd: int, *, at: Path) -> bool:
    """:func:`apply_access` of an open file or folder (a walk from descriptors), which
    will live at ``at`` in the archive."""
    st = os.fstat(fd)
    changed = _chgrp_fd(archive, fd, st)
    if changed:
        st = os.fstat(fd)  # a change of group may clear set-id bits
    mode = target_mode(archive, at, is_dir=stat.S_ISDIR(st.st_mode))
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
        changed = True
    return changed


def fix_access_below(archive: Archive, path: Path, uid: int | None) -> os.stat_result | None:
    """:func:`apply_access` of the entry at ``path`` inside ``archive`` (and, as root,
    its owner ``uid``), reached from the archive's root without following a link: a
    folder on the way swapped for one raises OSError, so a repair never changes a file
    outside the archive. The entry is held by an ``O_PATH`` descriptor and changed
    through ``/proc/self/fd`` (that names the inode held, whatever its mode: an entry
    its owner may not read is fixed too). Returns its status after, or None for a link
    (left alone)."""
    from nbankd.archive.fsops import open_below

    if not os.path.isdir("/proc/self/fd"):
        raise errors.ArchiveError(
            f"cannot fix {path}: changing a mode or owner without following links needs "
            "/proc mounted (it is not here)",
            hint="mount /proc (or run this where it is), then run the fix again",
        )
    rel = path.relative_to(archive.path)
    fd = open_below(archive.path, rel, last=os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            return None
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            raise errors.ArchiveError(
                f"{path} has {st.st_nlink} names (hard links): its mode and owner are left "
                "alone, as they would change the file under its other names too",
                hint="find its other names (find / -samefile PATH) and keep only the one in "
                "the archive, then run the fix again",
            )
        held = f"/proc/self/fd/{fd}"
        if uid is not None and uid >= 0 and st.st_uid != uid and os.geteuid() == 0:
            os.chown(held, uid, -1)
        gid = group_id(archive)
        if gid is not None and st.st_gid != gid:
            with contextlib.suppress(PermissionError):  # not a member: the audit says so
                os.chown(held, -1, gid)
        st = os.fstat(fd)  # a change of owner or group may clear set-id bits
        mode = target_mode(archive, path, is_dir=stat.S_ISDIR(st.st_mode))
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(held, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


def apply_resource_access(archive: Archive, path: Path) -> bool:
    """:func:`apply_access` for a staged file, with the group and mode it will have in
    ``resources/`` (a stored file's mode does not depend on its stub folder): given
    before the copy's data is fsynced, publishing has nothing left to change."""
    return apply_access(archive, path, at=_stored_place(archive, path.name))


def apply_resource_access_fd(archive: Archive, fd: int, name: str) -> bool:
    """:func:`apply_resource_access` of the staged file ``name`` open as ``fd``."""
    return apply_access_fd(archive, fd, at=_stored_place(archive, name))


def _stored_place(archive: Archive, name: str) -> Path:
    """A stored file's place for its mode (any stub folder: the mode does not depend
    on it)."""
    return archive.resources_dir / "_" / name


def apply_access_tree(
    archive: Archive, path: Path, *, at: Path | None = None, top: bool = True
) -> None:
    """Applies the policy to a directory's contents, deepest first, then (if ``top``) itself.

    ``at`` is where the directory will live in the archive, as for :func:`apply_access`.
    """
    dest = at or path
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        rel = Path(dirpath).relative_to(path)
        for name in filenames + dirnames:
            apply_access(archive, Path(dirpath, name), at=dest / rel / name)
    if top:
        apply_access(archive, path, at=dest)


__all__ = [
    "apply_access",
    "apply_access_fd",
    "apply_access_tree",
    "apply_resource_access",
    "apply_resource_access_fd",
    "chgrp",
    "fix_access_below",
    "group_id",
    "target_mode",
]
