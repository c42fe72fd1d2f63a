"""An empty embedded registry over archives that already hold resources.

That is what a lost ``state_dir`` looks like at the next start: the daemon would
build a new, empty registry, and every stored resource would have no record (an
audit then calls them all missing). So the daemon refuses to start
(:func:`check_not_orphaned`), naming the two ways out:

- restore ``state_dir`` from its backup (the deployment guide says how), or
- start once with ``nbankd --adopt-archives``: every resource stored in a
  configured archive is registered under its identifier with its SHA-1 (a
  folder's neurobank directory hash), the datatype of the inbox that deposits
  into that archive, a location in it, and the metadata ``{"adopted": <time>}``
  marking it adopted (:func:`adopt`). Adoption only fills an empty registry.

Adoption marks itself unfinished (:data:`MARKER_NAME` in ``state_dir``, written
durably before the first record and removed once every archive was gone through),
so one cut short (killed, or systemd's start timeout) is finished by running
``--adopt-archives`` again, and a plain start refuses meanwhile. A re-run skips a
name already registered with the same SHA-1, and adds a location in each further
archive holding the same bytes (what ``nbankctl copy`` makes). Entries it cannot
register (a FIFO, socket or device, a link, a name no registry takes, bytes already
registered under another identifier, another SHA-1 under a registered name) are
skipped and named in the log and in the final summary; entries it could not read
(an I/O error, a folder it may not list) leave adoption unfinished, to be run again.
Under systemd it asks for more start time (``EXTEND_TIMEOUT_USEC``) as it goes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from nbankd import errors
from nbankd.archive import fsops, layout, opening
from nbankd.config import Config
from nbankd.hashing import NameNotUtf8, NotRegularFile, directory_hash, sha1_stream
from nbankd.registry.base import Registry
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.adopt")

#: in ``state_dir`` while an adoption is unfinished
MARKER_NAME = "adoption-unfinished.json"
#: how many skipped entries the final summary names (the log names each)
SUMMARY_NAMES = 50
#: seconds between two requests for more start time, and how much each asks for
EXTEND_EVERY = 10.0
EXTEND_BY_USEC = 60_000_000


def marker_path(config: Config) -> Path:
    return config.state_dir / MARKER_NAME


def _holding(config: Config) -> list[tuple[str, layout.Archive]]:
    """(name, archive) of each configured archive that stores at least one resource."""
    out = []
    for arch in config.archives:
        try:
            archive = opening.open_archive(arch.path)
        except errors.NbankdError:
            continue  # unmounted or not made yet: nothing to say about it now
        if next(iter(archive.iter_resources()), None) is not None:
            out.append((arch.name, archive))
    return out


def _empty(registry: Registry) -> bool:
    return next(iter(registry.search()), None) is None


def check_not_orphaned(config: Config, registry: Registry) -> None:
    """Refuses (ConfigError, exit 2) an adoption left unfinished, and an empty
    embedded registry over archives that hold resources; see the module docstring."""
    if not config.embedded:
        return
    if marker_path(config).exists():
        raise errors.ConfigError(
            f"an adoption of the archives into {config.embedded_db_path} did not finish "
            f"({marker_path(config)} is there): resources stored in the archives may have "
            "no record, so nbankd does not run over them",
            hint="run nbankd --adopt-archives again to finish it",
        )
    if not _empty(registry):
        return
    holding = _holding(config)
    if holding:
        names = ", ".join(f"{n} ({a.path})" for n, a in holding)
        raise errors.ConfigError(
            f"the embedded registry {config.embedded_db_path} is empty, but archive(s) "
            f"{names} already hold resources: was state_dir lost or replaced? nbankd does "
            "not start a new registry over them",
            hint="restore state_dir from its backup (docs/deployment.md, backups); or, "
            "to record the stored files anew, start once with nbankd --adopt-archives",
        )


class _Ticker:
    """Calls ``keep_alive`` at most every :data:`EXTEND_EVERY` seconds (also while one
    large resource is hashed: it is the hash's throttle)."""

    def __init__(self, keep_alive: Callable[[], object] | None) -> None:
        self._keep_alive = keep_alive
        self._next = 0.0

    def __call__(self, _size: int = 0) -> None:
        if self._keep_alive is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + EXTEND_EVERY
            self._keep_alive()


def stored_sha1(path: Path, tick: Callable[[int], None] | None = None) -> str:
    """The SHA-1 of the stored resource at ``path`` (a folder's neurobank hash), never
    following a link at ``path`` and never waiting on a FIFO: :class:`NotRegularFile`
    for a link, FIFO, socket or device; other OSErrors as reading raised them."""
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode):
        return directory_hash(path, throttle=tick)
    if stat.S_ISLNK(mode):
        raise NotRegularFile(errno.ELOOP, "a symbolic link: not followed", os.fspath(path))
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket or device"
            raise NotRegularFile(
                errno.EINVAL, f"{kind}, not a regular file or folder", os.fspath(path)
            )
        os.set_blocking(fd, True)
        return sha1_stream(fd, throttle=tick)
    finally:
        os.close(fd)


@dataclass
class Adoption:
    """What one run of :func:`adopt` did."""

    registered: int = 0  # new records
    located: int = 0  # locations added to a record (a further archive's copy)
    already: int = 0  # registered by an earlier run, same SHA-1
    skipped: list[str] = field(default_factory=list)  # "path: why", never registrable
    unread: list[str] = field(default_factory=list)  # "path: why", to run again for

    def skip(self, archive: str, path: Path | str, why: str, *, unread: bool = False) -> None:
        """Names an entry not adopted, in the log and in the summary."""
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        (self.unread if unread else self.skipped).append(f"{shown}: {why}")
        log.warning("not adopted", archive=archive, path=shown, reason=why)


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _adopt_one(
    registry: Registry,
    archive: str,
    dtype: str,
    ident: str,
    path: Path,
    when: str,
    done: Adoption,
    tick: Callable[[int], None],
) -> bool:
    """Registers (or locates) one stored resource; False when it is skipped."""
    tick(0)
    try:
        sha1 = stored_sha1(path, tick)
    except (NotRegularFile, NameNotUtf8) as err:
        done.skip(archive, path, _why(err))
        return False
    except OSError as err:
        done.skip(archive, path, f"cannot be read: {_why(err)}", unread=True)
        return False
    have = registry.get_resource(ident)
    if have is not None and have.sha1 != sha1:
        done.skip(
            archive,
            path,
            f"conflict: {ident} is registered with SHA-1 {have.sha1}, this copy has {sha1}",
        )
        return False
    try:
        if have is None:
            registry.add_resource(
                name=ident, dtype=dtype, archive=archive, sha1=sha1, metadata={"adopted": when}
            )
            done.registered += 1
        elif archive not in have.locations:
            registry.add_location(ident, archive)
            done.located += 1
        else:
            done.already += 1
    except errors.Sha1Taken:
        holder = next(iter(registry.search(sha1=sha1)), None)
        named = f"as {holder.name}" if holder is not None else "under another identifier"
        done.skip(archive, path, f"the same bytes (SHA-1 {sha1}) are registered {named}")
        return False
    except errors.RegistryRejected as err:
        done.skip(archive, path, f"the registry refused it: {err.message}")
        return False
    return True


def _begin(config: Config, registry: Registry, when: str) -> None:
    """Checks adoption may run, and marks it unfinished (durably) before any record."""
    marker = marker_path(config)
    if marker.exists():
        log.info("finishing an adoption left unfinished", marker=str(marker))
        return
    if not _empty(registry):
        raise errors.ConfigError(
            f"the embedded registry {config.embedded_db_path} is not empty: "
            "--adopt-archives only rebuilds an empty one",
            hint="start without --adopt-archives",
        )
    body = json.dumps({"started": when, "pid": os.getpid()}) + "\n"
    fsops.write_atomic(marker, body.encode(), mode=0o640)


def _end(config: Config) -> None:
    marker = marker_path(config)
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    fsops.fsync_dir(marker.parent)


def adopt(
    config: Config,
    registry: Registry,
    *,
    now: float | None = None,
    keep_alive: Callable[[], object] | None = None,
) -> Adoption:
    """Registers every resource stored in the configured archives into the empty
    embedded registry, or finishes an adoption left unfinished (see the module
    docstring). ConfigError when the registry is not empty and no adoption is
    unfinished, or when an archive has no inbox to take a datatype from;
    ArchiveUnavailable, adoption left unfinished, when some entries could not be read.
    ``keep_alive`` is called every few seconds while it runs."""
    if not config.embedded:
        raise errors.ConfigError("--adopt-archives applies to the embedded registry only")
    when = iso(time.time() if now is None else now)
    _begin(config, registry, when)
    tick = _Ticker(keep_alive)
    done = Adoption()
    for name, archive in _holding(config):
        dtypes = [i.dtype for i in config.inboxes if i.archive == name and i.dtype]
        if not dtypes:
            raise errors.ConfigError(
                f"archive {name} has no inbox with a dtype to record its resources under",
                hint="give an inbox that deposits into it a dtype, then adopt again",
            )
        anomalies: list[layout.Anomaly] = []
        count = 0
        for ident, path in archive.iter_resources(anomalies):
            count += _adopt_one(registry, name, dtypes[0], ident, path, when, done, tick)
        for a in anomalies:
            done.skip(name, a.path, a.reason, unread=a.kind == "unlistable")
        log.info("adopted archive", archive=name, resources=count)
    _summarise(done)
    if done.unread:
        raise errors.ArchiveUnavailable(
            f"adoption not finished: {len(done.unread)} entr(y/ies) of the archives could "
            f"not be read (first: {done.unread[0]})",
            hint="make them readable, then run nbankd --adopt-archives again to finish",
        )
    _end(config)
    return done


def _summarise(done: Adoption) -> None:
    """The final summary, naming what was skipped."""
    skipped = done.skipped + done.unread
    more = len(skipped) - SUMMARY_NAMES
    say = log.warning if skipped else log.info
    say(
        "adoption summary",
        registered=done.registered,
        located=done.located,
        already_registered=done.already,
        not_adopted=len(skipped),
        skipped=skipped[:SUMMARY_NAMES] + ([f"and {more} more"] if more > 0 else []),
    )
