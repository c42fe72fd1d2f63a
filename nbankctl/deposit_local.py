"""``nbankctl deposit`` in this process: no daemon runs with the state directory (or
none is configured). The journal is the daemon's (its ``state_dir``, under its lock)
or the user's own (``$XDG_STATE_HOME/nbankctl``); see :mod:`nbankctl.deposit_cmds`."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from nbankctl import registry_access
from nbankctl.deposit_output import DEFAULT_WAIT, emit, report_outcomes, say
from nbankctl.report import Report
from nbankd import errors, metadata_readers
from nbankd.archive.access import require_owner
from nbankd.archive.layout import Archive
from nbankd.config.model import JOURNAL_NAME, Config, FileMetadata
from nbankd.daemon import statelock
from nbankd.deposit import manual, manual_hold, policy
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import State
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.registry.base import Registry


def user_state_dir(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/nbankctl``, or ``~/.local/state/nbankctl``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "nbankctl"


def _lock(state_dir: Path) -> statelock.StateLock:
    """The user's own journal's lock: one manual deposit after another."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return statelock.acquire(state_dir, wait=True)


def _archive_name(reg: Registry, archive: Archive) -> str:
    record = reg.find_archive_by_root(str(archive.path))
    if record is None:
        raise errors.UsageError(
            f"archive {archive.path} is not registered with {registry_access.describe(reg)}",
            hint="register it with `nbankctl init` (or check that -r names its registry)",
        )
    return record.name


def _check_dtype(reg: Registry, dtype: str | None) -> None:
    if dtype is None:
        return
    if dtype not in {d.name for d in reg.list_datatypes()}:
        raise errors.UsageError(
            f"'{dtype}' is not a registered datatype",
            hint=f"add it with `nbankctl dtype add {dtype} CONTENT-TYPE`, or pick one "
            "from `nbankctl dtype list`",
        )


def _drive_all(steps: Steps, items: list[Item], wait: float) -> list[Item]:
    """Drives every item until it ends; an item that must wait (backoff) is tried
    again until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    done: list[Item] = []
    todo = list(items)
    while todo:
        pending = []
        for item in todo:
            item = steps.drive(item)
            (done if manual.is_final(item) else pending).append(item)
        todo = pending
        if not todo:
            break
        first = min(i.not_before for i in todo)
        pause = max(0.0, first - steps.clock())
        if time.monotonic() + pause > deadline:
            done += todo
            break
        time.sleep(pause)
    return done


def _finish(args: argparse.Namespace, report: Report, items: Iterable[Item]) -> None:
    described = []
    for item in items:
        where = manual.return_rejected(item) if item.state is State.REJECTED else None
        described.append(manual.describe(item, where))
    report_outcomes(args, report, described)


def _file_metadata(
    dtype: str, path: Path, given: dict[str, Any], mode: FileMetadata
) -> dict[str, Any]:
    """The metadata a deposit of the file at ``path`` would register: ``given``, and
    under ``mode`` ``read`` or ``override`` the datatype's reader's (run as the deposit
    runs it: in a child process with the same time and memory limits, seeing the
    file under its own name), merged by the deposit's rule. Raises the error the
    deposit would end with (the reader rejects the file, or cannot run; the given
    metadata contradicts the file's).

    The file is the user's own, its only copy: a reader that cannot be confined
    (:func:`~nbankd.metadata_readers.reader_confinement`) is not run on it, and the
    file is not judged (the deposit itself has such a reader read its copy)."""
    if mode not in ("read", "override"):
        return given
    why = metadata_readers.reader_confinement()
    if why is not None and metadata_readers.find_reader(dtype) is not None:
        raise metadata_readers.MetadataReaderUnavailable(
            f"its {dtype} metadata reader cannot be confined here ({why}), and a dry run "
            "never hands an unconfined reader the file itself",
            hint="deposit it without -y (the deposit copies the file and has the reader "
            "read the copy), or with --no-file-metadata",
        )
    try:
        result = metadata_readers.read_file_metadata(dtype, path, name=path.name, only_copy=True)
    except OSError as err:
        raise errors.NbankdError(f"cannot be read: {err.strerror or err}") from None
    problem = result.error()
    if problem is not None:
        raise problem
    if result.status != "read":
        return given  # no reader for this datatype
    return metadata_readers.merge_metadata(given, result.metadata, mode, source=repr(path.name))


def _dry_run(
    args: argparse.Namespace,
    report: Report,
    reg: Registry,
    spec: InboxSpec,
    archive: Archive,
    paths: list[Path],
) -> None:
    """Judges each input as the deposit would, changing nothing: its identifier (and
    whether the registry has it), and its metadata with the datatype's reader's.

    As ``nbank deposit -y``, a folder (``--zip-directories``) is not zipped, so not
    read: its record says ``"zipped": true`` and the given metadata."""
    rules = spec.rules(
        auto_identifiers=archive.policy.auto_identifiers,
        auto_id_type=archive.policy.auto_id_type,
        keep_extensions=archive.policy.keep_extensions,
        allow_directories=archive.policy.allow_directories,
    )
    for path in paths:
        zipped = os.path.isdir(path)  # a folder gets here only with --zip-directories
        try:
            # a folder deposited as its zip is named as a file is (as the claim does)
            plan = policy.plan(path.name, rules, policy.Sidecar(), token=os.urandom(16))
            if not plan.auto and reg.get_resource(plan.name) is not None:
                raise policy.PolicyError("name-taken", f"'{plan.name}' is already registered")
            metadata = plan.metadata
            if not zipped:
                metadata = _file_metadata(plan.dtype, path, metadata, spec.config.file_metadata)
        except errors.NbankdError as err:
            say(args, f"{path}: would not be deposited: {err}")
            emit(args, {"source": str(path), "error": err.message})
            report.failed()
            continue
        shown = "(automatic id)" if plan.auto else plan.name
        say(args, f"{path}: OK as {shown}{' (zipped)' if zipped else ''} (dry run)")
        record: dict[str, Any] = {
            "source": str(path),
            "id": None if plan.auto else plan.name,
            "dry_run": True,
            "metadata": metadata,
        }
        if zipped:
            record["zipped"] = True  # as nbank's dry run says of a folder
        emit(args, record)


def by_hand(
    args: argparse.Namespace,
    report: Report,
    config: Config | None,
    archive: Archive,
    by_folder: dict[Path, list[str]],
    metadata: dict[str, Any],
    mode: str,
    lock: statelock.StateLock | None,
) -> None:
    """The deposit in this process (no daemon runs with this state directory)."""
    if config is not None:
        state_dir = config.state_dir
        choice = registry_access.Choice(config.registry, f"configuration {config.source}", config)
        reg = registry_access.open_chosen(choice, args)
    else:
        state_dir = user_state_dir()
        reg = registry_access.open_registry(args, fallback_url=archive.registry_url)
    try:
        name = _archive_name(reg, archive)
        _check_dtype(reg, args.dtype)

        def inbox_of(folder: Path) -> manual.ManualInbox:
            return manual.ManualInbox(
                folder=folder,
                archive=name,
                archive_path=archive.path,
                registry=reg.url,
                dtype=args.dtype,
                metadata=metadata,
                auto_id=True if args.auto_id else None,
                zip_directories=args.zip_directories,
                file_metadata=cast(FileMetadata, mode),
            )

        if args.dry_run:
            for folder, names in by_folder.items():
                paths = [folder / n for n in names]
                _dry_run(args, report, reg, inbox_of(folder).spec(), archive, paths)
            return
        require_owner(archive, "a deposit")
        if lock is None:
            lock = _lock(state_dir)
            try:
                _run(args, report, reg, state_dir, by_folder, inbox_of)
            finally:
                lock.release()
        else:
            _run(args, report, reg, state_dir, by_folder, inbox_of)
    finally:
        reg.close()


def _run(
    args: argparse.Namespace,
    report: Report,
    reg: Registry,
    state_dir: Path,
    by_folder: dict[Path, list[str]],
    inbox_of: Any,
) -> None:
    """Finishes what an interrupted deposit left, then deposits ``by_folder``."""
    journal = Journal(state_dir / JOURNAL_NAME)
    holds = manual_hold.Holds()  # every work folder used, held until the items end
    try:
        specs: dict[str, InboxSpec] = {}

        def lookup(key: str) -> InboxSpec | None:
            return specs.get(key) or manual.spec_for_key(key)

        steps = Steps(
            journal=journal, registry=reg, inboxes=lookup, receipts_dir=state_dir / "receipts"
        )
        left = manual.unfinished(journal)
        ours = [i for i in left if manual.registry_of(i) == reg.url]
        for item in left:
            if item not in ours:
                say(
                    args,
                    f"note: an earlier deposit of {item.relpath_str!r} waits for registry "
                    f"{manual.registry_of(item)}; run a deposit with -r that URL to finish it",
                )
        held = [i for i in manual.held_rejections(journal) if manual.registry_of(i) == reg.url]
        if ours or held:
            say(args, f"finishing {len(ours) + len(held)} file(s) an interrupted deposit left")
        items = list(ours) + held
        for key in {i.inbox for i in items}:
            # an earlier run's input: its folder's work and rejected folders are made
            # again once (that run's tidy removed them when empty: a refusal needs them)
            left_in = holds.spec_for_key(key)
            if left_in is not None:
                specs[key] = left_in
                manual.calibrate(left_in)  # this run has not asked about its filesystem yet
        for folder, names in by_folder.items():
            inbox = inbox_of(folder)
            specs[inbox.key] = holds.prepare(inbox)
            manual.calibrate(specs[inbox.key])  # before its files are asked about
            dirs = [n for n in names if os.path.isdir(folder / n)]
            files = [n for n in names if n not in dirs]
            for kind, group in (("file", files), ("dir", dirs)):
                if group:
                    new, refused = manual.journal_files(
                        journal, inbox, group, kind=kind, now=steps.clock()
                    )
                    items += new
                    for name, why in refused:
                        say(args, f"{folder / name}: not deposited: {why}")
                        emit(args, {"source": str(folder / name), "error": why})
                        report.failed()
        wait = DEFAULT_WAIT if args.wait is None else args.wait
        _finish(args, report, _drive_all(steps, items, wait))
        holds.release()  # the last run to let a folder go removes it (another's waits)
        for folder in {m.folder for i in items if (m := manual.ManualInbox.from_key(i.inbox))}:
            manual_hold.tidy(folder)  # the work and rejected folders, once empty
    finally:
        holds.release()
        journal.close()


__all__ = ["JOURNAL_NAME", "by_hand", "user_state_dir"]
