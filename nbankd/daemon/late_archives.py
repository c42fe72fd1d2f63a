"""Archives that appear only after the start (a filesystem mounted late), checked
for a lost ``state_dir`` before anything is deposited into them.

:func:`~nbankd.daemon.adopt.check_not_orphaned` refuses to start an empty embedded
registry over archives holding resources, but it can only look into the archives
it can open at start. An archive whose filesystem is mounted later (``create:
false``, NFS at boot) would otherwise take deposits into a registry that has no
record of anything stored there, and after the first deposit the registry is no
longer empty, so nothing would ever refuse again. :class:`LateArchives` remembers
the archives that could not be opened at start and checks each the first time it
can be opened: one that holds resources while the registry locates none in it is
*held*: nothing is deposited into it (its inputs wait in their inbox, as for an
archive the registry does not record) and status says why and what to do, until
the registry records its first stored resource located there (not merely any
record: a manual deposit, refused meanwhile anyway, would give one, the rest still
unrecorded). ``nbankctl deposit`` into a held archive is refused, the files left in
place (:meth:`~nbankd.daemon.service.Daemon.archive_held`). Archives added by a reload are not
checked. The embedded registry only: django-neurobank is not lost with
``state_dir``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from nbankd import errors
from nbankd.archive import opening
from nbankd.config import Config
from nbankd.registry.base import Registry

log = structlog.get_logger("nbankd.daemon")


def _opens(path: Path) -> bool:
    try:
        opening.open_archive(path)
    except errors.NbankdError:
        return False
    return True


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


class LateArchives:
    """The archives not checked for a lost ``state_dir`` yet, and those found orphaned."""

    def __init__(self, config: Config | None = None) -> None:
        """``config``: the configuration started with (None: nothing to check)."""
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._held: dict[str, str] = {}
        self._db = ""
        if config is not None and config.embedded:
            self._db = str(config.embedded_db_path)
            self._pending = {a.name for a in config.archives if not _opens(a.path)}

    @property
    def pending(self) -> frozenset[str]:
        """The archives not opened yet since the start."""
        with self._lock:
            return frozenset(self._pending)

    def problem(self, registry: Registry, name: str, path: Path, *, ask: bool = True) -> str | None:
        """Why nothing may be deposited into archive ``name`` at ``path`` (it holds
        resources the registry has no record of), or None. An archive not opened
        since the start is checked now if it opens; if it does not, deposits wait
        (``ask``; status is told None: the archive's own problem says it is missing).
        A registry that does not answer raises (the deposit step waits)."""
        with self._lock:
            held = self._held.get(name)
            pending = name in self._pending
        if held is None and not pending:
            return None
        if held is not None:
            if not _known(registry, name, path):
                return held
            with self._lock:
                self._held.pop(name, None)
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
                f"archive {name!r} ({path}) could not be opened when nbankd started and "
                "cannot be now: nothing is deposited into it before it is checked for "
                "resources the registry lacks (is its filesystem mounted?)"
            )
        holds = next(iter(archive.iter_resources()), None) is not None
        orphaned = holds and next(iter(registry.search(archive=name)), None) is None
        with self._lock:
            self._pending.discard(name)
            if orphaned:
                self._held[name] = problem = self._orphaned(name, path)
                log.error("archive holds resources the registry lacks", archive=name, error=problem)
            return self._held.get(name)

    def _orphaned(self, name: str, path: Path) -> str:
        return (
            f"archive {name!r} ({path}), mounted after nbankd started, already holds "
            f"resources but the embedded registry {self._db} has no record of any: was "
            "state_dir lost or replaced? Nothing is deposited into it (its inputs wait "
            "in their inbox); restore state_dir from its backup (docs/deployment.md, "
            "backups), or, while the registry is still empty, stop nbankd and start it "
            "once with nbankd --adopt-archives"
        )


__all__ = ["LateArchives"]
