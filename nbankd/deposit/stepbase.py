"""The shared part of the deposit steps: construction, an item's inbox and archive as
its journaled intent fixed them (:class:`~nbankd.deposit.spec.Intent`; which values
are deliberately read from the live configuration is told in
:mod:`nbankd.deposit.spec`), staged names and targets.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import structlog

from nbankd import errors, seams
from nbankd.archive import durable, layout, opening
from nbankd.archive.stubnames import STUB_NAMES
from nbankd.deposit.damaged import DamagedCopies
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import UNDECIDED, Outcome, State, Step, undecided
from nbankd.deposit.spec import InboxSpec, Intent
from nbankd.metadata_readers import ReaderResult, read_file_metadata
from nbankd.names import MANUAL_INBOX_PREFIX
from nbankd.registry.base import Registry

log = structlog.get_logger("nbankd.deposit")

StepResult = tuple[Item, Outcome]

_WRITES_INTO_INBOX = frozenset({State.CLAIMING, State.REJECTING, State.RETURNING})
#: states whose step writes only into the inbox (a rejection, a put-back): they need no
#: archive, so they finish whether or not the item's archive is still configured
_INBOX_ONLY = frozenset({State.REJECTING, State.RETURNING})
#: states in which an item not registered follows its archive by the journaled path
#: (:meth:`StepsBase.follow_archive`)
_FOLLOWS = UNDECIDED | {State.CHECKED}


class MetadataReader(Protocol):
    """How a step runs a datatype's reader (:func:`read_file_metadata`'s arguments)."""

    def __call__(self, dtype: str, path: Path, name: str, *, only_copy: bool) -> ReaderResult: ...


def _read_metadata(dtype: str, path: Path, name: str, *, only_copy: bool) -> ReaderResult:
    """The datatype's reader on ``path``, seen as ``name``, with the default limits
    (``only_copy``: the recording's only copy, never read by an unconfined reader)."""
    return read_file_metadata(dtype, path, name=name, only_copy=only_copy)


class InboxParked(errors.NbankdError):
    """An item's inbox was removed from the configuration: it waits, never rejected."""

    code = "parked"
    transient = True


class StepsBase:
    """What every deposit step needs: the journal, the registry, the inboxes as the
    item's journaled intent fixed them, archives and staged names."""

    def __init__(
        self,
        *,
        journal: Journal,
        registry: Registry,
        inboxes: Callable[[str], InboxSpec | None],
        receipts_dir: Path,
        clock: Callable[[], float] = time.time,
        retired: Callable[[str], InboxSpec | None] = lambda _key: None,
        archives: Callable[[str], Path | None] | None = None,
        archive_at: Callable[[Path], str | None] | None = None,
        registration: Callable[[str, Path], str | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.journal = journal
        self.registry = registry
        self.inboxes = inboxes  # the configured inboxes, by key
        self.retired = retired  # inboxes a reload removed (their items in flight finish)
        self.archives = archives  # the configured archives' paths, by name (None: any)
        self.archive_at = archive_at  # the name of the archive configured at a path
        #: why deposits into an archive (name, path) wait: the registry does not record
        #: that name with that root (None: no check)
        self.registration = registration
        self.rng = rng  # the backoff's jitter (None: the process's own randomness)
        self.receipts_dir = receipts_dir
        self.clock = clock
        self.instance = secrets.token_hex(4)  # in staged names: never shared by processes
        self._local = threading.local()  # per worker: its liveness beat
        self._opened: dict[tuple[object, ...], layout.Archive] = {}  # see _archive
        #: runs a datatype's metadata reader: (dtype, file, name shown) -> result
        self.metadata_reader: MetadataReader = _read_metadata
        #: inputs put back as damaged copies of their deposits (rejected when claimed)
        self.damaged = DamagedCopies(journal, clock)

    @contextlib.contextmanager
    def listings_shared(self) -> Iterator[None]:
        """Within, on the calling thread: the lookups list each stub folder once (a
        round's lookups share one listing). A lookup's listing is a hint, however
        fresh: publishing lists the folder again under the identifier's lock."""
        self._local.listings = {}
        try:
            yield
        finally:
            self._local.listings = None

    @contextlib.contextmanager
    def registering_together(self, items: Iterable[Item] = ()) -> Iterator[None]:
        """Within, on the calling thread: registrations share one registry batch
        (:meth:`~nbankd.registry.base.Registry.batch`; the embedded registry commits
        them in one transaction at the end, or raises and keeps none). Their
        "after-register" point is reached once the batch is committed, not before:
        until then nothing is registered.

        The archives of ``items`` (those registering) are opened first and served
        from memory inside: nothing touches a filesystem while the registry's write
        lock may be held, so a dead archive mount stalls this thread, never every
        writer of the registry."""
        pinned: dict[Path, layout.Archive | Exception] = {}
        for item in items:
            intent = Intent.of(item)
            if intent.archive_path not in pinned:
                try:
                    pinned[intent.archive_path] = self._archive(intent)
                except Exception as err:  # raised again by the step that needs it
                    pinned[intent.archive_path] = err
        self._local.registered = []
        self._local.pinned = pinned
        try:
            with self.registry.batch():
                yield
            for _token in self._local.registered:
                seams.reached("after-register")
        finally:
            self._local.registered = None
            self._local.pinned = None

    def _registering_together(self) -> bool:
        """True inside :meth:`registering_together` on this thread."""
        return getattr(self._local, "pinned", None) is not None

    def _registered(self, item: Item) -> None:
        """``item`` is registered (:meth:`registering_together`: once committed)."""
        together: list[str] | None = getattr(self._local, "registered", None)
        if together is None:
            seams.reached("after-register")
        else:
            together.append(item.token)

    def _lookup_known(self) -> layout.Known:
        """The names lookups use: a stub folder's names kept by inotify
        (:data:`~nbankd.archive.stubnames.STUB_NAMES`), else a listing made once per
        stub folder and shared within :meth:`listings_shared`, else a listing each."""
        cache: dict[Path, layout.Listing | OSError] | None = getattr(self._local, "listings", None)

        def known(stub: Path, id: str) -> list[str] | None:
            names = STUB_NAMES.names_of(stub, id)
            if names is not None or cache is None:
                return names
            listed = cache.get(stub)
            if listed is None:
                try:
                    listed = cache[stub] = layout.Listing(os.listdir(stub))
                except (FileNotFoundError, NotADirectoryError) as err:  # no such stub yet
                    cache[stub] = err
                    raise
            if isinstance(listed, OSError):
                raise type(listed)(listed.errno, listed.strerror, listed.filename)
            return listed.of(id)

        return known

    def set_beat(self, beat: Callable[[], None] | None) -> None:
        """The calling thread's liveness beat during long copies and reads (None: none)."""
        self._local.beat = beat

    def _progress(self, _done: int = 0) -> None:
        """Called during long copies and reads: a worker moving bytes is alive."""
        beat = getattr(self._local, "beat", None)
        if beat is not None:
            beat()

    # -- helpers ----------------------------------------------------------------

    def _spec(self, item: Item) -> InboxSpec:
        """The inbox as the item's journaled intent fixed it: the archive, its path,
        placement and verify recorded when the item was journaled (laid over the live
        spec by :meth:`Intent.fix`), never what a later reload configured. An item
        finishes so while its archive is configured (at the same path), even if a
        reload removed or re-pointed its inbox; otherwise it is parked (never rejected
        for a configuration change) if anything of it may be registered
        (:meth:`follow_archive` sends the others back, or after their archive).
        Claiming, rejecting and putting back write into the inbox, so they wait for it
        to be configured; rejecting and putting back need no archive."""
        live = self.inboxes(item.inbox)
        spec = live or self.retired(item.inbox)

        def where() -> str:  # in messages only (every step of every deposit passes here)
            return f"item {item.token} ({item.relpath_str!r})"

        if spec is None or (live is None and item.state in _WRITES_INTO_INBOX):
            raise InboxParked(
                f"inbox {item.inbox} is no longer configured; {where()} is parked, "
                "never rejected for it",
                hint="restore the inbox in the configuration (and reload) to finish it",
            )
        if item.state not in _INBOX_ONLY and not self._archive_configured(item):
            if undecided(item.progress):  # nothing registered: it goes back (follow_archive)
                raise InboxParked(
                    f"archive {item.archive} ({item.archive_path}), chosen for {where()}, "
                    "is no longer configured; nothing was registered for it: it goes back "
                    f"to its inbox {item.inbox} to be decided again"
                    + ("" if live is not None else " once that inbox is configured"),
                    hint="restore the inbox in the configuration if it was removed (and "
                    "reload): the input then goes back to it and is deposited as the "
                    "configuration says",
                )
            raise InboxParked(
                f"archive {item.archive} ({item.archive_path}), chosen for {where()} when "
                "it was claimed, is no longer configured there; the item may be "
                "registered in it (its record names that archive), so it is parked, "
                "never sent elsewhere",
                hint=f"configure archive {item.archive} at {item.archive_path} again (and "
                "reload) to finish it",
            )
        return Intent.of(item).fix(spec)

    def _archive_configured(self, item: Item) -> bool:
        """True when the item's journaled archive is configured (under its name, at its
        journaled path), or nothing says which are (manual deposits: their own)."""
        if self.archives is None or item.inbox.startswith(MANUAL_INBOX_PREFIX):
            return True
        configured = self.archives(item.archive)
        if configured is None:
            return False
        # the text first (the common case, asked before every step), then as paths
        return str(configured) == item.archive_path or configured == Path(item.archive_path)

    def follow_archive(self, item: Item, step: Step) -> Item | StepResult:
        """Before ``step`` of an item with nothing registered whose archive is no longer
        configured: the item, following its archive by the journaled path when that
        path is configured under another name (journaled with the step; also from
        CHECKED: a registration it may have sent could only name an archive registered
        at that very path, which the registry then knows by the new name); else, for
        an item with nothing registered, published or under way to the registry
        (:func:`~nbankd.deposit.lifecycle.undecided`) and its inbox configured, a
        REDECIDE outcome: its input goes back to the inbox (from the work folder, if
        the claim took it) and the next scan decides it again under the configuration
        in use. Any other item as it is (:meth:`_spec` parks what must wait)."""
        p = item.progress
        if p.registered or p.state not in _FOLLOWS or self._archive_configured(item):
            return item
        path = Path(item.archive_path)
        name = self.archive_at(path) if self.archive_at is not None else None
        if name is not None:
            log.warning(
                "the archive of an input in flight is configured under another name; "
                "the input follows it by its path",
                item=item.token,
                step=str(step),
                archive=name,
                was=item.archive,
                path=str(path),
            )
            return item.changed(archive=name)
        if not undecided(p) or self.inboxes(item.inbox) is None:
            return item  # parked: may be registered, or its inbox is not there to go back
        message = (
            f"archive {item.archive} ({path}), chosen for {item.relpath_str!r} when it "
            "was journaled, is no longer configured; nothing was registered for it, so "
            "it goes back to its inbox to be decided again under the configuration in use"
        )
        return item, Outcome("redecide", "archive-changed", message)

    def _check_registration(self, item: Item) -> None:
        """Raises ArchiveUnregistered when the registry does not record the item's
        archive under its name with its journaled path as root: nothing is registered
        or published for it, its input waits (manual deposits are not asked)."""
        if self.registration is None or item.inbox.startswith(MANUAL_INBOX_PREFIX):
            return
        problem = self.registration(item.archive, Path(item.archive_path))
        if problem is not None:
            raise errors.ArchiveUnregistered(f"{item.relpath_str!r} waits: {problem}")

    def _leftover_staged(self, item: Item) -> None:
        """A staged copy of an item whose archive is no longer configured is left where
        it is (nothing is written outside the configured archives; staging/ is safe to
        clean): logged when there may be one."""
        if item.sha1 is None and item.staged_identity is None:
            return  # never staged
        log.warning(
            "an input whose archive left the configuration may have left a staged copy "
            "there; anything in staging/ is safe to delete",
            item=item.token,
            archive=item.archive,
            staging=str(Path(item.archive_path) / layout.STAGING_NAME),
        )

    @staticmethod
    def staged_name(item: Item) -> str:
        """The staged copy's name: journaled by the process that wrote it (items of an
        older journal: the name every process used then)."""
        if item.staged_identity:
            return str(json.loads(item.staged_identity)["name"])
        return layout.staged_name(item.token)

    def _new_staged_name(self, archive: layout.Archive, item: Item) -> str:
        """A name no other process can use (this process's instance in it), after
        removing what earlier attempts at this item left in staging/."""
        self._discard_leftovers(archive, item)
        return layout.staged_name(item.token, self.instance)

    @staticmethod
    def _discard_leftovers(archive: layout.Archive, item: Item) -> None:
        """Removes what earlier attempts at this item left in staging/ (under either
        form of its staged name)."""
        for leftover in durable.staged_copies(archive, item.token):
            durable.discard_staged(archive, leftover)

    def _archive(self, spec: InboxSpec | Intent) -> layout.Archive:
        """The archive at the item's journaled path, read again whenever its nbank.json
        is not the very file read last time (another inode, size, mtime or ctime: an
        edit, a remount), and served from memory otherwise (every step asks). Inside
        :meth:`registering_together`, the archives it opened are served as they were."""
        pinned: dict[Path, layout.Archive | Exception] | None = getattr(self._local, "pinned", None)
        if pinned is not None and spec.archive_path in pinned:
            found = pinned[spec.archive_path]
            if isinstance(found, Exception):
                raise found
            return found
        try:
            st = os.stat(_config_file(spec.archive_path))
        except OSError:
            key = None  # open_archive says why, in its words
        else:
            key = (str(spec.archive_path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            key += (st.st_ctime_ns,)
            cached = self._opened.get(key)
            if cached is not None:
                return cached
        try:
            archive = opening.open_archive(spec.archive_path)
        except errors.NotAnArchive as err:
            # a configured archive without a usable nbank.json is an unmounted or damaged
            # filesystem, the operator's to fix: the input waits and is never rejected
            raise errors.ArchiveUnavailable(err.message, hint=err.hint) from None
        if key is not None:
            if len(self._opened) >= 64:  # archives re-created over and over: start afresh
                self._opened.clear()
            self._opened[key] = archive
        return archive

    def _target(self, archive: layout.Archive, item: Item) -> Path:
        assert item.name is not None and item.target_name is not None
        # filed by the identifier: "a.json" of identifier "a" goes to resources/a/
        return archive.stored_file(item.name, item.target_name)

    # -- the steps ---------------------------------------------------------------

    def _discard_staged(self, spec: InboxSpec | Intent, item: Item) -> None:
        try:
            archive = self._archive(spec)
        except errors.ArchiveError:  # archive gone: its staging/ is safe to clean later
            return
        durable.discard_staged(archive, archive.staging_dir / self.staged_name(item))


@functools.lru_cache(maxsize=64)
def _config_file(archive_path: Path) -> str:
    """The archive's nbank.json, as text, joined once per archive (every step asks)."""
    return str(archive_path / layout.CONFIG_NAME)
