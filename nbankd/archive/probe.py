"""What an archive's filesystem can do, found out at start-up rather than mid-deposit.

nbankd relies on a few filesystem features, each with a fallback; network
filesystems (NFS, SSHFS, SMB) lack some. :func:`probe` tries each one on a scratch
file in the archive's ``staging/`` folder (removed afterwards) and
:meth:`Capabilities.notes` says, in words, what the daemon does instead:

- **hard links** publish a staged copy without ever replacing a stored file
  (``link()``); without them, ``renameat2(RENAME_NOREPLACE)``; without either, a
  file cannot be published safely and deposits into that archive wait;
- **O_DIRECT** reads verify a stored copy from storage; without it, the copy's
  cached pages are dropped first (``posix_fadvise(DONTNEED)``), which on a network
  filesystem reads from the server's cache at best;
- **flock** on a stub folder keeps two daemons from storing one identifier twice;
  without it, only the daemon's own threads are kept apart.

:func:`place_across` proves that a file in another folder (an inbox's work folder,
for ``placement: rename``) can be published into the archive at all: one device
number is not enough, as a bind mount of a folder on the archive's filesystem
shares it and still refuses ``link()`` and ``rename()`` into the archive (EXDEV).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nbankd.archive.fsops import NoReplaceUnsupported, rename_noreplace, rename_noreplace_at

PROBE_PREFIX = ".nbankd-probe-"


def filesystem_now(folder: Path) -> float:
    """The time by the clock that stamps files in ``folder`` (a file server's, for an
    archive several rigs share): the modification time of a file made there for the
    moment (removed at once). Ages of what others write there (a rig's staged copy,
    a transfer's file) are measured by it, never by this host's clock, which may run
    ahead of the server's and make a live copy look hours old. This host's clock
    when no file can be made there (a reader without write access)."""
    probe = folder / f"{PROBE_PREFIX}clock-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def host_ahead(folder: Path) -> float:
    """Seconds this host's clock runs ahead of the clock stamping files in ``folder``
    (:func:`filesystem_now`); 0 when it does not, by less than 2 s (timestamps'
    granularity), or when it cannot be told."""
    ahead = time.time() - filesystem_now(folder)
    return ahead if ahead >= 2.0 else 0.0


@dataclass(frozen=True)
class Capabilities:
    hard_links: bool
    rename_noreplace: bool
    o_direct: bool
    flock: bool
    fs_type: str = ""  # as /proc/self/mountinfo names it (ext4, nfs4, fuse.sshfs, ...)

    @property
    def shared_locks(self) -> bool:
        """True when an flock here also keeps out daemons on other hosts: FUSE keeps
        locks in the client's kernel (sshfs has no lock operation)."""
        return self.flock and not self.fs_type.startswith("fuse")

    @property
    def can_publish(self) -> bool:
        """True when a file can be put into place without ever replacing one."""
        return self.hard_links or self.rename_noreplace

    def notes(self) -> list[str]:
        """What the daemon does instead of each missing feature, one sentence each."""
        out = []
        if not self.hard_links:
            out.append(
                "no hard links: files are published with renameat2(RENAME_NOREPLACE)"
                if self.rename_noreplace
                else "no hard links and no RENAME_NOREPLACE: a file cannot be published "
                "without the risk of replacing one, so deposits into it wait"
            )
        if not self.o_direct:
            out.append(
                "no O_DIRECT: verification drops the copy's cached pages and reads it "
                "again (on a network filesystem this may read the server's cache)"
            )
        if not self.flock:
            out.append(
                "no flock: two daemons depositing into this archive are not kept from "
                "storing one identifier twice (one daemon's threads still are)"
            )
        elif not self.shared_locks:
            out.append(
                f"flock holds on this host only ({self.fs_type}): daemons on two hosts "
                "depositing into this archive are not kept from storing one identifier "
                "twice; give each identifier to one host (its own inbox names)"
            )
        return out

    def to_json(self) -> dict[str, bool]:
        return asdict(self)


def probe(folder: Path) -> Capabilities:
    """Tries each feature in ``folder`` (the archive's ``staging/``) on scratch files it
    removes again; raises OSError when the folder cannot be written at all."""
    base = folder / f"{PROBE_PREFIX}{secrets.token_hex(6)}"
    first, second, third = Path(f"{base}-a"), Path(f"{base}-b"), Path(f"{base}-c")
    fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        return Capabilities(
            hard_links=_links(first, second),
            rename_noreplace=_renames(first, third),
            o_direct=_direct(third if third.exists() else first),
            flock=_flocks(folder),
            fs_type=filesystem_type(folder),
        )
    finally:
        for path in (first, second, third):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


#: errno values of link(2) after which publishing renames instead (as
#: :func:`nbankd.archive.durable.publish_in_place` does: no hard links here)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})


def place_across(src_dir: int, dst_dir: int, name: str) -> OSError | None:
    """Whether a file in the open folder ``src_dir`` can be given a name in the open
    folder ``dst_dir`` the way a publish in place gives it one (``link()``; where the
    filesystem has no hard links, ``renameat2(RENAME_NOREPLACE)``): makes the empty
    file ``name`` in ``src_dir`` (``O_EXCL``, mode 0600), places it under the same
    name in ``dst_dir``, then removes both names. None when it could; the error saying
    it never can otherwise: EXDEV (another filesystem, or another mount of the same
    one, such as a bind mount) or :class:`NoReplaceUnsupported` (neither hard links
    nor a no-replace rename). Raises OSError when the file cannot be made or placed
    for another reason (permissions, a full or read-only filesystem): nothing is
    proved either way. Nothing is fsynced (a name only ever made and removed again);
    every name made is removed whatever happens, only a crash in between can leave
    the empty file."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=src_dir,
    )
    os.close(fd)
    placed = False
    try:
        try:
            os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
            placed = True
        except OSError as err:
            if err.errno == errno.EXDEV:
                return err
            if err.errno not in _NO_HARD_LINKS:
                raise
            raw = os.fsencode(name)
            try:
                rename_noreplace_at(src_dir, raw, dst_dir, raw)
                placed = True
            except NoReplaceUnsupported as unsupported:
                return unsupported
            except OSError as moved:
                if moved.errno == errno.EXDEV:
                    return moved
                raise
        return None
    finally:
        # the archive's name first, and only one this call made (never another's file)
        for folder in (dst_dir, src_dir) if placed else (src_dir,):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=folder)


def why_not_placed(err: OSError) -> str:
    """Why :func:`place_across` failed with ``err``, in words (after "it is ...")."""
    if err.errno == errno.EXDEV:
        return (
            "on another mount than the archive (a bind mount of a folder on the archive's "
            "filesystem has its device number, yet link() and rename() into the archive "
            "fail with EXDEV)"
        )
    return "on a filesystem with neither hard links nor a no-replace rename"


def filesystem_type(folder: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem ``folder`` is on: the mount with the longest mount
    point above it in ``/proc/self/mountinfo`` ("" when it cannot be read)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    target = os.path.realpath(folder)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def _links(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            return False
        raise
    dst.unlink()
    return True


def _renames(src: Path, dst: Path) -> bool:
    try:
        rename_noreplace(src, dst)
    except NoReplaceUnsupported:
        return False
    return True


def _direct(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    try:
        with mmap.mmap(-1, 4096) as buf:
            try:
                os.readv(fd, [buf])
            except OSError as err:
                if err.errno == errno.EINVAL:
                    return False
                raise
        return True
    finally:
        os.close(fd)


def _flocks(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return True  # locked by another daemon right now: flock works
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


__all__ = ["PROBE_PREFIX", "Capabilities", "place_across", "probe", "why_not_placed"]
