"""The thin I/O shell of the deposit life cycle: one function per step.

Each step reads the item, does its I/O, and returns the updated item with an
:class:`~nbankd.deposit.lifecycle.Outcome`; :class:`Runner` persists the result
through :func:`~nbankd.deposit.lifecycle.advance`. Every step is idempotent:
after a crash the same step runs again from the journaled state and finds its
own earlier work (a renamed file, a staged copy, a registry record, a link).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from nbankd import errors, seams
from nbankd.archive import durable, fsops, layout
from nbankd.deposit import inboxfs, policy, receipts, rejection, verdicts
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import Outcome, State, Step, advance, next_step
from nbankd.deposit.spec import InboxSpec
from nbankd.hashing import SourceReadError, hash_path, sha1_stream
from nbankd.registry.base import Registry, ResourceRecord
from nbankd.watch.scan import identity_of_path, tree_identity

log = structlog.get_logger("nbankd.deposit")

StepResult = tuple[Item, Outcome]
_PROC_FD = re.compile(r"/proc/self/fd/\d+")
IDENTITY_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def _identity_json(path: Path, is_dir: bool) -> str:
    ident = tree_identity(path) if is_dir else identity_of_path(path)
    return json.dumps({k: getattr(ident, k) for k in IDENTITY_FIELDS})


def _same_identity(recorded: str | None, path: Path, is_dir: bool) -> bool:
    if recorded is None:
        return False
    try:
        return json.loads(_identity_json(path, is_dir)) == json.loads(recorded)
    except FileNotFoundError:
        return False


def _staged_id(path: Path) -> str:
    """The staged copy's name and identity, journaled with the step that wrote it."""
    st = os.lstat(path)
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return json.dumps(
        {
            "name": path.name,
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": size,
            "mtime_ns": st.st_mtime_ns,
        }
    )


def _staged_matches(recorded: str | None, path: Path) -> bool:
    """True when ``path`` is still the staged copy journaled (device, inode, size,
    mtime), or no identity was journaled (items of an older journal)."""
    if recorded is None:
        return True
    try:
        now = json.loads(_staged_id(path))
    except OSError:
        return False
    return now == json.loads(recorded)


def _seen_matches(seen: str | None, st: os.stat_result) -> bool:
    """True when the entry about to be claimed is the one the scan saw (device and
    inode), or when no scan identity was recorded (items of an older journal)."""
    if seen is None:
        return True
    want = json.loads(seen)
    return (want.get("dev"), want.get("ino")) == (st.st_dev, st.st_ino)


def _fstat_matches(recorded: str | None, st: os.stat_result) -> bool:
    if recorded is None:
        return False
    want = json.loads(recorded)
    got = {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    return want == got


def _unreadable(spec: InboxSpec, item: Item, detail: str = "") -> Outcome:
    return Outcome(
        "permanent",
        "unreadable",
        f"{item.relpath_str!r} cannot be read by the nbankd user{': ' + detail if detail else ''}",
        "make it readable by the inbox's group (e.g. setgid inbox folder, umask 002) "
        "and requeue it",
    )


def _outcome_for(err: BaseException) -> Outcome:
    """Classifies an exception from archive or registry I/O."""
    if isinstance(err, policy.PolicyError):
        return Outcome("permanent", err.code, err.message, err.hint)
    if isinstance(err, errors.RegistryAuthError | errors.UnknownArchive):
        # wrong credentials or an unregistered archive are the operator's to fix,
        # never the input's fault: the input waits
        return Outcome("transient", err.code, err.message, err.hint)
    if isinstance(err, errors.NbankdError):
        kind = "transient" if err.transient else "permanent"
        return Outcome(kind, err.code, err.message, err.hint)
    if isinstance(err, OSError):
        if err.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EIO,
            errno.EROFS,
            errno.EACCES,
            errno.EPERM,
            errno.ENOENT,
            errno.ESTALE,
            errno.ENOTCONN,
        ):
            return Outcome("transient", "archive-unavailable", f"{err}")
        return Outcome("transient", "os-error", f"{err}")
    return Outcome("transient", "internal", f"{type(err).__name__}: {err}")


#: states whose step writes into the inbox folder (claim, reject, put back)
_WRITES_INTO_INBOX = frozenset({State.CLAIMING, State.REJECTING, State.RETURNING})


class InboxParked(errors.NbankdError):
    """An item's inbox was removed from the configuration: it waits, never rejected."""

    code = "parked"
    transient = True


class Steps:
    """Executes deposit steps for items of known inboxes."""

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
    ) -> None:
        self.journal = journal
        self.registry = registry
        self.inboxes = inboxes  # the configured inboxes, by key
        self.retired = retired  # inboxes a reload removed (their items in flight finish)
        self.archives = archives  # the configured archives' paths, by name (None: any)
        self.receipts_dir = receipts_dir
        self.clock = clock
        self.instance = secrets.token_hex(4)  # in staged names: never shared by processes
        self._local = threading.local()  # per worker: its liveness beat

    def _progress(self, _done: int = 0) -> None:
        """Called during long copies and reads: a worker moving bytes is alive."""
        beat = getattr(self._local, "beat", None)
        if beat is not None:
            beat()

    # -- helpers ----------------------------------------------------------------

    def _spec(self, item: Item) -> InboxSpec:
        """The inbox as the item's journaled intent fixed it: the archive, its path,
        placement and verify recorded when the item was journaled, never what a later
        reload configured. An item finishes so while its archive is configured (at
        the same path), even if a reload removed or re-pointed its inbox; otherwise it
        is parked (never rejected for a configuration change). Claiming, rejecting and
        putting back write into the inbox, so they wait for it to be configured."""
        live = self.inboxes(item.inbox)
        spec = live or self.retired(item.inbox)
        where = f"item {item.token} ({item.relpath_str!r})"
        if spec is None or (live is None and item.state in _WRITES_INTO_INBOX):
            raise InboxParked(
                f"inbox {item.inbox} is no longer configured; {where} is parked, "
                "never rejected for it",
                hint="restore the inbox in the configuration (and reload) to finish it",
            )
        if self.archives is not None:
            configured = self.archives(item.archive)
            if configured is None or Path(configured) != Path(item.archive_path):
                raise InboxParked(
                    f"archive {item.archive} ({item.archive_path}), chosen for {where} when "
                    "it was claimed, is no longer configured there; the item is parked, "
                    "never sent elsewhere",
                    hint="restore the archive in the configuration (and reload) to finish it",
                )
        return replace(
            spec,
            archive_name=item.archive,
            archive_path=Path(item.archive_path),
            placement=item.placement,
            verify=item.verify,
        )

    @staticmethod
    def staged_name(item: Item) -> str:
        """The staged copy's name: journaled by the process that wrote it (items of an
        older journal: the name every process used then)."""
        if item.staged_identity:
            return str(json.loads(item.staged_identity)["name"])
        return f"{durable.STAGED_PREFIX}{item.token}"

    def _new_staged_name(self, archive: layout.Archive, item: Item) -> str:
        """A name no other process can use (this process's instance in it), after
        removing what earlier attempts at this item left in staging/."""
        prefix = f"{durable.STAGED_PREFIX}{item.token}"
        for leftover in durable.list_staged(archive):
            if leftover.name == prefix or leftover.name.startswith(prefix + "-"):
                durable.discard_staged(archive, leftover)
        return f"{prefix}-{self.instance}"

    def _archive(self, spec: InboxSpec) -> layout.Archive:
        try:
            return layout.open_archive(spec.archive_path)
        except errors.NotAnArchive as err:
            # a configured archive without a usable nbank.json is an unmounted or damaged
            # filesystem, the operator's to fix: the input waits and is never rejected
            raise errors.ArchiveUnavailable(err.message, hint=err.hint) from None

    def _target(self, archive: layout.Archive, item: Item) -> Path:
        assert item.name is not None and item.target_name is not None
        # filed by the identifier: "a.json" of identifier "a" goes to resources/a/
        return archive.stored_file(item.name, item.target_name)

    # -- the steps ---------------------------------------------------------------

    def claim(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            token = item.token.encode()
            if not fs.exists(fs.work, token):
                try:
                    result = self._take(spec, fs, item)
                except inboxfs.Escape as err:
                    # a folder on the way was swapped for a link: nothing was taken
                    return item, Outcome("gone", "gone", err.message)
                except FileNotFoundError:
                    # a folder on the way was removed (with the input): nothing to take
                    src = spec.path / item.relpath_str
                    return item, Outcome("gone", "gone", f"{src} vanished before it was claimed")
                if result is not None:
                    return result
            else:
                claimed = fs.lstat(fs.work, token)
                if claimed is not None and not _seen_matches(item.seen_identity, claimed):
                    # replayed after a crash that took the wrong entry: give it back
                    return item, Outcome(
                        "changed", "changed", "not the entry the scan saw; putting it back"
                    )
            # the input is in the work folder: from here on it is never "gone"
            self._take_sidecar(spec, fs, item)
            return self._plan(spec, fs, item)

    def _take(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> StepResult | None:
        """Moves the input into the work folder, walking from the inbox folder; returns
        an outcome when it is not taken (left where it is, or put back untouched)."""
        work = fs.work
        token = item.token.encode()
        is_dir = item.kind == "dir"
        parent, name = fs.parent(item.relpath)
        src = spec.path / item.relpath_str
        st = fs.lstat(parent, name)
        if st is None:
            return item, Outcome("gone", "gone", f"{src} vanished before it was claimed")
        ok_kind = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
        unsafe = item.kind == "unsafe"
        if not unsafe and (not ok_kind or (not is_dir and st.st_nlink > 1)):
            return item, Outcome("gone", "unsupported", f"{src} is no longer a plain input")
        if not _seen_matches(item.seen_identity, st):
            return item, Outcome(
                "gone", "gone", f"{src} is not the entry the scan saw (replaced); left alone"
            )
        try:
            fs.take(parent, name, work, token)
        except FileNotFoundError:
            return item, Outcome("gone", "gone", f"{src} was taken by another process")
        except PermissionError as err:
            # the inbox folder holding the file, not the archive, is the problem;
            # the file cannot be moved at all, so it waits where it is
            return item, Outcome(
                "transient",
                "inbox-not-writable",
                f"cannot move {src} out of {src.parent}: {err.strerror}",
                f"give the daemon's user write permission on {src.parent} "
                "(e.g. make it group-writable by the lab group, with the setgid bit)",
            )
        claimed = fs.lstat(work, token)
        if claimed is not None and (claimed.st_dev, claimed.st_ino) != (st.st_dev, st.st_ino):
            # swapped between the check and the move: the put-back step returns it
            return item, Outcome(
                "changed", "changed", f"{src} changed while it was claimed; putting it back"
            )
        seams.reached("after-claim-rename")
        return None

    def _take_sidecar(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> None:
        """Moves the input's sidecar next to it; one that cannot be reached (its folder
        gone or swapped for a link) counts as absent, as one deleted would."""
        side_token = rejection.sidecar_work_name(item)
        if item.sidecar_relpath is None or side_token is None:
            return
        try:
            side_parent, side_name = fs.parent(item.sidecar_relpath)
            if fs.exists(side_parent, side_name) and not fs.exists(fs.work, side_token):
                fs.take(side_parent, side_name, fs.work, side_token)
        except (inboxfs.Escape, FileNotFoundError, NotADirectoryError):
            log.warning("sidecar not reachable; deposited without it", item=item.token)

    def _plan(self, spec: InboxSpec, fs: inboxfs.InboxFS, item: Item) -> StepResult:
        """Records the claimed input's identity and decides its identifier and metadata."""
        is_dir = item.kind == "dir"
        work = fs.at(fs.work, item.token)
        side_name = rejection.sidecar_work_name(item)
        sidecar_work = fs.at(fs.work, side_name) if side_name is not None else None
        if item.kind == "unsafe":
            # a symlink, hard link, FIFO, socket or device: moved by name, never opened
            reason = json.loads(item.reason_json or "{}")
            return item, Outcome(
                "permanent",
                reason.get("code", "unsupported"),
                reason.get("message", "not a regular file"),
                reason.get("hint", ""),
            )
        item = replace(item, identity=item.identity or _identity_json(work, is_dir))
        # a symlink, FIFO or device swapped in before the rename is never read
        st = os.lstat(work)
        if not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
            return item, Outcome("permanent", "unsupported", "not a regular file when claimed")
        if not is_dir and st.st_size == 0:
            return item, Outcome(
                "permanent",
                "empty",
                f"{item.relpath_str!r} has zero bytes",
                "an empty recording is almost always a failed acquisition; "
                "check the rig and requeue if it is meant to be empty",
            )
        try:
            archive = self._archive(spec)
            sidecar = self._read_sidecar(item, sidecar_work)
            rules = spec.rules(
                auto_identifiers=archive.policy.auto_identifiers,
                auto_id_type=archive.policy.auto_id_type,
                keep_extensions=archive.policy.keep_extensions,
                allow_directories=archive.policy.allow_directories,
            )
            plan = policy.plan(
                item.relpath_str, rules, sidecar, token=item.token_bytes, is_dir=is_dir
            )
        except (errors.NbankdError, OSError) as err:
            return item, _outcome_for(err)
        item = replace(
            item,
            name=plan.name,
            dtype=plan.dtype,
            metadata_json=plan.metadata_json,
            target_name=plan.target_name,
            auto_id=plan.auto,
        )
        seams.reached("after-claim")
        return item, Outcome.ok()

    def _read_sidecar(self, item: Item, path: Path | None) -> policy.Sidecar:
        if path is None or not os.path.lexists(path):
            return policy.Sidecar()
        source = os.fsdecode(item.sidecar_relpath or b"")
        st = os.lstat(path)  # a link, FIFO or device is refused before it is ever opened
        policy.check_sidecar_entry(st.st_mode, st.st_nlink, source=source)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            policy.check_sidecar_entry(st.st_mode, st.st_nlink, source=source)
            raw = f.read(policy.SIDECAR_MAX_BYTES + 1)
        return policy.parse_sidecar(
            policy.sidecar_text(raw, source=source),
            json_format=path.suffix == ".json",
            source=source,
        )

    def stage(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            return self._stage(spec, item, fs.at(fs.work, item.token))

    def _stage(self, spec: InboxSpec, item: Item, work: Path) -> StepResult:
        archive = self._archive(spec)
        if item.kind == "dir":
            if not _same_identity(item.identity, work, True):
                return item, Outcome("changed", "changed", "the folder changed after claiming")
            try:
                staged = durable.stage_copy_tree(
                    archive, work, self._new_staged_name(archive, item), progress=self._progress
                )
            except SourceReadError as err:
                if err.errno in (errno.EACCES, errno.EPERM):
                    return item, _unreadable(spec, item, str(err))
                raise
            if not _same_identity(item.identity, work, True):
                durable.discard_staged(archive, staged.path)
                return item, Outcome("changed", "changed", "the folder changed during the copy")
            item = replace(
                item, sha1=staged.sha1, size=staged.size, staged_identity=_staged_id(staged.path)
            )
        else:
            try:
                fd = os.open(work, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except PermissionError:
                return item, _unreadable(spec, item)
            with os.fdopen(fd, "rb") as f:
                if not _fstat_matches(item.identity, os.fstat(f.fileno())):
                    return item, Outcome("changed", "changed", "the file changed after claiming")
                if spec.placement == "rename":
                    sha1, size = sha1_stream(f), os.fstat(f.fileno()).st_size
                else:
                    staged = durable.stage_copy(
                        archive, f, self._new_staged_name(archive, item), progress=self._progress
                    )
                    sha1, size = staged.sha1, staged.size
                    item = replace(item, staged_identity=_staged_id(staged.path))
                seams.reached("stage-copied")
                if not _fstat_matches(item.identity, os.fstat(f.fileno())):
                    if spec.placement != "rename":
                        durable.discard_staged(archive, staged.path)
                    return item, Outcome("changed", "changed", "the file changed during the copy")
            item = replace(item, sha1=sha1, size=size)
        seams.reached("after-stage")
        return item, Outcome.ok()

    def lookup(self, item: Item) -> StepResult:
        spec = self._spec(item)
        archive = self._archive(spec)
        item = replace(item, already=False)  # decided again on every lookup
        facts = self._facts(item, archive, self.registry.get_resource(item.name or ""))
        facts = replace(facts, holders=tuple(r.name for r in self.registry.search(sha1=facts.sha1)))
        target = str(self._target(archive, item))
        stored = archive.stored_entries(facts.name)
        # the entry where this input would go is the one judged, when there is one
        ordered = sorted((str(p) for p in stored), key=lambda p: p != target)
        facts = replace(facts, stored=tuple(ordered))
        if verdicts.needs_stored_sha1(facts):
            facts = replace(facts, stored_sha1=self._stored_sha1(Path(facts.stored[0])))
        item, outcome = self._act(item, verdicts.at_lookup(facts))
        if outcome.kind == "ok":
            seams.reached("after-lookup")
        return item, outcome

    def _facts(
        self, item: Item, archive: layout.Archive, record: ResourceRecord | None
    ) -> verdicts.Facts:
        """What the registry's record for the item's identifier says about it."""
        assert item.name and item.sha1 and item.target_name
        matches = record is not None and record.dtype == item.dtype
        if matches and record is not None:
            theirs = record.metadata or {}
            ours = json.loads(item.metadata_json or "{}")
            matches = all(theirs.get(k) == v for k, v in ours.items())
        return verdicts.Facts(
            name=item.name,
            sha1=item.sha1,
            target=str(self._target(archive, item)),
            auto=item.auto_id,
            registered=item.progress.registered,
            has_record=record is not None,
            record_matches=matches,
            record_sha1=(record.sha1 or "").lower() if record is not None else None,
        )

    def _stored_sha1(self, path: Path) -> str:
        """The SHA-1 of a stored file or folder, read back from storage."""
        if path.is_symlink():
            return "(a symbolic link)"
        if path.is_dir():
            return hash_path(path)
        return durable.sha1_from_storage(path, throttle=self._progress)

    def _act(self, item: Item, verdict: verdicts.Verdict) -> StepResult:
        """The outcome of a verdict on the item's identifier (a replaced automatic
        identifier is journaled with the outcome that sends it to lookup again)."""
        kind = verdict.kind
        if kind is verdicts.Kind.PROCEED:
            return item, Outcome.ok()
        if kind is verdicts.Kind.ALREADY:
            log.info("already deposited", item=item.token, resource_id=item.name)
            return replace(item, already=True), Outcome.ok()
        if kind is verdicts.Kind.RECHECK:
            return item, Outcome("recheck", verdict.code, verdict.message, verdict.hint)
        if kind is verdicts.Kind.RENAME:
            assert item.name and item.target_name
            if item.progress.registered:  # a record may carry this name: it stays
                return item, Outcome("transient", "internal", f"{verdict.message} (registered)")
            spec = self._spec(item)
            archive = self._archive(spec)
            name = policy.replacement_identifier(
                item.token_bytes, item.name, archive.policy.auto_id_type
            )
            suffix = item.target_name[len(item.name) :]
            log.warning(
                "automatic identifier taken; replaced",
                item=item.token,
                taken=item.name,
                resource_id=name,
                reason=verdict.message,
            )
            item = replace(item, name=name, target_name=name + suffix)
            return item, Outcome("renamed", verdict.code, f"{verdict.message}; now {name}")
        kind_name = "superseded" if kind is verdicts.Kind.SUPERSEDED else "permanent"
        return item, Outcome(kind_name, verdict.code, verdict.message, verdict.hint)

    def register(self, item: Item) -> StepResult:
        spec = self._spec(item)
        assert item.name and item.dtype and item.sha1 and item.target_name
        if item.already:  # the record is there: only this archive's location may be new
            record = self.registry.get_resource(item.name)
            if record is not None and (record.sha1 or "").lower() == item.sha1:
                if spec.archive_name not in record.locations:
                    self.registry.add_location(item.name, spec.archive_name)
                return replace(item, url=self.registry.resource_url(item.name)), Outcome.ok()
            item = replace(item, already=False)  # the record went since: register it
        try:
            self.registry.add_resource(
                dtype=item.dtype,
                archive=spec.archive_name,
                name=item.name,
                sha1=item.sha1,
                metadata=json.loads(item.metadata_json or "{}"),
            )
            seams.reached("after-register-request")
        except (errors.NameTaken, errors.Sha1Taken):
            # ours already if an earlier attempt's answer was lost; else whose it is
            archive = self._archive(spec)
            record = self.registry.get_resource(item.name)
            facts = self._facts(item, archive, record)
            if record is None:
                holders = tuple(r.name for r in self.registry.search(sha1=item.sha1))
                facts = replace(facts, holders=holders)
            item, outcome = self._act(item, verdicts.at_register(facts))
            if outcome.kind != "ok":
                return item, outcome
            assert record is not None
            if spec.archive_name not in record.locations:
                self.registry.add_location(item.name, spec.archive_name)
        item = replace(item, url=self.registry.resource_url(item.name))
        seams.reached("after-register")
        return item, Outcome.ok()

    def publish(self, item: Item) -> StepResult:
        spec = self._spec(item)
        archive = self._archive(spec)
        if item.already:  # nothing to store: the stored copy is read back by verify
            self._discard_staged(spec, item)
            return item, Outcome.ok()
        try:
            return self._publish(spec, archive, item)
        except errors.StoredUnderOtherName as err:
            if self._refiled_legacy(archive, item, Path(err.stored)):
                return self._publish(spec, archive, item)
            facts = replace(
                self._facts(item, archive, None),
                registered=item.progress.registered,
                stored=(err.stored,),
                stored_sha1=self._stored_sha1(Path(err.stored)),
            )
            return self._act(item, verdicts.at_publish(facts))

    def _refiled_legacy(self, archive: layout.Archive, item: Item, stored: Path) -> bool:
        """Moves this item's own copy, published by an older nbankd under the stub of
        its stored name (``resources/a./a.json``), to where its identifier belongs;
        True if it did."""
        assert item.name and item.target_name
        legacy = archive.resources_dir / item.target_name[:2] / item.target_name
        if legacy.parent.name == item.name[:2] or stored != legacy:
            return False  # not a one-character identifier's older place, or another file
        if not item.progress.registered or not os.path.lexists(legacy):
            return False  # not this item's: only a registered item may have published
        durable.refile(archive, legacy, item.name)
        log.info("moved an older deposit where its identifier belongs", path=str(legacy))
        return True

    def _publish(self, spec: InboxSpec, archive: layout.Archive, item: Item) -> StepResult:
        target = self._target(archive, item)
        if spec.placement == "rename":
            with spec.open_fs() as fs:
                work = fs.at(fs.work, item.token)
                durable.publish_in_place(archive, work, target, sha1=item.sha1, id=item.name)
        else:
            staged = archive.staging_dir / self.staged_name(item)
            if not os.path.lexists(staged) and not os.path.lexists(target):
                return item, Outcome("restage", "restage", "the staged copy is gone")
            if os.path.lexists(staged) and not _staged_matches(item.staged_identity, staged):
                # not the copy this process journaled: never published, made again
                return item, Outcome(
                    "restage",
                    "staged-changed",
                    f"{staged} is not the staged copy nbankd wrote for "
                    f"{item.relpath_str!r}; copying again",
                )
            if spec.verify and os.path.lexists(staged) and not os.path.lexists(target):
                # read back from storage before it becomes visible in resources/: a bad
                # copy is never published, only made again
                assert item.sha1
                if not durable.verify_from_storage(staged, item.sha1, throttle=self._progress):
                    durable.discard_staged(archive, staged)
                    return item, Outcome(
                        "restage",
                        "verify-failed",
                        f"the staged copy of {item.relpath_str!r}, read back from storage, "
                        "does not match its SHA-1; copying again",
                    )
            durable.publish(archive, staged, target, sha1=item.sha1, id=item.name)
        seams.reached("after-publish")
        return item, Outcome.ok()

    def verify(self, item: Item) -> StepResult:
        spec = self._spec(item)
        if item.already:
            # the input goes once this copy is read back: gone or changed since the
            # lookup (another input's verify removed a bad one), the input is kept
            archive = self._archive(spec)
            assert item.sha1
            if not durable.verify_from_storage(
                self._target(archive, item), item.sha1, throttle=self._progress
            ):
                return replace(item, already=False), Outcome(
                    "restage",
                    "verify-failed",
                    f"the stored copy of {item.name} changed since it was found; "
                    "depositing this input again",
                )
        elif spec.verify:
            archive = self._archive(spec)
            target = self._target(archive, item)
            assert item.sha1
            if not os.path.lexists(target) and item.target_name:
                legacy = archive.resources_dir / item.target_name[:2] / item.target_name
                self._refiled_legacy(archive, item, legacy)
            if not durable.verify_from_storage(target, item.sha1, throttle=self._progress):
                if spec.placement == "rename":
                    return item, Outcome(
                        "transient", "verify-failed", f"{target} does not match its sha1"
                    )
                fsops.remove_ours(target)
                durable.fsync_dir(target.parent)
                return item, Outcome(
                    "restage", "verify-failed", f"{target} did not match its sha1; copying again"
                )
        seams.reached("after-verify")
        return item, Outcome.ok()

    def record(self, item: Item) -> StepResult:
        spec = self._spec(item)
        archive_path = spec.archive_path
        assert item.name and item.target_name
        now = self.clock()
        receipt = {
            "token": item.token,
            "source": str(spec.path / item.relpath_str),
            "inbox": spec.key,
            "id": item.name,
            "url": item.url,
            "sha1": item.sha1,
            "size": item.size,
            "dtype": item.dtype,
            "archive": spec.archive_name,
            "archive_path": str(layout.stored_file(archive_path, item.name, item.target_name)),
            "time": _iso(now),
            "outcome": "already-deposited" if item.already else "deposited",
        }
        receipts.append_receipt(self.receipts_dir, spec.key, receipt)
        seams.reached("after-receipt-append")
        return replace(item, finished=now), Outcome.ok()

    def release(self, item: Item) -> StepResult:
        spec = self._spec(item)
        with spec.open_fs() as fs:
            token = item.token.encode()
            st = fs.lstat(fs.work, token)
            if st is not None and stat.S_ISDIR(st.st_mode):
                fsops.remove_ours(fs.at(fs.work, token))  # a folder resource's tree
            else:
                fs.unlink(fs.work, token)
            seams.reached("after-release-source")
            sidecar = rejection.sidecar_work_name(item)
            if sidecar is not None:
                fs.unlink(fs.work, sidecar)
            if item.marker_relpath is not None:
                with contextlib.suppress(inboxfs.Escape, FileNotFoundError, NotADirectoryError):
                    marker = fs.parent(item.marker_relpath)  # its folder may be gone
                    if fs.unlink(*marker):
                        fsops.fsync_fd(marker[0])
            fsops.fsync_fd(fs.work)
        seams.reached("after-release-unlink")
        return replace(item, finished=item.finished or self.clock()), Outcome.ok()

    def reject(self, item: Item) -> StepResult:
        spec = self._spec(item)
        self._discard_staged(spec, item)
        with spec.open_fs() as fs:
            item = rejection.move_to_rejected(
                spec, item, fs=fs, now=self.clock(), save=self.journal.save
            )
        return replace(item, finished=self.clock()), Outcome.ok()

    def put_back(self, item: Item) -> StepResult:
        spec = self._spec(item)
        self._discard_staged(spec, item)
        with spec.open_fs() as fs:
            rejection.put_back(spec, item, fs=fs)
        return replace(item, finished=self.clock()), Outcome.ok()

    def _discard_staged(self, spec: InboxSpec, item: Item) -> None:
        try:
            archive = self._archive(spec)
        except errors.ArchiveError:  # archive gone: its staging/ is safe to clean later
            return
        durable.discard_staged(archive, archive.staging_dir / self.staged_name(item))

    # -- dispatch ----------------------------------------------------------------

    def run(self, item: Item, step: Step) -> StepResult:
        fn = {
            Step.CLAIM: self.claim,
            Step.STAGE: self.stage,
            Step.LOOKUP: self.lookup,
            Step.REGISTER: self.register,
            Step.PUBLISH: self.publish,
            Step.VERIFY: self.verify,
            Step.RECORD: self.record,
            Step.RELEASE: self.release,
            Step.REJECT: self.reject,
            Step.PUT_BACK: self.put_back,
        }[step]
        try:
            item, outcome = fn(item)
        except (errors.NbankdError, OSError) as err:
            outcome = _outcome_for(err)
        except Exception as err:  # a bug: the input waits with backoff instead of looping hot
            log.exception("unexpected error in a deposit step", item=item.token, step=str(step))
            outcome = Outcome(
                "transient",
                "internal",
                f"unexpected error in step {step}: {err!r}",
                "this is a bug in nbankd: please report it with the log; the input is kept",
            )
        if "/proc/self/fd/" in outcome.message:  # a path through an open folder: name it
            spec = self.inboxes(item.inbox)
            where = str(spec.work_dir) if spec is not None else "the work folder"
            outcome = replace(outcome, message=_PROC_FD.sub(where, outcome.message))
        return item, outcome

    def drive(
        self, item: Item, *, until_blocked: bool = True, on_step: Callable[[], None] | None = None
    ) -> Item:
        """Runs steps for ``item`` until it is final or must wait; returns the saved item.

        ``on_step`` is called before each step and while bytes move (the daemon's
        liveness heartbeat).
        """
        self._local.beat = on_step
        while True:
            now = self.clock()
            step = next_step(item.progress, now)
            if step is None:
                return item
            if on_step is not None:
                on_step()
            item, outcome = self.run(item, step)
            progress = advance(item.progress, step, outcome, self.clock())
            if progress.state is State.REJECTING and item.reason_json is None:
                item = replace(
                    item,
                    reason_json=json.dumps(
                        {"code": outcome.code, "message": outcome.message, "hint": outcome.hint}
                    ),
                )
            item = self.journal.save(replace(item.with_progress(progress), updated=self.clock()))
            if item.state is State.RECORDED:
                seams.reached("after-record")
            _log_transition(item, step, outcome)
            if not until_blocked or outcome.kind not in _KEEP_GOING:
                return item


#: outcomes after which a worker goes on with the item's next step at once
_KEEP_GOING = frozenset({"ok", "permanent", "changed", "restage", "renamed", "superseded"})


def _log_transition(item: Item, step: Step, outcome: Outcome) -> None:
    fields = {"inbox": item.inbox, "item": item.token, "resource_id": item.name, "step": str(step)}
    if outcome.kind == "ok":
        if item.state is State.DONE:
            log.info("deposited", source=item.relpath_str, url=item.url, sha1=item.sha1, **fields)
        elif item.state is State.REJECTED:
            reason = json.loads(item.reason_json or "{}")
            log.warning(
                "rejected",
                source=item.relpath_str,
                code=reason.get("code"),
                reason=reason.get("message"),
                rejected_path=reason.get("rejected_path"),
                **fields,
            )
        else:
            log.debug("step done", state=str(item.state), **fields)
    elif outcome.kind in ("transient",):
        log.warning(
            "step failed; will retry",
            code=outcome.code,
            error=outcome.message,
            attempts=item.attempts,
            retry_in=round(item.not_before - time.time(), 1),
            **fields,
        )
    else:
        log.info(
            "step outcome", outcome=outcome.kind, code=outcome.code, error=outcome.message, **fields
        )


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
