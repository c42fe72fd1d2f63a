"""``nbankctl deposit ARCHIVE FILE...``: nbank's deposit, through the daemon's steps.

Options as ``nbank deposit`` 0.13 spells them. Each file is journaled, claimed into
a work folder beside it, staged, registered, published without replacing anything,
read back and verified, and receipted (:mod:`nbankd.deposit.manual`); the file leaves
its folder only once it is safely in the archive. A file the deposit refuses
(duplicate bytes, a taken name, an invalid name, the registry's 400) stays where it
was, and its reason is reported.

Where the journal lives:

- used like nbank (``-r URL``, ``$NBANK_REGISTRY``, or the archive's own registry),
  under ``$XDG_STATE_HOME/nbankctl`` (``~/.local/state/nbankctl``);
- with a daemon configuration (``-c FILE`` or ``$NBANKD_CONFIG``) whose daemon runs,
  nowhere here: the files are handed to the daemon over its control socket (admins
  only) and the command waits for their end (:mod:`nbankd.control.deposit_handlers`);
- with that daemon stopped, in its ``state_dir``, under its lock (another deposit
  holding it is waited for), and the command must run as the archive's
  ``access.user``. An item left unfinished there is finished by the daemon's start as
  well as by the next deposit.

Files of an archive, of a state directory, of nbankd's work or rejected folders or
of the daemon's inboxes are refused (:func:`nbankd.deposit.manual.place_refusal`),
as are links, hard-linked files and files still open for writing.

A dry run (``-y``) is judged in this process whether a daemon runs or not, and
changes nothing (no lock, no journal, no claim, no registry write): each file's
identifier, whether the registry has it, and its metadata with the datatype's reader
run as a deposit runs it (:func:`nbankd.metadata_readers.read_file_metadata`, the
same time and memory limits, confined; where it cannot be confined it is not run on
the user's file, and the file is not judged); a folder (``--zip-directories``) is not zipped, so
not read, as ``nbank deposit -y`` does. It prints nbank's dry-run records.

Every run first finishes what an interrupted run left. A step that fails for a
while (registry unreachable) is retried with the daemon's backoff for ``--wait``
seconds; what is still unfinished then is named, with where its file is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from nbankctl.deposit_local import by_hand
from nbankctl.deposit_output import DEFAULT_WAIT, emit, report_outcomes, say
from nbankctl.registry_access import daemon_config
from nbankctl.registry_cmds import KeyValue, metadata_given, require_utf8
from nbankctl.report import Report
from nbankd import errors
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.config.model import Config
from nbankd.daemon import statelock
from nbankd.deposit import manual
from nbankd.filekind import FileKind
from nbankd.names import WORK_DIR_NAME

# --- where and as whom ---------------------------------------------------------------


# --- inputs --------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> list[Path]:
    files = list(args.file)
    if args.read_stdin:
        files += [Path(line.strip()) for line in sys.stdin if line.strip()]
    return [Path(os.path.abspath(f)) for f in files]


def _refusal(path: Path, zip_directories: bool) -> str | None:
    """Why ``path`` cannot be deposited as given (its kind), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    kind = FileKind.of(st)
    if kind is FileKind.SYMLINK:
        return "is a symbolic link; deposit the file it points to"
    if kind is FileKind.DIRECTORY:
        if zip_directories:
            return None
        return "is a directory; zip it first, or deposit with --zip-directories"
    if kind is FileKind.HARDLINK:
        return (
            "has another hard link (a backup?), through which the stored copy could be "
            "changed; deposit a copy of it"
        )
    if kind is not FileKind.FILE:
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def _forbidden_places(archive: Archive, config: Config | None) -> dict[str, list[Path]]:
    """The places no file is ever deposited from (see manual.place_refusal)."""
    from nbankctl.deposit_local import user_state_dir

    places: dict[str, list[Path]] = {
        "archives": [archive.path],
        "state_dirs": [user_state_dir()],
        "inboxes": [],
    }
    if config is not None:
        places["archives"] += [a.path for a in config.archives]
        places["state_dirs"].append(config.state_dir)
        places["inboxes"] += [i.path for i in config.inboxes]
    return places


# --- the run -------------------------------------------------------------------------


def cmd_deposit(args: argparse.Namespace, report: Report) -> None:
    from nbankd.service.logs import configure_logging

    # the steps' own log, on stderr, for what this command does not say itself
    configure_logging("console", "error", stream=sys.stderr)
    require_utf8(  # before anything is read, registered, moved or handed to the daemon
        [
            *metadata_given("-k", args.metadata or {}),
            ("-d", args.dtype),
            ("--experimenter", args.experimenter),
            ("--animal", args.animal),
        ]
    )
    archive = open_archive(args.directory)
    config = daemon_config(args)
    metadata = dict(args.metadata or {})
    for key in ("experimenter", "animal"):
        if getattr(args, key):
            metadata[key] = getattr(args, key)
    mode = "skip" if not args.read_metadata else "read"
    if args.override_file_metadata:
        mode = "override"
    by_folder: dict[Path, list[str]] = {}
    places = _forbidden_places(archive, config)
    seen: dict[tuple[int, int], Path] = {}
    for path in _inputs(args):
        if path.name in (WORK_DIR_NAME, manual.REJECTED_DIR):
            say(args, f"{path}: skipped (nbankd's own folder)")
            continue
        refused = _refusal(path, args.zip_directories) or manual.place_refusal(path, **places)
        if refused is not None:
            say(args, f"{path}: not deposited: {refused}")
            emit(args, {"source": str(path), "error": refused})
            report.failed()
            continue
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) in seen:
            say(args, f"{path}: skipped (the same file as {seen[st.st_dev, st.st_ino]})")
            continue
        seen[st.st_dev, st.st_ino] = path
        by_folder.setdefault(path.parent, []).append(path.name)
    lock = None
    if config is not None and not args.dry_run:  # a dry run takes no lock and hands nothing
        try:
            lock = statelock.acquire(config.state_dir)
        except statelock.StateDirInUse:  # the daemon runs: it does the work
            try:
                _via_daemon(args, report, archive, by_folder, metadata, mode)
                return
            except _NoDaemon:  # the lock's holder is another nbankctl deposit: wait
                say(args, f"another deposit holds {config.state_dir}; waiting for it")
                lock = statelock.acquire(config.state_dir, wait=True)
        except errors.ConfigError as err:  # not the daemon's user: only the daemon can
            try:
                _via_daemon(args, report, archive, by_folder, metadata, mode)
            except _NoDaemon:
                raise errors.UsageError(
                    f"nbankd is not running and {err.message}",
                    hint="start nbankd to hand it the files, or run the deposit as its user",
                ) from None
            return
    try:
        by_hand(args, report, config, archive, by_folder, metadata, mode, lock)
    finally:
        if lock is not None:
            lock.release()


class _NoDaemon(Exception):
    """No daemon answered before any file was handed to it."""


#: paths per deposit request to the daemon (a request line is at most 64 KiB)
BATCH = 100


def _not_held(args: argparse.Namespace, report: Report, paths: list[Path]) -> list[str]:
    """The paths no process of this user holds open for writing (a file, or a file of a
    folder), as ``/proc`` shows: the daemon, another user, cannot see this user's
    processes. The others are refused here, named."""
    from nbankd.watch import fdinfo

    seen = fdinfo.open_for_writing()
    kept = []
    for path in paths:
        if not seen.held(path):
            kept.append(str(path))
            continue
        what = "is" if not path.is_dir() else "holds a file"
        why = (
            f"{what} still open for writing (a recording in progress?); deposit it once "
            "it is closed"
        )
        say(args, f"{path}: not deposited: {why}")
        emit(args, {"source": str(path), "error": why})
        report.failed()
    return kept


def _via_daemon(
    args: argparse.Namespace,
    report: Report,
    archive: Archive,
    by_folder: dict[Path, list[str]],
    metadata: dict[str, Any],
    mode: str,
) -> None:
    """Hands the files to the running daemon (admins only) and waits for their end."""
    from nbankctl.daemon_cmds import client

    daemon = client(args, "deposit")
    files = _not_held(
        args, report, [folder / n for folder, names in by_folder.items() for n in names]
    )
    if not files:
        return
    say(args, f"nbankd is running: handing {len(files)} file(s) to it")
    ids: list[int] = []
    for start in range(0, len(files), BATCH):
        request = {
            "archive": str(archive.path),
            "files": files[start : start + BATCH],
            "dtype": args.dtype,
            "metadata": metadata,
            "auto_id": bool(args.auto_id),
            "zip_directories": bool(args.zip_directories),
            "file_metadata": mode,
        }
        try:
            answer = daemon.call("deposit", request)
        except errors.DaemonUnreachable:
            if not ids and start == 0:
                raise _NoDaemon from None  # nothing handed over: the caller decides
            raise
        ids += answer["items"]
        for record in answer.get("refused", []):
            say(args, f"{record['source']}: not deposited: {record['error']}")
            emit(args, record)
            report.failed()
    if not ids:
        return
    wait = DEFAULT_WAIT if args.wait is None else args.wait
    began = time.monotonic()
    poll = min(10.0, daemon.timeout / 2)
    try:
        while True:
            state = daemon.call("deposit-status", {"items": ids, "wait": poll})
            if state["done"]:
                break
            stuck = all(d["code"] for d in state["items"] if d["pending"])
            if stuck and time.monotonic() - began >= wait:
                break  # every unfinished one waits after an error: the daemon keeps trying
    except errors.DaemonUnreachable:
        for f in files:
            say(args, f"{f}: handed to nbankd, which stopped before it was deposited")
        say(args, "nbankd's next start finishes them (`nbankctl status`, `nbankctl history`)")
        raise
    report_outcomes(args, report, state["items"])


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "deposit",
        parents=[common],
        help="deposit files into an archive (as nbank deposit), journaled and verified",
        description="Deposit files into a neurobank archive, as nbank deposit does, through "
        "nbankd's journaled and verified steps (or by the running nbankd itself).",
    )
    p.add_argument("directory", type=Path, metavar="ARCHIVE", help="path of the archive")
    p.add_argument("file", nargs="*", type=Path, help="files to deposit")
    p.add_argument("-d", "--dtype", help="the datatype of the deposited resources")
    p.add_argument(
        "-H", "--hash", action="store_true", help="accepted for nbank; every file is hashed"
    )
    p.add_argument(
        "-A", "--auto-id", action="store_true", help="give each file an automatic identifier"
    )
    p.add_argument(
        "-y", "--dry-run", action="store_true", help="check everything; register and move nothing"
    )
    p.add_argument(
        "-k",
        dest="metadata",
        action=KeyValue,
        default={},
        metavar="KEY=VALUE",
        help="a metadata field (VALUE read as JSON when it parses, True/False/None as "
        "nbank reads them; a VALUE starting with [ or { must parse); repeat for more",
    )
    p.add_argument("-j", "--json-out", action="store_true", help="one JSON line per file on stdout")
    p.add_argument("--experimenter", metavar="USER", help="the resources' experimenter")
    p.add_argument("--animal", metavar="ID", help="the resources' animal")
    p.add_argument(
        "-@", dest="read_stdin", action="store_true", help="read more file names from stdin"
    )
    p.add_argument(
        "--zip-directories",
        action="store_true",
        help="deposit each folder as its canonical zip (the folder is removed once deposited)",
    )
    p.add_argument(
        "--no-file-metadata",
        dest="read_metadata",
        action="store_false",
        help="do not run the datatype's metadata reader on the files",
    )
    p.add_argument(
        "--override-file-metadata",
        action="store_true",
        help="where given metadata differs from a file's, register the given values",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to retry a step that fails for a while (default {DEFAULT_WAIT:g})",
    )
    p.set_defaults(func=cmd_deposit, more_positionals="file")


__all__ = ["cmd_deposit", "register"]
