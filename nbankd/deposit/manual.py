"""Manual deposits (``nbankctl deposit``) through the daemon's own steps.

A manual deposit takes files a person names instead of files found in an inbox, and
then does exactly what the daemon does: it journals an intent for each file, claims it
into a work folder beside it (``.nbank/``, on the same filesystem, so the claim is a
rename), stages, registers, publishes without replacing, verifies and records a
receipt, every step in the journal, so an interrupted deposit is finished by the next
run (or, with a daemon configuration, by the daemon's start).

The folder holding the files plays the inbox. Its options (archive, datatype,
metadata, automatic identifiers) are the journaled intent: they are written into the
item's inbox key itself (:meth:`ManualInbox.key`), so whoever resumes an item
rebuilds the very same inbox from the journal alone and never from a command line or
configuration read later.

Unlike an inbox, a rejected file goes back where it was (as ``nbank deposit`` leaves
it), with the reason reported: :func:`return_rejected`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nbankd import errors, metadata_readers
from nbankd.archive import opening
from nbankd.archive.fsops import move_noreplace_at
from nbankd.archive.probe import place_across
from nbankd.config.model import ArchiveConfig, FileMetadata, InboxConfig
from nbankd.deposit import inboxfs
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import FINAL, State
from nbankd.deposit.rejection import reason_name
from nbankd.deposit.spec import InboxSpec
from nbankd.names import MANUAL_INBOX_PREFIX, PROBE_PREFIX, WORK_DIR_NAME
from nbankd.watch import fdinfo, writers

#: how a manual deposit's inbox key starts (the rest is its options as JSON)
PREFIX = MANUAL_INBOX_PREFIX
#: where a rejected input waits, in its own folder, until it is put back in place
REJECTED_DIR = "nbank-rejected"


def _frozen(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class ManualInbox:
    """The folder of some files a person deposits, with the options they gave."""

    folder: Path
    archive: str
    archive_path: Path
    registry: str  # the registry's URL: an item is only ever finished against it
    dtype: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    auto_id: bool | None = None  # None: the archive's policy decides
    zip_directories: bool = False  # a folder is deposited as its canonical zip
    file_metadata: FileMetadata = "read"  # the datatype's metadata reader

    @property
    def key(self) -> str:
        """The journal's inbox key: every option, so the key alone rebuilds the inbox."""
        options = {
            "folder": str(self.folder),
            "archive": self.archive,
            "archive_path": str(self.archive_path),
            "registry": self.registry,
            "dtype": self.dtype,
            "metadata": dict(self.metadata),
            "auto_id": self.auto_id,
            "zip_directories": self.zip_directories,
            "file_metadata": self.file_metadata,
        }
        return PREFIX + json.dumps(options, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> ManualInbox | None:
        """The manual inbox a journal key names; None for a daemon inbox's key."""
        if not key.startswith(PREFIX):
            return None
        try:
            o = json.loads(key[len(PREFIX) :])
            return cls(
                folder=Path(o["folder"]),
                archive=str(o["archive"]),
                archive_path=Path(o["archive_path"]),
                registry=str(o["registry"]),
                dtype=o.get("dtype"),
                metadata=_frozen(o.get("metadata")),
                auto_id=o.get("auto_id"),
                zip_directories=bool(o.get("zip_directories", False)),
                file_metadata=o.get("file_metadata", "read"),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def config(self) -> InboxConfig:
        return InboxConfig(
            path=self.folder,
            archive=self.archive,
            dtype=self.dtype,
            metadata=_frozen(self.metadata),
            auto_id=self.auto_id,
            directories="zip" if self.zip_directories else "files",
            file_metadata=self.file_metadata,
            recursive=False,
            rejected_dir=REJECTED_DIR,
        )

    def spec(self, *, prepare: bool = False) -> InboxSpec:
        """The inbox the steps see; ``prepare`` makes its work and rejected folders
        first (a new deposit), checking they are real folders on the same filesystem."""
        ids: tuple[Any, Any] = (None, None)
        if prepare:
            ids = inboxfs.prepare_folders(self.folder, work=WORK_DIR_NAME, rejected=REJECTED_DIR)
        return InboxSpec.of(
            self.config(),
            ArchiveConfig(name=self.archive, path=self.archive_path),
            work_id=ids[0],
            rejected_id=ids[1],
        )


def spec_for_key(key: str) -> InboxSpec | None:
    """The inbox of a manual deposit's item (the daemon finishes those it finds), its
    work and rejected folders made again where missing: the run that claimed the item
    removed them once empty, and a refusal needs the rejected one. Where they cannot
    be made, the inbox as it is (its steps then say what is wrong with the folder)."""
    inbox = ManualInbox.from_key(key)
    if inbox is None:
        return None
    if all(os.path.isdir(inbox.folder / name) for name in (WORK_DIR_NAME, REJECTED_DIR)):
        return inbox.spec()  # both there (every step of every item): nothing to make
    try:
        return inbox.spec(prepare=True)
    except (OSError, errors.NbankdError):
        return inbox.spec()


def placement_for(folder: Path, archive_path: Path) -> str:
    """``rename`` when a file of ``folder`` can be moved into the archive in place (a
    deposit then moves bytes as ``nbank deposit`` does), else ``copy``.

    One device number does not prove it: a folder reached through a bind mount of a
    folder on the archive's filesystem shares the archive's, yet link() and rename()
    into the archive fail with EXDEV, so its files would be registered and never
    published. A file made in the folder's work folder (the folder itself where it
    has none) is placed into the archive's ``staging/`` as a publish in place would
    place it, and both names are removed
    (:func:`~nbankd.archive.probe.place_across`): ``copy`` unless that works, and
    whenever it cannot be tried (copying is always safe)."""
    name = f"{PROBE_PREFIX}placement-{secrets.token_hex(8)}"
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    opened: list[int] = []
    try:
        staging = opening.ensure_staging(opening.open_archive(archive_path))
        source = os.open(folder, flags)
        opened.append(source)
        with contextlib.suppress(OSError):  # else the folder itself, on the same mount
            source = os.open(WORK_DIR_NAME, flags | os.O_NOFOLLOW, dir_fd=source)
            opened.append(source)
        into = os.open(staging, flags)
        opened.append(into)
        failed = place_across(source, into, name)
    except (OSError, errors.NbankdError):
        return "copy"
    finally:
        for fd in opened:
            os.close(fd)
    return "rename" if failed is None else "copy"


def unconfined_reader(inbox: ManualInbox) -> bool:
    """True when a metadata reader may run on ``inbox``'s files and cannot be confined
    here (:func:`~nbankd.metadata_readers.reader_confinement`): its files are then
    copied, never moved, so the reader never reads a person's only copy."""
    if inbox.file_metadata == "skip" or metadata_readers.reader_confinement() is None:
        return False
    if inbox.dtype is None:
        return True  # each file's datatype is decided later: any may have a reader
    try:
        return metadata_readers.find_reader(inbox.dtype) is not None
    except metadata_readers.MetadataReaderUnavailable:
        return True


def journal_files(
    journal: Journal,
    inbox: ManualInbox,
    names: Sequence[str],
    *,
    kind: str,
    now: float,
    checked: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Journals the intent to deposit each of ``names`` (in ``inbox.folder``) in one
    durable transaction; ``kind`` is ``file`` or ``dir``. Returns the items, and the
    names refused with why: gone since they were named (another deposit took them),
    another entry than the one ``checked`` names for it (the (device, inode) an
    admin's rights were checked on: a folder on its path was swapped since), or a file
    some process still has open for writing (its bytes could change under the stored
    copy). The claim then takes only the entry journaled here."""
    # proved once (a file linked into the archive), and only once a file could move;
    # never where a metadata reader would run unconfined on the file moved
    same_fs = functools.cache(
        lambda: (
            not unconfined_reader(inbox)
            and placement_for(inbox.folder, inbox.archive_path) == "rename"
        )
    )
    seen = functools.cache(fdinfo.open_for_writing)  # read from /proc once, if needed
    rows, refused = [], []
    for name in names:
        path = inbox.folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            refused.append((name, "no longer exists (another deposit may have taken it)"))
            continue
        if checked is not None and name in checked and checked[name] != (st.st_dev, st.st_ino):
            refused.append(
                (
                    name,
                    f"{path} is no longer the entry nbankd checked the asking admin's rights "
                    "on (it or a folder on its path was replaced meanwhile); left where it "
                    "is: hand it over again",
                )
            )
            continue
        placement = "copy"
        if kind == "dir" and seen().held(path):  # its files, as /proc shows them
            refused.append(
                (
                    name,
                    "holds a file still open for writing (a recording in progress?); "
                    "deposit it once it is closed",
                )
            )
            continue
        if kind == "file":
            open_for_writing = writers_gone(path, seen)
            if open_for_writing is False:
                refused.append(
                    (
                        name,
                        "is still open for writing (a recording in progress?); deposit it "
                        "once it is closed",
                    )
                )
                continue
            # moved in place only when no writer can change the bytes afterwards
            if open_for_writing and same_fs():
                placement = "rename"
        rows.append(
            {
                "token": secrets.token_hex(16),
                "inbox": inbox.key,
                "relpath": os.fsencode(name),
                "kind": kind,
                "archive": inbox.archive,
                "archive_path": str(inbox.archive_path),
                "placement": placement,
                "verify": 1,
                "seen_identity": json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
                "created": now,
                "updated": now,
            }
        )
    return (journal.add_many(rows) if rows else []), refused


def unfinished(journal: Journal) -> list[Item]:
    """Every manual deposit's item that has not reached its end, oldest first."""
    return [i for i in journal.unfinished() if i.inbox.startswith(PREFIX)]


def registry_of(item: Item) -> str | None:
    """The registry a manual deposit's item was journaled for."""
    inbox = ManualInbox.from_key(item.inbox)
    return inbox.registry if inbox is not None else None


def return_rejected(item: Item) -> Path:
    """Puts a rejected input back where it was and removes its reason file; returns
    where the input is now: still in the rejected folder if its place was taken, if its
    folder refuses the move, or if what is there is not the input that was rejected
    (never an error: the caller reports where it is).

    Every folder is opened without following a link, and the held file must be the
    very file the claim took (its device and inode): a rejected folder swapped for a
    link never moves anything else.
    """
    inbox = ManualInbox.from_key(item.inbox)
    if inbox is None or item.state is not State.REJECTED or item.rejected_relpath is None:
        raise ValueError(f"item {item.token} is not a rejected manual deposit")
    name = os.path.basename(item.rejected_relpath)
    held = inbox.folder / REJECTED_DIR / os.fsdecode(item.rejected_relpath)
    place = inbox.folder / item.relpath_str
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(inbox.folder, flags)
    except OSError:
        return held
    try:
        rejected = os.open(REJECTED_DIR, flags, dir_fd=root)
    except OSError:
        os.close(root)
        return held
    try:
        try:
            st = os.stat(name, dir_fd=rejected, follow_symlinks=False)
        except FileNotFoundError:
            return place if os.path.lexists(place) else held
        claimed = json.loads(item.identity) if item.identity else None
        if claimed is None or (st.st_dev, st.st_ino) != (claimed["dev"], claimed["ino"]):
            return held  # not the input this item rejected: never moved
        try:
            move_noreplace_at(rejected, name, root, os.fsencode(os.path.basename(item.relpath)))
        except FileExistsError:
            return held  # something took its name meanwhile: it stays with its reason
        except FileNotFoundError:  # handed back meanwhile (a worker and a status request)
            return place if os.path.lexists(place) else held
        except OSError:  # refused (a read-only or immutable folder), or an fsync failed
            return held if os.path.lexists(held) else place
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reason_name(name), dir_fd=rejected)
        return place
    finally:
        os.close(rejected)
        os.close(root)


def held_rejections(journal: Journal) -> list[Item]:
    """Rejected manual inputs still held in their rejected folder (a run or the daemon
    stopped before handing them back): each is handed back by the next run or start."""
    out = []
    for item in journal.in_state(State.REJECTED, inbox_prefix=PREFIX):
        inbox = ManualInbox.from_key(item.inbox)
        if inbox is not None and item.rejected_relpath is not None:
            held = inbox.folder / REJECTED_DIR / os.fsdecode(item.rejected_relpath)
            if os.path.lexists(held):
                out.append(item)
    return out


def place_refusal(
    path: Path,
    *,
    archives: Iterable[Path] = (),
    state_dirs: Iterable[Path] = (),
    inboxes: Iterable[Path] = (),
) -> str | None:
    """Why the file at ``path`` must never be deposited by hand, or None: a file of an
    archive (stored already, or being staged), of nbankd's state directory (its
    journal, its registry), held in a work or rejected folder, or in an inbox the
    daemon deposits from by itself."""
    if any(part in (WORK_DIR_NAME, REJECTED_DIR) for part in path.parts):
        return (
            "is held by nbankd (in a work or rejected folder); `nbankctl deposit ARCHIVE` "
            "finishes what it holds"
        )
    real = Path(os.path.realpath(path.parent)) / path.name

    def inside(root: Path) -> bool:
        top = Path(os.path.realpath(root))
        return top == real or top in real.parents

    for archive in archives:
        if inside(archive):
            return f"is inside the archive {archive}: it is stored there already"
    for state in state_dirs:
        if inside(state):
            return f"is inside nbankd's state directory {state}: nbankd's own files stay"
    for inbox in inboxes:
        if inside(inbox):
            return f"is in nbankd's inbox {inbox}: the daemon deposits it by itself"
    return None


def calibrate(spec: InboxSpec) -> None:
    """Asks the kernel about a file this process makes (a fresh name, ``O_EXCL``, mode
    0600) in the inbox's work folder (checked against its identity when the spec was
    prepared; else only as a private folder on the inbox's filesystem, never through a
    link) and removes at once: on a filesystem that says "open
    for writing" of every file (NFSv4 without a read delegation, CIFS without an
    oplock), answers about files there then count as "cannot tell"
    (:func:`nbankd.watch.writers.calibrate`) instead of refusing every file as still
    being written. Call it once the spec is prepared, before journaling or finishing
    its items. Nothing is asked where the work folder cannot be used or written."""
    name = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    # made read-only: a writable descriptor, inherited by a child forked meanwhile,
    # would make the probe itself read "open for writing"
    flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        with spec.open_fs() as fs:
            work = fs.work
            os.close(os.open(name, flags, 0o600, dir_fd=work))
            try:
                writers.calibrate(work, name.encode())
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=work)
    except (OSError, errors.NbankdError):
        return


def writers_gone(path: Path, seen: Callable[[], fdinfo.Writers] | None = None) -> bool | None:
    """Whether no process has ``path`` open for writing (asked as
    :func:`nbankd.watch.writers.open_for_writing` asks). Where that cannot tell, the
    files ``seen`` open for writing in ``/proc`` (:func:`nbankd.watch.fdinfo.open_for_writing`)
    still make it False. None when it cannot tell (not the file's owner and no
    CAP_LEASE, a filesystem without leases or refusing them all) and nothing was seen."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        answer = writers.open_for_writing(fd)
        if answer is None and seen is not None:
            answer = True if seen().holds(fd) else None
    finally:
        os.close(fd)
    return None if answer is None else not answer


def is_final(item: Item) -> bool:
    return item.state in FINAL


def record(item: Item) -> dict[str, Any]:
    """What ``nbank deposit -j`` prints for the item: ``{"source", "id"}`` once it is
    deposited (and ``"already": true`` when the archive and registry held it before,
    ``"zipped": true`` for a folder deposited as its zip; ``"note"``
    when a writer changed the file after its record and it went back in place),
    ``{"source", "error"}`` otherwise (with ``state`` while unfinished)."""
    inbox = ManualInbox.from_key(item.inbox)
    folder = inbox.folder if inbox is not None else Path(".")
    source = str(folder / item.relpath_str)
    if item.state is State.DONE or (item.state is State.RETURNED and item.progress.registered):
        done: dict[str, Any] = {"source": source, "id": item.name}
        if item.already:  # its bytes were stored and registered under this id before
            done["already"] = True
        if item.zipped:
            done["zipped"] = True
        if item.state is State.RETURNED:  # recorded, then a writer changed the file
            done["note"] = (
                "it changed after it was deposited: the archive keeps the version deposited, "
                "and the changed file is back in place"
            )
        return done
    if item.state is State.REJECTED:
        reason = json.loads(item.reason_json or "{}")
        return {"source": source, "error": reason.get("message") or item.error_message or ""}
    if item.state in FINAL:
        return {
            "source": source,
            "error": item.error_message or "it changed or vanished while it was deposited",
        }
    out = {
        "source": source,
        "error": item.error_message or f"unfinished ({item.state})",
        "state": str(item.state),
    }
    if item.error_hint:
        out["hint"] = item.error_hint
    return out


def describe(item: Item, where: Path | None = None) -> dict[str, Any]:
    """The item as ``nbankctl deposit`` reports it: its :func:`record`, state, URL and
    error code, and where its input is (``where``: back in place, or held)."""
    inbox = ManualInbox.from_key(item.inbox)
    held = None
    if item.state not in FINAL and inbox is not None:
        claimed = inbox.folder / WORK_DIR_NAME / item.token
        held = str(claimed) if os.path.lexists(claimed) else None
    return {
        "pending": item.state not in FINAL,
        "record": record(item),
        "state": str(item.state),
        "url": item.url,
        "code": item.error_code,
        "held": held,
        "where": str(where) if where is not None else None,
    }
