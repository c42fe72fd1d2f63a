"""The daemon's configuring half: applying a configuration (inbox folders, specs,
pauses, requeues stopped half way in inboxes new to the process), reloading it on
SIGHUP or request, reopening a changed registry, and probing the archives'
filesystems. A mixin of :class:`~nbankd.daemon.service.Daemon`, whose state it uses.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nbankd import errors
from nbankd.archive.probe import Capabilities
from nbankd.config import Config, load_config
from nbankd.config.model import EMBEDDED_DB_NAME
from nbankd.daemon import pauses, rejected_dirs, requeue_recovery, setup, statelock
from nbankd.daemon.registry_setup import RegistrySetup, open_configured_registry
from nbankd.daemon.view import InboxState
from nbankd.daemon.wakeup import Wakeup
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import State
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.stepbase import InboxParked
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.base import Registry

log = structlog.get_logger("nbankd.daemon")

#: error codes of items waiting for the configuration or the registry's record of an
#: archive: tried again at once after a reload (or once the registry is put right)
RECONFIGURED = frozenset({InboxParked.code, errors.ArchiveUnregistered.code})


class Configuring:
    """Applying and reloading the configuration (see the module's text)."""

    # the daemon's state this half uses (set by Daemon.__init__ and start)
    config: Config
    notifier: Any
    registry: Registry
    journal: Journal
    registry_problem: str | None
    registry_setup: RegistrySetup
    reload_problem: str | None
    steps: Steps
    specs: dict[str, InboxSpec]
    retired: dict[str, InboxSpec]
    inboxes: dict[str, InboxState]
    capabilities: dict[str, Capabilities]
    clock_ahead: dict[str, float]
    _lock: threading.Lock
    _pause_lock: threading.Lock
    _paused: pauses.Record
    _reload_lock: threading.Lock
    _wake: Wakeup
    _linked: dict[str, bool]
    _state_ids: tuple[tuple[int, int], ...]
    _state_files: tuple[str, ...]

    if TYPE_CHECKING:  # the scanning half's (never defined here: first in the MRO)

        def request_rescan(self, inbox_key: str | None = None) -> None: ...
        def _watch_inboxes(self, keys: Collection[str] | None = None) -> None: ...
        def _retry_waiting(self, codes: frozenset[str]) -> None: ...

    def _probe_archives(self, cfg: Config) -> None:
        found = setup.probe_archives(cfg)
        ahead = {a.name: setup.host_ahead_of(a.path) for a in cfg.archives if a.name in found}
        with self._lock:
            self.capabilities = found
            self.clock_ahead = ahead

    def _apply_config(self, cfg: Config) -> Config:
        """Puts ``cfg`` in place of the running inboxes (their folders prepared first:
        nothing changes when that fails) and returns it as the daemon runs it: each
        inbox with its earlier rejected folders (:meth:`_with_earlier_rejected`)."""
        kept = self._not_adopted(cfg)
        folders = setup.prepare_inbox_folders(cfg, kept)
        cfg, record = self._with_earlier_rejected(cfg)
        self._linked = {
            str(i.path): False if str(i.path) in kept else os.path.islink(i.path)
            for i in cfg.inboxes
        }
        specs = setup.inbox_specs(cfg, folders)
        # before anything changes: an inbox whose placement: rename can never work
        # refuses the start (or the reload); one not proved yet waits (see _scan)
        placements = setup.prove_placements(cfg, specs)
        for key, problem in placements.items():
            if problem is not None:  # tried again when the archive is there
                log.info("inbox not taking deposits yet", inbox=key, error=problem)
        if record is not None:  # the last check: a failure raises, nothing is applied
            rejected_dirs.save(self.config.state_dir, record)
        for key, spec in self.specs.items():
            if key not in specs:
                self.retired[key] = spec
        for key in specs:
            self.retired.pop(key, None)
        self.specs.clear()
        self.specs.update(specs)
        old = self.inboxes
        # an inbox new to this process (at start, or back in the file after a reload
        # left it out) is paused as paused.json says: a pause lasts until resume
        new = [str(i.path) for i in cfg.inboxes if str(i.path) not in old]
        # before its first scan, a requeue a crash stopped half way into it is finished
        # or undone (its record kept while the inbox was left out)
        self._recover_requeues(None if not old else new)
        with self._pause_lock:  # not while a pause or resume rewrites paused.json
            # the running state_dir: a new one takes effect only at restart
            # out of descriptors: the pauses last known (never "nothing paused")
            persisted = self._paused.load() if new else frozenset()
            inboxes = {}
            for inbox in cfg.inboxes:
                key = str(inbox.path)
                previous = old.get(key)
                state = InboxState(
                    config=inbox, paused=key in persisted, placement_problem=placements.get(key)
                )
                if previous is not None:
                    state.tracker, state.paused = previous.tracker, previous.paused
                inboxes[key] = state
            self.inboxes = inboxes
        still = sorted(k for k in new if k in persisted)
        if still:
            log.info("inboxes still paused (recorded in paused.json)", inboxes=still)
        return cfg

    def _with_earlier_rejected(self, cfg: Config) -> tuple[Config, rejected_dirs.Record | None]:
        """``cfg`` with each inbox's earlier rejected folders: those it used before its
        ``rejected_dir`` changed (recorded in state_dir, known to this process, or,
        for an inbox the record has no entry for -- an upgrade --, where the
        journal's rejections went), and those of former inboxes lying inside it (an
        inbox widened to a folder above it), that still hold a rejection (a
        ``NAME.reason``: :func:`.rejected_dirs.holds_rejection`); and with the work
        folders of such former inboxes still there. Never scanned nor watched, they
        stay for a person to requeue or remove (see :mod:`.rejected_dirs`); an earlier
        folder without a rejection (a data folder named as rejected_dir by mistake,
        one emptied by requeue) is an ordinary part of the inbox again. With it, the
        record to write (None: unchanged), written by :meth:`_apply_config` once
        nothing else can refuse the configuration and before anything is applied: a
        failure raises and nothing is applied."""
        state_dir = self.config.state_dir  # the running one (a new one needs a restart)
        recorded, why = rejected_dirs.load(state_dir)
        if why is not None:
            log.error(
                "cannot read the record of the inboxes' rejected folders; rewriting it "
                "from the configuration and the journal",
                file=str(state_dir / rejected_dirs.RECORD_NAME),
                error=why,
            )
        record = dict(recorded)
        configured = {str(i.path) for i in cfg.inboxes}
        inboxes = []
        for inbox in cfg.inboxes:
            key = str(inbox.path)
            used = set(record.get(key, ()))
            if key not in record:
                used |= self._journaled_rejected_dirs(key, inbox.path)
            previous = self.inboxes.get(key)
            if previous is not None:  # what this process kept out of its scans until now
                used |= set(previous.config.rejected_dirs)
            former = self._former_inboxes_inside(inbox.path, recorded, configured)
            for rel, folders in former.items():
                used |= {f"{rel}/{d}" for d in folders}
            work = tuple(
                sorted(
                    w
                    for w in (f"{rel}/{WORK_DIR_NAME}" for rel in former)
                    if rejected_dirs.present(inbox.path, w)
                )
            )
            candidates = sorted(
                d
                for d in used - {inbox.rejected_dir}
                if rejected_dirs.valid(d) and rejected_dirs.present(inbox.path, d)
            )
            others = {inbox.rejected_dir, *candidates}
            earlier = tuple(
                d
                for d in candidates
                if rejected_dirs.holds_rejection(
                    inbox.path, d, skip=(o for o in others if o.startswith(d + "/"))
                )
            )
            record[key] = tuple(sorted({inbox.rejected_dir, *earlier}))
            for folder in earlier:
                if previous is None or folder not in previous.config.rejected_dirs:
                    log.warning(
                        "an earlier rejected folder of the inbox is left alone: never "
                        "scanned, never deposited; requeue or move out what it holds, "
                        "then remove it",
                        inbox=key,
                        folder=str(inbox.path / folder),
                        rejected_dir=inbox.rejected_dir,
                    )
            for folder in work:
                if previous is None or folder not in previous.config.former_work_dirs:
                    log.warning(
                        "the work folder of a former inbox inside this one is left alone: "
                        "never scanned, never deposited; remove it once nothing in it is "
                        "needed",
                        inbox=key,
                        folder=str(inbox.path / folder),
                    )
            inboxes.append(replace(inbox, earlier_rejected_dirs=earlier, former_work_dirs=work))
        changed = record != recorded or why is not None
        return replace(cfg, inboxes=tuple(inboxes)), record if changed else None

    def _journaled_rejected_dirs(self, key: str, inbox: Path) -> set[str]:
        """The rejected folders the journal's rejections from inbox ``key`` went to
        (a state_dir from before the record was kept)."""
        journal = getattr(self, "journal", None)
        if journal is None:
            return set()
        rejections = [
            (i.rejected_relpath, i.reason_json)
            for i in journal.in_state(State.REJECTED, inbox_prefix=key)
            if i.inbox == key and i.rejected_relpath
        ]
        return rejected_dirs.from_journal(inbox, rejections)

    def _former_inboxes_inside(
        self, inbox: Path, recorded: rejected_dirs.Record, configured: Collection[str]
    ) -> dict[str, tuple[str, ...]]:
        """Each former inbox lying strictly inside ``inbox`` (not configured now; known
        from the record, or from the journal's rejections): its path relative to
        ``inbox`` -> the rejected folders recorded for it (relative to it)."""
        found: dict[str, set[str]] = {}
        for other, folders in recorded.items():
            rel = rejected_dirs.nested(inbox, other)
            if rel is not None and other not in configured:
                found.setdefault(rel, set()).update(folders)
        journal = getattr(self, "journal", None)
        if journal is not None:
            prefix = str(inbox).rstrip("/") + "/"
            by_inbox: dict[str, list[tuple[bytes, str | None]]] = {}
            for item in journal.in_state(State.REJECTED, inbox_prefix=prefix):
                if item.rejected_relpath and item.inbox not in configured:
                    by_inbox.setdefault(item.inbox, []).append(
                        (item.rejected_relpath, item.reason_json)
                    )
            for other, rejections in by_inbox.items():
                rel = rejected_dirs.nested(inbox, other)
                if rel is not None:
                    found.setdefault(rel, set()).update(
                        rejected_dirs.from_journal(Path(other), rejections)
                    )
        return {rel: tuple(sorted(folders)) for rel, folders in found.items()}

    def _forget_rejected_dirs(self, key: str, gone: Collection[str]) -> None:
        """Earlier rejected folders of inbox ``key`` a scan found removed or without a
        rejection any more (and work folders of former inboxes found removed):
        forgotten (in the record too), so a folder of that name, or what it holds now,
        is scanned as any other; the watch follows."""
        with self._lock:
            state = self.inboxes.get(key)
            if state is None:
                return
            inbox = state.config
            earlier = tuple(d for d in inbox.earlier_rejected_dirs if d not in gone)
            work = tuple(d for d in inbox.former_work_dirs if d not in gone)
            if earlier == inbox.earlier_rejected_dirs and work == inbox.former_work_dirs:
                return
            inbox = replace(inbox, earlier_rejected_dirs=earlier, former_work_dirs=work)
            state.config = inbox
            spec = self.specs.get(key)
            if spec is not None:
                self.specs[key] = replace(spec, config=inbox)
            self.config = replace(
                self.config,
                inboxes=tuple(inbox if str(i.path) == key else i for i in self.config.inboxes),
            )
            recorded, why = rejected_dirs.load(self.config.state_dir)
            record = dict(recorded)
            record[key] = tuple(d for d in record.get(key, ()) if d not in gone)
            try:
                if why is None and record != recorded:
                    rejected_dirs.save(self.config.state_dir, record)
            except rejected_dirs.RecordError as err:  # the next start forgets it then
                log.warning("cannot update the record of rejected folders", error=str(err))
        for folder in sorted(gone):
            log.info(
                "an earlier rejected folder (or a former inbox's work folder) was removed "
                "or holds no rejection any more; it is an ordinary part of the inbox "
                "from now on",
                inbox=key,
                folder=str(inbox.path / folder),
            )
        self._watch_inboxes([key])

    def _recover_requeues(self, keys: list[str] | None) -> None:
        """Recovers the stopped requeues into the inboxes ``keys`` (None: all, at start;
        the records of inboxes not configured are then named in the log); a failure
        leaves its record for the next start or a requeue into that inbox."""
        try:  # the running state_dir: a new one takes effect only at restart
            requeue_recovery.recover(self.config.state_dir, self.specs, keys).log()
        except OSError as err:  # state_dir could not be listed, a record not renamed
            log.error("interrupted requeues could not be recovered", error=str(err))

    def _prove_waiting_placements(self) -> None:
        """Proves ``placement: rename`` of each inbox not proved when the configuration
        was applied (its archive made or mounted since); raises ConfigError for one that
        can never work (at start: nbankd does not start)."""
        waiting = {
            key: self.specs[key]
            for key, state in self.inboxes.items()
            if state.placement_problem is not None and key in self.specs
        }
        for key, problem in setup.prove_placements(self.config, waiting).items():
            self.inboxes[key].placement_problem = problem
            if problem is not None:  # tried again at each scan
                log.warning("inbox not taking deposits yet", inbox=key, error=problem)

    def _not_adopted(self, cfg: Config) -> dict[str, setup.InboxFolders]:
        """The recorded folders of each inbox whose path, a folder when it was prepared,
        is a symbolic link now: a reload never adopts a link swapped in for an inbox
        (its folders stay refused, status degraded, until the folder is back or nbankd
        is restarted); a path configured as a link from the start is followed."""
        kept: dict[str, setup.InboxFolders] = {}
        for inbox in cfg.inboxes:
            key = str(inbox.path)
            spec = self.specs.get(key)
            if spec is None or self._linked.get(key, True) or not os.path.islink(inbox.path):
                continue
            log.error(
                "inbox folder replaced by a symbolic link since it was prepared: not "
                "adopted by the reload; put the folder back, or restart nbankd to follow "
                "the link",
                inbox=key,
            )
            kept[key] = (spec.work_id, spec.rejected_id, spec.work_proof, spec.rejected_owner)
        return kept

    def set_paused(self, keys: list[str], paused: bool) -> None:
        """Pauses or resumes inboxes and records the choice in ``state_dir`` first, so
        a restart keeps it (an error recording it leaves everything as it was). Inboxes
        paused and then left out of the configuration stay recorded, so they come back
        paused."""
        with self._pause_lock:  # control requests run in threads: file and memory agree
            now = {k for k, s in self.inboxes.items() if s.paused}
            # inboxes a reload left out keep their record until they come back
            # read again (out of descriptors: the last known); nothing changes on error
            away = self._paused.load() - set(self.inboxes)
            wanted = away | (now | set(keys) if paused else now - set(keys))
            self._paused.save(wanted)
            for key in keys:
                self.inboxes[key].paused = paused

    def _prepare_registry(self, retry: bool = False) -> None:
        """Datatypes, archive creation and registration; retried from :meth:`run` on
        a backoff while they fail for a reason that may pass (see registry_setup)."""
        result = self.registry_setup.run(self.config, self.registry, retry=retry)
        if result.registry_problem is None:
            self.registry_problem = None  # the registry answered
        if retry and not result.retry:
            self.request_rescan()  # an archive may have just been made or registered
            self._retry_waiting(RECONFIGURED)

    def reload(self) -> str | None:
        """Re-reads the configuration file (SIGHUP); keeps running on a bad file.
        Returns why this reload failed, or None (the caller's own answer, never a
        concurrent reload's).

        Inboxes, archives, logging and the registry (URL or credentials) follow the
        new file; ``state_dir`` and ``control_socket`` need a restart (the loader keeps
        the running ones, with a warning). On any failure the running setup is kept and
        the reason logged and kept in :attr:`reload_problem`; READY=1 always follows
        RELOADING=1. One reload at a time."""
        sd = getattr(self.notifier, "notifier", None)  # sd_notify, when run by the CLI
        with self._reload_lock:
            if sd is not None:
                sd.reloading()
            try:
                problem = self.reload_problem = self._reload()
            finally:
                if sd is not None:
                    sd.ready()
                self._wake.set()
        return problem

    def _reload(self) -> str | None:
        """One reload; returns why it failed, or None."""
        old = self.config
        cfg: Config | None = None
        registry: Registry | None = None
        try:
            cfg = load_config(old.source, running=old, filesystem=True)
            if _registry_of(cfg) != _registry_of(old):
                # opened before anything changes: one that cannot be opened (its
                # credentials lack its host) fails the reload, the running configuration
                # kept whole, so that the next reload compares against it and tries again
                registry = _open_new_registry(cfg)
            with self._lock:
                # its folders and rejected folders first: nothing changed if they fail
                cfg = self._apply_config(cfg)
                self.config = cfg
        except Exception as err:  # a bad file, a folder it names that cannot be made, or
            if registry is not None:  # a new registry that cannot be opened
                registry.close()
            problem = _failure(err, cfg)
            source = str(old.source)
            log.error(
                "reload failed; keeping the running configuration", source=source, error=problem
            )
            return f"the running configuration is kept: {problem}"
        for warning in cfg.warnings:
            log.warning("configuration warning", problem=str(warning))
        try:
            if registry is not None:
                self._switch_registry(cfg, registry)
            if cfg.log != old.log:
                from nbankd.service.logs import configure_logging

                configure_logging(cfg.log.format, cfg.log.level)
            self._prepare_registry()
            self._probe_archives(cfg)
            self._watch_inboxes()
            self._retry_waiting(RECONFIGURED)  # parked, or waiting on the archive's record
        except Exception as err:  # a bug: the new file is in use, a step after it failed
            problem = f"{cfg.source} is in use, but a step after it failed: {_failure(err, cfg)}"
            log.exception("reload failed after applying the configuration", error=problem)
            return problem
        log.info("configuration reloaded", source=str(cfg.source))
        return None

    def _switch_registry(self, cfg: Config, registry: Registry) -> None:
        """Puts the registry the reload opened in use, closing the old one."""
        old, self.registry = self.registry, registry
        self.steps.registry = registry
        log.info("registry changed", registry=registry.url)
        old.close()
        # the state folder and journal (and its log) as recorded at start; the registry
        # file now in use
        recorded = dict(zip(("", *self._state_files), self._state_ids, strict=False))
        base = tuple(n for n in self._state_files if n != EMBEDDED_DB_NAME)
        kept = tuple(recorded.get(n, (-1, -1)) for n in ("", *base))  # lost: a problem
        if cfg.embedded:
            with contextlib.suppress(OSError):  # gone already: the next check says so
                self._state_files = (*base, EMBEDDED_DB_NAME)
                self._state_ids = kept + statelock.identities(cfg.state_dir, EMBEDDED_DB_NAME)[1:]
        else:
            self._state_files, self._state_ids = base, kept


def _registry_of(cfg: Config) -> tuple[object, ...]:
    """What opening the registry depends on: a change opens it again at a reload."""
    return (cfg.registry, cfg.registry_url, cfg.registry_auth)


def _open_new_registry(cfg: Config) -> Registry:
    """The registry ``cfg`` names, or a ConfigError naming it and why."""
    try:
        return open_configured_registry(cfg)
    except Exception as err:  # credentials without its host, an unreadable file...
        cause = str(err) if isinstance(err, errors.NbankdError) else f"{type(err).__name__}: {err}"
        raise errors.ConfigError(
            f"cannot open the new registry {cfg.registry}: {cause}; fix that, then reload again"
        ) from None


def _failure(err: Exception, cfg: Config | None) -> str:
    """Why a reload failed, in words naming what (the file's problems, the inbox whose
    folder could not be made)."""
    if isinstance(err, OSError) and err.filename is not None and cfg is not None:
        target = os.fsdecode(err.filename)
        inbox = cfg.inbox_containing(target)
        where = f"{cfg.source}: inboxes[{cfg.inboxes.index(inbox)}].path: " if inbox else ""
        return f"{where}cannot prepare {target}: {err.strerror or err}"
    return str(err) if isinstance(err, errors.NbankdError) else f"{type(err).__name__}: {err}"
