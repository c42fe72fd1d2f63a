"""Archives checked for a lost ``state_dir`` before anything is deposited into them,
beyond the start-up check of an empty registry.

:func:`~nbankd.daemon.adopt.check_not_orphaned` refuses to start an empty embedded
registry over archives holding resources, but it can only look into the archives
it can open at start, and only while the registry is empty. An archive whose
filesystem is mounted later (``create: false``, NFS at boot), or that a reload adds,
would otherwise take deposits into a registry that has no record of anything
stored there. :class:`LateArchives` checks every configured archive the first time
it can be opened after the start (and each archive a reload adds, or moves): one
that holds resources while the registry locates none in it is *held*: nothing is
deposited into it (its inputs wait in their inbox, as for an archive the registry
does not record) and status says why and what to do, until the registry records
its first stored resource located there (not merely any record: a manual deposit,
refused meanwhile anyway, would give one, the rest still unrecorded). ``nbankctl
deposit`` into a held archive is refused, the files left in place
(:meth:`~nbankd.daemon.service.Daemon.archive_held`). A hold is kept in
``state_dir`` (:data:`HELD_NAME`), so it outlives a restart unchanged; while it is
there, ``nbankd --adopt-archives`` may run over the registry that is no longer empty
(:mod:`~nbankd.daemon.adopt`). The embedded registry only: django-neurobank is not
lost with ``state_dir``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import structlog

from nbankd import errors
from nbankd.archive import fsops, opening
from nbankd.config import Config
from nbankd.deposit import bounded
from nbankd.registry.base import Registry
from nbankd.smallfile import SmallFileError, read_regular
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.daemon")

#: in ``state_dir``: the archives held, so that a hold outlives a restart
HELD_NAME = "held-archives.json"


def _known(registry: Registry, name: str, path: Path) -> bool:
    """Whether the registry now knows what archive ``name`` held when it was found
    orphaned: its first stored resource (in sorted order) has a record located in it
    (what an adoption or a restored state_dir gives). Any record located there is not
    enough: one deposit would do, the rest still unrecorded."""
    try:
        first = next(iter(opening.open_archive(path).iter_resources()), None)
    except (errors.NbankdError, OSError):
        return False  # gone again: still held
    if first is None:
        return True  # holds nothing now: nothing to lose
    record = registry.get_resource(first[0])
    return record is not None and name in record.locations


def held_path(config: Config) -> Path:
    return config.state_dir / HELD_NAME


#: the most of a held-archives.json that is read (a few names)
_LIMIT = 1 << 20


def _said(err: SmallFileError) -> str:
    if err.reason == "not-regular":
        return f"it is {err.noun}, not a file"
    if err.reason == "too-large":
        return f"it is larger than {_LIMIT >> 10} KiB"
    return err.strerror or err.reason


def held_names(config: Config) -> set[str]:
    """The configured archives :data:`HELD_NAME` names as held (every configured
    archive when that file cannot be read or understood: held until the registry is
    found to record what each stores). Read as a small regular file (never through a
    link; a FIFO there never blocks) within the limits of
    :func:`~nbankd.deposit.bounded.load_json` (deep nesting is damage, not a crash)."""
    configured = {a.name for a in config.archives}
    path = held_path(config)
    try:
        raw, _ = read_regular(path, _LIMIT, follow=False)
        doc = bounded.load_json(raw.decode("utf-8"))
        names = set(doc["held"])
        if not all(isinstance(n, str) for n in names):
            raise TypeError("names are not strings")
    except SmallFileError as err:
        if err.reason == "missing":
            return set()
        why = _said(err)
    except (ValueError, TypeError, KeyError) as err:  # bounded.TooBig, bad UTF-8 too
        why = str(err) or type(err).__name__
    else:
        return names & configured
    log.warning(
        f"the record of archives held over a lost state_dir ({HELD_NAME}) cannot be read; "
        "every archive is checked again",
        path=str(path),
        error=why,
    )
    return configured


class LateArchives:
    """The archives not checked for a lost ``state_dir`` yet, and those found orphaned."""

    def __init__(self, config: Config | None = None) -> None:
        """``config``: the configuration started with (None: nothing to check)."""
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._held: set[str] = set()
        self._seen: set[tuple[str, Path]] = set()  # archives checked, or to be
        self._db = ""
        self._file: Path | None = None
        if config is not None and config.embedded:
            self._db = str(config.embedded_db_path)
            self._file = held_path(config)
            self._held = held_names(config)
            self._seen = {(a.name, a.path) for a in config.archives}
            self._pending = {a.name for a in config.archives} - self._held

    @property
    def pending(self) -> frozenset[str]:
        """The archives not checked yet."""
        with self._lock:
            return frozenset(self._pending)

    def problem(self, registry: Registry, name: str, path: Path, *, ask: bool = True) -> str | None:
        """Why nothing may be deposited into archive ``name`` at ``path`` (it holds
        resources the registry has no record of), or None. An archive not checked yet
        (since the start, or since a reload added it) is checked now if it opens; if
        it does not, deposits wait (``ask``; status is told None: the archive's own
        problem says it is missing). A registry that does not answer raises (the
        deposit step waits)."""
        if self._file is None:
            return None
        with self._lock:
            if (name, path) not in self._seen:  # added (or moved) by a reload
                self._seen.add((name, path))
                if name not in self._held:
                    self._pending.add(name)
            held = name in self._held
            pending = name in self._pending
        if not held and not pending:
            return None
        if held:
            if not _known(registry, name, path):
                return self._orphaned(name, path)
            with self._lock:
                self._held.discard(name)
                self._save()
            log.info(
                "archive's resources now recorded in the registry; deposits resume", archive=name
            )
            return None
        try:
            archive = opening.open_archive(path)
        except errors.NbankdError:
            if not ask:
                return None
            return (
                f"archive {name!r} ({path}) cannot be opened: nothing is deposited into it "
                "before it is checked for resources the registry lacks (is its filesystem "
                "mounted?)"
            )
        holds = next(iter(archive.iter_resources()), None) is not None
        orphaned = holds and next(iter(registry.search(archive=name)), None) is None
        with self._lock:
            self._pending.discard(name)
            if not orphaned:
                return None
            self._held.add(name)
            self._save()
        problem = self._orphaned(name, path)
        log.error("archive holds resources the registry lacks", archive=name, error=problem)
        return problem

    def _save(self) -> None:
        """Writes the held archives to :data:`HELD_NAME` (under the lock): a hold
        outlives a restart. A failure is logged; the hold stays in memory."""
        assert self._file is not None
        try:
            if self._held:
                body = {"held": sorted(self._held), "updated": iso(time.time())}
                fsops.write_atomic(self._file, (json.dumps(body) + "\n").encode(), mode=0o640)
            else:
                self._file.unlink(missing_ok=True)
            fsops.fsync_dir(self._file.parent)
        except OSError as err:
            log.error(
                "cannot record the archives held over a lost state_dir; a restart checks "
                "them again",
                path=str(self._file),
                error=str(err),
            )

    def _orphaned(self, name: str, path: Path) -> str:
        return (
            f"archive {name!r} ({path}) holds resources but the embedded registry "
            f"{self._db} had no record located in it: was state_dir lost or replaced? "
            "Nothing is deposited into it (its inputs wait in their inbox) until the "
            "registry records its first stored resource there: restore state_dir from "
            "its backup (docs/deployment.md, backups), or stop nbankd and start it once "
            "with nbankd --adopt-archives (it registers what the archives store; "
            "records already there are kept)"
        )


__all__ = ["HELD_NAME", "LateArchives", "held_names", "held_path"]
