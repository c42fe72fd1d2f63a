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
does not record) and status says why and what to do. Only a listing that
succeeded tells: an archive whose ``resources/`` (or a stub folder before its first
resource) cannot be listed is neither taken for empty nor checked, its deposits
waiting, status saying why. A hold ends when the registry records the archive's
first stored resource located there (what a restored ``state_dir`` gives; not
merely any record: a manual deposit, refused meanwhile anyway, would give one, the
rest still unrecorded), or when ``nbankd --adopt-archives`` has gone through the
archive (:func:`record_adopted`): what it stores is then registered or named in
``adoption-skipped.json``, and the archive is not held again over those. A hold
found over resources is never ended by an empty listing (an empty mount point, its
filesystem not there yet, lists empty). ``nbankctl deposit`` into a held archive is
refused, the files left in place
(:meth:`~nbankd.daemon.service.Daemon.archive_held`). A hold is kept in
``state_dir`` (:data:`HELD_NAME`, a :class:`Record`), so it outlives a restart
unchanged; while it is there, ``nbankd --adopt-archives`` may run over the registry
that is no longer empty (:mod:`~nbankd.daemon.adopt`). The embedded registry only:
django-neurobank is not lost with ``state_dir``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nbankd import errors
from nbankd.archive import fsops, layout, opening
from nbankd.config import Config
from nbankd.deposit import bounded
from nbankd.registry.base import Registry
from nbankd.smallfile import SmallFileError, read_regular
from nbankd.timefmt import iso

log = structlog.get_logger("nbankd.daemon")

#: in ``state_dir``: the archives held, so that a hold outlives a restart
HELD_NAME = "held-archives.json"
#: in ``state_dir`` after an adoption that skipped entries (:mod:`~nbankd.daemon.adopt`)
SKIPPED_NAME = "adoption-skipped.json"


class Unlisted(Exception):
    """An archive's ``resources/`` (or a stub folder in it) could not be listed: what it
    stores is not known now."""


def first_stored(archive: layout.Archive) -> tuple[str, Path] | None:
    """The archive's first stored resource (in sorted order), or None when its
    ``resources/`` was listed and holds none. Raises :class:`Unlisted` when a folder
    could not be listed before the first was found (an empty mount point lists, and
    is told apart only by what holds the hold: :class:`LateArchives`)."""
    anomalies: list[layout.Anomaly] = []
    first = next(iter(archive.iter_resources(anomalies)), None)
    unlisted = next((a for a in anomalies if a.kind == "unlistable"), None)
    if unlisted is not None:
        raise Unlisted(f"{unlisted.path}: {unlisted.reason}")
    return first


def held_path(config: Config) -> Path:
    return config.state_dir / HELD_NAME


#: the most of a held-archives.json that is read (a few names)
_LIMIT = 1 << 20


@dataclass
class Record:
    """What :data:`HELD_NAME` says: the archives ``held`` (found holding resources the
    registry lacks), ``unchecked`` (held because a damaged record could not say, until
    each is checked), and ``adopted``: the path of each archive an adoption went
    through (what it stores is registered, or named in ``adoption-skipped.json``)."""

    held: set[str] = field(default_factory=set)
    unchecked: set[str] = field(default_factory=set)
    adopted: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes | None:
        """The file's bytes, or None when there is nothing to keep."""
        if not (self.held or self.unchecked or self.adopted):
            return None
        doc: dict[str, object] = {"held": sorted(self.held)}
        if self.unchecked:
            doc["unchecked"] = sorted(self.unchecked)
        if self.adopted:
            doc["adopted"] = dict(sorted(self.adopted.items()))
        doc["updated"] = iso(time.time())
        return (json.dumps(doc) + "\n").encode()


def _names(doc: dict[str, Any], key: str) -> set[str]:
    names = doc.get(key, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{key!r} is not a list of archive names")
    return set(names)


def _said(err: SmallFileError) -> str:
    if err.reason == "not-regular":
        return f"it is {err.noun}, not a file"
    if err.reason == "too-large":
        return f"it is larger than {_LIMIT >> 10} KiB"
    return err.strerror or err.reason


def read_record(config: Config) -> Record:
    """The configured archives :data:`HELD_NAME` names. Read as a small regular file
    (never through a link; a FIFO there never blocks) within the limits of
    :func:`~nbankd.deposit.bounded.load_json`; when it cannot be read or understood,
    every configured archive is held, unchecked, and the warning names the file."""
    configured = {a.name for a in config.archives}
    path = held_path(config)
    try:
        raw, _ = read_regular(path, _LIMIT, follow=False)
        doc = bounded.load_json(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        held = _names(doc, "held") if "held" in doc else None
        if held is None:
            raise KeyError("no 'held'")
        unchecked = _names(doc, "unchecked")
        adopted = doc.get("adopted", {})
        if not isinstance(adopted, dict) or not all(isinstance(v, str) for v in adopted.values()):
            raise TypeError("'adopted' is not an object of archive paths")
    except SmallFileError as err:
        if err.reason == "missing":
            return Record()
        why = _said(err)
    except (ValueError, TypeError, KeyError) as err:  # bounded.TooBig, bad UTF-8 too
        why = str(err) or type(err).__name__
    else:
        return Record(
            held & configured,
            unchecked & configured - held,
            {n: p for n, p in adopted.items() if n in configured},
        )
    log.warning(
        f"the record of archives held over a lost state_dir ({HELD_NAME}) cannot be read; "
        "every archive is checked again",
        path=str(path),
        error=why,
    )
    return Record(unchecked=configured)


def held_names(config: Config) -> set[str]:
    """The configured archives :data:`HELD_NAME` names as held (every configured
    archive when that file cannot be read or understood: held until each is found
    to hold nothing, or the registry to record what it stores)."""
    record = read_record(config)
    return record.held | record.unchecked


def _write(path: Path, record: Record) -> None:
    """Writes ``record`` to ``path`` durably (removes it when there is nothing to keep);
    raises OSError."""
    body = record.body()
    if body is None:
        path.unlink(missing_ok=True)
    else:
        fsops.write_atomic(path, body, mode=0o640)
    fsops.fsync_dir(path.parent)


def record_adopted(config: Config, gone_through: dict[str, Path]) -> None:
    """Ends the hold of each archive an adoption went through (``name: path``) and
    remembers it was: its resources that could not be registered are named in
    ``adoption-skipped.json``, so it is not held again over them. Raises OSError."""
    record = read_record(config)
    record.held -= gone_through.keys()
    record.unchecked -= gone_through.keys()
    record.adopted.update({n: str(p) for n, p in gone_through.items()})
    _write(held_path(config), record)


def adopted_at(config: Config) -> dict[str, str]:
    """The path of each configured archive an adoption went through (see :class:`Record`)."""
    return read_record(config).adopted


class LateArchives:
    """The archives not checked for a lost ``state_dir`` yet, and those found orphaned."""

    def __init__(self, config: Config | None = None) -> None:
        """``config``: the configuration started with (None: nothing to check)."""
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._record = Record()
        self._seen: set[tuple[str, Path]] = set()  # archives checked, or to be
        self._db = ""
        self._file: Path | None = None
        if config is not None and config.embedded:
            self._db = str(config.embedded_db_path)
            self._file = held_path(config)
            self._record = read_record(config)
            self._seen = {(a.name, a.path) for a in config.archives}
            self._pending = {a.name for a in config.archives} - self._holds()

    def _holds(self) -> set[str]:
        return self._record.held | self._record.unchecked

    @property
    def pending(self) -> frozenset[str]:
        """The archives not checked yet."""
        with self._lock:
            return frozenset(self._pending)

    def check_at_start(self, registry: Registry, config: Config) -> None:
        """Checks now every archive that opens at the start: one holding nothing then
        is checked, and what another host stores in it later (a file of its own, whose
        clash a deposit meets) holds nothing back. One that does not open (mounted
        later) or cannot be listed stays to be checked when a deposit first needs it;
        one whose registry does not answer, too."""
        for archive in config.archives:
            try:
                self.problem(registry, archive.name, archive.path, ask=False)
            except errors.NbankdError as err:
                log.warning(
                    "archive not checked for a lost state_dir at the start; checked when "
                    "a deposit first needs it",
                    archive=archive.name,
                    error=str(err),
                )

    def problem(self, registry: Registry, name: str, path: Path, *, ask: bool = True) -> str | None:
        """Why nothing may be deposited into archive ``name`` at ``path`` (it holds
        resources the registry has no record of), or None. An archive not checked yet
        (since the start, or since a reload added it) is checked now if it opens; if
        it does not, deposits wait (``ask``; status is told None: the archive's own
        problem says it is missing). One whose resources cannot be listed waits,
        status told why. A registry that does not answer raises (the deposit step
        waits)."""
        if self._file is None:
            return None
        with self._lock:
            if (name, path) not in self._seen:  # added (or moved) by a reload
                self._seen.add((name, path))
                if name not in self._holds():
                    self._pending.add(name)
            found = name in self._record.held
            held = found or name in self._record.unchecked
            pending = name in self._pending
            adopted = self._record.adopted.get(name) == str(path)
        if held:
            return self._still_held(registry, name, path, found=found)
        if not pending:
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
        try:
            holds = first_stored(archive) is not None
        except Unlisted as err:
            return (
                f"archive {name!r} ({path}): its resources cannot be listed ({err}): "
                "nothing is deposited into it before it is checked for resources the "
                "registry lacks"
            )
        orphaned = holds and not adopted and next(iter(registry.search(archive=name)), None) is None
        with self._lock:
            self._pending.discard(name)
            if not orphaned:
                return None
            self._record.held.add(name)
            self._save()
        problem = self._orphaned(name, path)
        log.error("archive holds resources the registry lacks", archive=name, error=problem)
        return problem

    def _still_held(self, registry: Registry, name: str, path: Path, *, found: bool) -> str | None:
        """Whether held archive ``name`` is still held: until the registry records its
        first stored resource located there (what a restored state_dir gives; any record
        there is not enough: one deposit would do, the rest still unrecorded), or the
        adoption that ends it (:func:`record_adopted`). Only a listing tells: one that
        fails keeps the hold; an empty one keeps a hold ``found`` holding resources (an
        empty mount point lists empty), and ends one held only for a damaged record."""
        try:
            first = first_stored(opening.open_archive(path))
        except (errors.NbankdError, OSError):
            return self._orphaned(name, path)  # gone again: still held
        except Unlisted as err:
            return self._orphaned(name, path, f" (its resources cannot be listed now: {err})")
        if first is None and found:
            return self._orphaned(
                name,
                path,
                " (its resources/ lists nothing now: if its filesystem is mounted and it "
                "truly holds nothing any more, either way out ends the hold)",
            )
        if first is not None:
            record = registry.get_resource(first[0])
            if record is None or name not in record.locations:
                if not found:  # a damaged record's hold, now found holding resources
                    with self._lock:
                        self._record.unchecked.discard(name)
                        self._record.held.add(name)
                        self._save()
                return self._orphaned(name, path)
        with self._lock:
            self._record.held.discard(name)
            self._record.unchecked.discard(name)
            self._save()
        log.info(
            "archive holds nothing the registry lacks a record of; deposits resume", archive=name
        )
        return None

    def _save(self) -> None:
        """Writes the record to :data:`HELD_NAME` (under the lock): a hold outlives a
        restart. A failure is logged; the hold stays in memory."""
        assert self._file is not None
        try:
            _write(self._file, self._record)
        except OSError as err:
            log.error(
                "cannot record the archives held over a lost state_dir; a restart checks "
                "them again",
                path=str(self._file),
                error=str(err),
            )

    def _orphaned(self, name: str, path: Path, now: str = "") -> str:
        return (
            f"archive {name!r} ({path}) holds resources but the embedded registry "
            f"{self._db} had no record located in it: was state_dir lost or replaced?{now} "
            "Nothing is deposited into it (its inputs wait in their inbox) until "
            "state_dir is restored from its backup (docs/deployment.md, backups), or an "
            "adoption has gone through it: stop nbankd and start it once with nbankd "
            "--adopt-archives (it registers what the archives store, keeps the records "
            f"already there, and names what it cannot register in {SKIPPED_NAME})"
        )


__all__ = [
    "HELD_NAME",
    "SKIPPED_NAME",
    "LateArchives",
    "Record",
    "Unlisted",
    "adopted_at",
    "first_stored",
    "held_names",
    "held_path",
    "read_record",
    "record_adopted",
]
