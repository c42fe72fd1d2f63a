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
  marking it adopted (:func:`adopt`). Adoption only fills an empty registry, or
  one beside which an archive is held as holding resources the registry has no
  record of (:mod:`~nbankd.daemon.late_archives`: an archive mounted after the
  start over a lost ``state_dir``, once another archive took deposits).

Adoption marks itself unfinished (:data:`MARKER_NAME` in ``state_dir``, written
durably before the first record and removed once every archive was gone through),
so one cut short (killed, or systemd's start timeout) is finished by running
``--adopt-archives`` again, and a plain start refuses meanwhile. A re-run skips a
name already registered with the same SHA-1, and adds a location in each further
archive holding the same bytes (what ``nbankctl copy`` makes). Entries it cannot
register (a FIFO, socket or device, a link, a folder holding a link, a name no
registry takes, bytes already registered under another identifier, another SHA-1
under a registered name) are skipped and named in the log and in the final
summary; an adoption that ended with some skipped keeps their count and first names
in :data:`SKIPPED_NAME`: a plain start runs (the lab may never be able to fix a
genuine duplicate), and ``--adopt-archives`` may run again over the registry, so
what the lab fixed since is adopted then. An adoption that finished ends the hold
of each archive it went through (:func:`~nbankd.daemon.late_archives.record_adopted`:
what it skipped there is named, never a reason to hold the archive again). Entries it
could not read (an I/O error, a folder it may not list, ``resources/`` itself among
them, a resource that kept changing while it was hashed:
:mod:`~nbankd.daemon.adopt_read`) leave adoption unfinished, to be run again. Under
systemd it asks for more start time (``EXTEND_TIMEOUT_USEC``) as it goes, and says
how far it got, in the log and in the unit's status, every few seconds.
"""

from __future__ import annotations

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
from nbankd.archive.verify import ChangedWhileRead
from nbankd.config import Config
from nbankd.daemon import late_archives
from nbankd.daemon.adopt_read import EXTEND_EVERY, Progress, stored_sha1
from nbankd.hashing import NameNotUtf8, NotRegularFile
from nbankd.registry.base import Registry
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.adopt")

#: in ``state_dir`` while an adoption is unfinished
MARKER_NAME = "adoption-unfinished.json"
#: in ``state_dir`` after an adoption that skipped entries: a re-run may adopt them
SKIPPED_NAME = late_archives.SKIPPED_NAME
#: how many skipped entries are kept, in the final summary and in :data:`SKIPPED_NAME`
#: (the log names each)
SUMMARY_NAMES = 50
#: how much more start time each request asks for
EXTEND_BY_USEC = 60_000_000


def marker_path(config: Config) -> Path:
    return config.state_dir / MARKER_NAME


def skipped_path(config: Config) -> Path:
    return config.state_dir / SKIPPED_NAME


def _opened(config: Config) -> list[tuple[str, Path, layout.Archive]]:
    """(name, configured path, archive) of each configured archive that opens now."""
    out = []
    for arch in config.archives:
        try:
            out.append((arch.name, arch.path, opening.open_archive(arch.path)))
        except errors.NbankdError:
            continue  # unmounted or not made yet: nothing to say about it now
    return out


def _holding(config: Config) -> list[tuple[str, layout.Archive]]:
    """(name, archive) of each configured archive that stores at least one resource
    (one whose resources cannot be listed is left to
    :class:`~nbankd.daemon.late_archives.LateArchives`, which holds its deposits until
    they can be), but one an adoption went through."""
    adopted: dict[str, str] | None = None
    out = []
    for name, where, archive in _opened(config):
        try:
            if late_archives.first_stored(archive) is None:
                continue
        except late_archives.Unlisted:
            continue
        if adopted is None:
            adopted = late_archives.adopted_at(config)
        if adopted.get(name) != str(where):
            out.append((name, archive))
    return out


def _empty(registry: Registry) -> bool:
    return next(iter(registry.search()), None) is None


def check_not_orphaned(config: Config, registry: Registry) -> None:
    """Refuses (ConfigError, exit 2) an adoption left unfinished, and an empty
    embedded registry over archives that hold resources; see the module docstring.
    Reminds (a warning) of entries an earlier adoption skipped."""
    if not config.embedded:
        return
    if os.path.lexists(marker_path(config)):
        raise errors.ConfigError(
            f"an adoption of the archives into {config.embedded_db_path} did not finish "
            f"({marker_path(config)} is there): resources stored in the archives may have "
            "no record, so nbankd does not run over them",
            hint="run nbankd --adopt-archives again to finish it",
        )
    if os.path.lexists(skipped_path(config)):
        log.warning(
            "an adoption skipped entries of the archives; they have no record",
            listed_in=str(skipped_path(config)),
            hint="fix what it names, then stop nbankd and start it once with "
            "nbankd --adopt-archives to adopt them",
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


@dataclass
class Adoption:
    """What one run of :func:`adopt` did."""

    registered: int = 0  # new records
    located: int = 0  # locations added to a record (a further archive's copy)
    already: int = 0  # registered by an earlier run, same SHA-1
    skipped: int = 0  # never registrable as they are
    unread: int = 0  # to run again for
    named: list[str] = field(default_factory=list)  # the first "path: why" of both
    first_unread: str = ""

    def skip(self, archive: str, path: Path | str, why: str, *, unread: bool = False) -> None:
        """Names an entry not adopted, in the log and (the first few) in the summary."""
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        if unread:
            self.unread += 1
            self.first_unread = self.first_unread or f"{shown}: {why}"
        else:
            self.skipped += 1
        if len(self.named) < SUMMARY_NAMES:
            self.named.append(f"{shown}: {why}")
        log.warning("not adopted", archive=archive, path=shown, reason=why)


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _read(archive: str, path: Path, done: Adoption, tick: Progress) -> str | None:
    """The SHA-1 of one stored resource, or None when it is skipped (named)."""
    try:
        return stored_sha1(path, tick)
    except (NotRegularFile, NameNotUtf8) as err:
        done.skip(archive, path, _why(err))
    except ChangedWhileRead as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        done.skip(
            archive,
            path,
            f"it changed while it was read, twice{where}: something still writes it",
            unread=True,
        )
    except OSError as err:
        if err.errno == errno.ELOOP:  # a link inside a folder resource: never followed
            done.skip(archive, path, _why(err))
        else:
            done.skip(archive, path, f"cannot be read: {_why(err)}", unread=True)
    return None


def _adopt_one(
    registry: Registry,
    archive: str,
    dtype: str,
    ident: str,
    path: Path,
    when: str,
    done: Adoption,
    tick: Progress,
) -> bool:
    """Registers (or locates) one stored resource; False when it is skipped."""
    sha1 = _read(archive, path, done, tick)
    if sha1 is None:
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


def _moved_aside(path: Path) -> Path:
    """Renames what stands at ``path`` (not nbankd's: a folder) to a free name beside
    it, kept as it is; returns where it went."""
    for n in range(1000):
        aside = path.with_name(f"{path.name}.moved-aside-{int(time.time())}-{n}")
        try:
            fsops.rename_noreplace(path, aside)
        except FileExistsError:
            continue
        except fsops.NoReplaceUnsupported:
            if os.path.lexists(aside):
                continue
            os.rename(path, aside)  # nothing there: nothing replaced
        log.warning(
            "a folder stood where nbankd keeps a file of its own; moved aside, kept as it is",
            path=str(path),
            moved_to=str(aside),
        )
        return aside
    raise FileExistsError(errno.EEXIST, "no free name to move it aside to", str(path))


def _is_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _stuck(path: Path, err: OSError, doing: str) -> errors.ConfigError:
    return errors.ConfigError(
        f"{path} cannot be {doing} ({_why(err)}): it is nbankd's record of an adoption",
        hint=f"make {path.parent} writable by nbankd, or replace {path} by an empty "
        "file, then run nbankd --adopt-archives again",
    )


def _begin(config: Config, registry: Registry, when: str) -> None:
    """Checks adoption may run, and marks it unfinished (durably) before any record."""
    marker = marker_path(config)
    body = (json.dumps({"started": when, "pid": os.getpid()}) + "\n").encode()
    if os.path.lexists(marker):
        log.info("finishing an adoption left unfinished", marker=str(marker))
        if _is_folder(marker):  # its removal at the end would fail: a fresh marker now
            try:
                _moved_aside(marker)
                fsops.write_atomic(marker, body, mode=0o640)
            except OSError as err:
                raise _stuck(marker, err, "replaced") from err
        return
    if not _empty(registry):
        held = sorted(late_archives.held_names(config))
        if held:
            log.info(
                "adopting what archives held over a lost state_dir store",
                archives=held,
                listed_in=str(late_archives.held_path(config)),
            )
        elif os.path.lexists(skipped_path(config)):
            log.info(
                "adopting again what an earlier adoption skipped",
                listed_in=str(skipped_path(config)),
            )
        else:
            raise errors.ConfigError(
                f"the embedded registry {config.embedded_db_path} is not empty: "
                "--adopt-archives only rebuilds an empty one, adopts what an archive "
                "held over a lost state_dir stores, or adopts again what an adoption "
                f"skipped (listed in {skipped_path(config)}, not there)",
                hint="start without --adopt-archives",
            )
    fsops.write_atomic(marker, body, mode=0o640)


def _remove(path: Path) -> None:
    """Removes nbankd's file at ``path`` (a folder found there is moved aside)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        try:
            _moved_aside(path)
        except OSError as err:
            raise _stuck(path, err, "moved aside") from err
    except OSError as err:
        raise _stuck(path, err, "removed") from err


def _end(config: Config, done: Adoption, gone_through: dict[str, Path]) -> None:
    """Keeps the list of what was skipped (or forgets it), ends the holds of the
    archives gone through (:func:`~nbankd.daemon.late_archives.record_adopted`), then
    marks adoption done."""
    record = skipped_path(config)
    if done.skipped:
        body = {"ended": iso(time.time()), "skipped": done.skipped, "first": done.named}
        try:
            if _is_folder(record):
                _moved_aside(record)
            fsops.write_atomic(record, (json.dumps(body, indent=1) + "\n").encode(), mode=0o640)
        except OSError as err:
            raise _stuck(record, err, "written") from err
    else:
        _remove(record)
    try:
        late_archives.record_adopted(config, gone_through)
    except OSError as err:
        raise _stuck(late_archives.held_path(config), err, "written") from err
    _remove(marker_path(config))
    fsops.fsync_dir(config.state_dir)


def adopt(
    config: Config,
    registry: Registry,
    *,
    now: float | None = None,
    keep_alive: Callable[[str], object] | None = None,
) -> Adoption:
    """Registers every resource stored in the configured archives into the empty
    embedded registry, finishes an adoption left unfinished, or adopts again what an
    adoption skipped (see the module docstring). ConfigError when the registry is not
    empty and neither is the case, or when an archive has no inbox to take a datatype
    from; ArchiveUnavailable, adoption left unfinished, when some entries could not be
    read. ``keep_alive(status)`` is called every few seconds while it runs."""
    if not config.embedded:
        raise errors.ConfigError("--adopt-archives applies to the embedded registry only")
    when = iso(time.time() if now is None else now)
    _begin(config, registry, when)
    tick = Progress(keep_alive)
    tick.start()
    done = Adoption()
    gone_through: dict[str, Path] = {}
    for name, where, archive in _opened(config):
        dtypes = [i.dtype for i in config.inboxes if i.archive == name and i.dtype]
        log.info("adopting archive", archive=name, path=str(archive.path))
        anomalies: list[layout.Anomaly] = []
        count = 0
        for ident, path in archive.iter_resources(anomalies):
            if not dtypes:
                raise errors.ConfigError(
                    f"archive {name} has no inbox with a dtype to record its resources under",
                    hint="give an inbox that deposits into it a dtype, then adopt again",
                )
            tick.entry(name, path)
            count += _adopt_one(registry, name, dtypes[0], ident, path, when, done, tick)
            tick.done()
        for a in anomalies:  # resources/ itself unlistable too: unread, never "empty"
            done.skip(name, a.path, a.reason, unread=a.kind == "unlistable")
        log.info("adopted archive", archive=name, resources=count)
        gone_through[name] = where
    _summarise(config, done)
    if done.unread:
        raise errors.ArchiveUnavailable(
            f"adoption not finished: {done.unread} entr(y/ies) of the archives could "
            f"not be read (first: {done.first_unread})",
            hint="make them readable (or let what writes them finish), then run "
            "nbankd --adopt-archives again to finish",
        )
    _end(config, done, gone_through)
    return done


def _summarise(config: Config, done: Adoption) -> None:
    """The final summary, naming the first entries skipped, and what to do."""
    count = done.skipped + done.unread
    more = count - len(done.named)
    fields: dict[str, object] = {}
    if done.skipped and not done.unread:
        fields["hint"] = (
            f"nbankd runs without them (listed in {skipped_path(config)}); fix what is "
            "named, then stop nbankd and start it once with nbankd --adopt-archives "
            "to adopt them"
        )
    say = log.warning if count else log.info
    say(
        "adoption summary",
        registered=done.registered,
        located=done.located,
        already_registered=done.already,
        not_adopted=count,
        skipped=done.named + ([f"and {more} more"] if more > 0 else []),
        **fields,
    )


__all__ = [
    "EXTEND_BY_USEC",
    "EXTEND_EVERY",
    "MARKER_NAME",
    "SKIPPED_NAME",
    "Adoption",
    "adopt",
    "check_not_orphaned",
    "marker_path",
    "skipped_path",
]
