"""``nbankctl tape register | prune | import``: the tape workflow (logic in nbankd.tape*).

``register`` hashes every member before it records a location
(:mod:`nbankd.tape_register`); ``prune`` trusts a tape copy only with the key
``register`` gives it, and a resource without a SHA-1 only with ``--unverified``;
``import`` takes identifiers (arguments and/or ``-f FILE``) to import only those.
Each writes one line per member or resource and a summary to standard error, as
nbank's log does (with ``--json``: JSON lines on standard output, and nothing else
there), shows a tqdm progress bar on a terminal only, and exits 1 when anything
failed or was refused.

``import`` (and ``nbankctl copy``) into an archive of a daemon configuration
(``-c FILE`` or ``$NBANKD_CONFIG``) follow ``nbankctl deposit``'s rules
(:func:`where_to_run`): while that daemon runs, the work is handed to it over its
control socket (admins only; the tar must then be a file it can read, not stdin)
and the command prints what the daemon reports; while it is stopped, the command
holds the state directory's lock (waiting for another holder) and must run as the
archive's ``access.user``. Without a daemon configuration nothing changes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from nbankctl.registry_access import daemon_config, describe
from nbankctl.registry_cmds import registry_for
from nbankctl.report import Report
from nbankd import errors, tape, tape_import, tape_prune, tape_register
from nbankd.archive.access import require_owner
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.control.client import ControlClient, ControlError
from nbankd.daemon import statelock
from nbankd.names import lines_without_controls, printable, without_controls

if TYPE_CHECKING:
    pass

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def size(text: str) -> int:
    """A byte count such as 500M or 2G (decimal units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 2G")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@contextmanager
def _bar(total: int | None, unit: str) -> Iterator[tuple[Callable[[int], None], Any]]:
    """A progress bar on stderr when it is a terminal; yields (advance, bar or None)."""
    if not sys.stderr.isatty():
        yield (lambda _n: None), None
        return
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr)
    try:
        yield bar.update, bar
    finally:
        bar.close()


def _stream(args: argparse.Namespace) -> TextIO:
    """Where a command's lines go: JSON on stdout; text on stderr, as nbank's log."""
    return sys.stdout if args.json else sys.stderr


def _say(args: argparse.Namespace, line: str, bar: Any = None) -> None:
    """Writes a line to :func:`_stream`, above the progress bar when one is shown; any
    control character but its own newlines (in a registry's text, a member's name) is
    shown as text (:func:`~nbankd.names.lines_without_controls`)."""
    line = lines_without_controls(line)
    if bar is not None:
        bar.write(line, file=_stream(args))
    else:
        print(line, file=_stream(args), flush=True)


def _printer(args: argparse.Namespace, bar: Any) -> Callable[[tape.Outcome], None]:
    def report(outcome: tape.Outcome) -> None:
        if args.json:
            line = json.dumps(outcome.to_json())
        else:
            mark = "✗" if not outcome.ok else "-"
            line = f"  {mark} {printable(outcome.item)} -> {without_controls(outcome.message)}"
        _say(args, line, bar)

    return report


def _tar_size(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _finish(
    args: argparse.Namespace, report: Report, summary: tape.Summary, labels: tuple[str, ...]
) -> None:
    """Prints the summary, and records each member or resource that failed or was refused."""
    counts = summary.counts()
    text = "; ".join(f"{label}: {counts[label]}" for label in labels)
    text += f"; failed or refused: {summary.failed}"
    if args.dry_run:
        text += " (dry run: nothing was changed)"
    if args.json:
        text = json.dumps({"summary": dict(counts), "failed": summary.failed})
    _say(args, text)
    report.failed(summary.failed)


def read_ids(source: str | os.PathLike[str]) -> list[str]:
    """Identifiers from a file (or '-' for stdin), one per line; blanks and '#' lines skipped."""
    try:
        text = sys.stdin.read() if str(source) == "-" else Path(source).read_text()
    except OSError as err:
        raise errors.UsageError(
            f"cannot read the list of resources {source}: {err.strerror or err}",
            hint="give a file with one resource id per line, or '-' for stdin",
        ) from None
    lines = (line.strip() for line in text.splitlines())
    return list(dict.fromkeys(x for x in lines if x and not x.startswith("#")))


def _header(args: argparse.Namespace, text: str) -> None:
    """What nbank logs first (registry, source...): on stderr, and not with --json."""
    if not args.json:
        _say(args, text)
        if args.dry_run:
            _say(args, "DRY RUN: nothing will be changed")


def cmd_register(args: argparse.Namespace, report: Report) -> None:
    if args.file_number < 0:
        raise errors.UsageError(f"FILE_NUMBER must be 0 or more, not {args.file_number}")
    with registry_for(args) as reg:
        _header(args, f"registry: {describe(reg)}")
        with _bar(_tar_size(args.tar), "B") as (advance, bar):
            summary = tape_register.register_tar(
                reg,
                args.tar,
                args.tape,
                args.file_number,
                archive_name=args.archive_name,
                dry_run=args.dry_run,
                report=_printer(args, bar),
                advance=advance,
            )
    _finish(args, report, summary, ("added", "keyed", "already", "skipped"))


def cmd_prune(args: argparse.Namespace, report: Report) -> None:
    ids = read_ids(args.list)
    with registry_for(args) as reg:
        _header(args, f"registry: {describe(reg)}\npruning archive: {args.archive}")
        summary = tape_prune.prune(
            reg,
            args.archive,
            ids,
            dry_run=args.dry_run,
            check_hash=args.hash,
            unverified=args.unverified,
            report=_printer(args, None),
        )
    _finish(args, report, summary, ("deleted", "kept", "refused", "skipped"))


def wanted_ids(args: argparse.Namespace) -> list[str] | None:
    """The identifiers given on the command line and in ``-f FILE``; None for all."""
    if not args.ids and args.from_file is None:
        return None
    if args.from_file == "-" and args.tar == "-":
        raise errors.UsageError(
            "the tar file and the list of identifiers cannot both come from stdin",
            hint="give the identifiers on the command line or in a file",
        )
    ids = list(dict.fromkeys([*args.ids, *(read_ids(args.from_file) if args.from_file else [])]))
    if not ids:
        raise errors.UsageError(
            f"no resource identifiers in {args.from_file}",
            hint="give one identifier per line, or drop -f to import every resource",
        )
    return ids


# --- with a daemon configuration: the running daemon, or the state directory's lock ---


class _OlderDaemon(Exception):
    """The daemon answers but has no job commands (a release before them)."""


def _answering(args: argparse.Namespace, cmd: str) -> ControlClient | None:
    """A client of the configuration's daemon if one answers on its socket, else None;
    raises _OlderDaemon when it cannot take jobs. An answer of any other kind counts
    (a refusal is said again by the real request)."""
    from nbankctl.daemon_cmds import client

    daemon = client(args, cmd)
    try:
        daemon.call("job-status", {})
    except errors.DaemonUnreachable:
        return None
    except ControlError as err:
        if err.code == "unknown-command":
            raise _OlderDaemon from None
    except errors.PermissionDenied:
        pass
    return daemon


@dataclass(frozen=True)
class Handover:
    """The running daemon that is to do the work, and the archive as its configuration
    names it (the daemon knows its archives by those paths only)."""

    daemon: ControlClient
    archive: Path


@contextmanager
def where_to_run(
    args: argparse.Namespace, archive: Archive, cmd: str, doing: str
) -> Iterator[Handover | None]:
    """Where a copy or import into ``archive`` runs: yields the running daemon that is
    to do it, or None to do it here (holding the state directory's lock when
    ``archive`` is one of a daemon configuration's archives)."""
    config = None if args.dry_run else daemon_config(args)
    path = archive.path.resolve()
    listed = [a.path for a in config.archives if a.path.resolve() == path] if config else []
    if config is None or not listed:
        yield None
        return
    try:
        lock = statelock.acquire(config.state_dir)
    except statelock.StateDirInUse:  # the daemon runs: it does the work
        try:
            daemon = _answering(args, cmd)
        except _OlderDaemon:  # as before the daemon could: here, as access.user
            yield None
            return
        if daemon is not None:
            yield Handover(daemon, listed[0])
            return
        print(f"another nbankctl holds {config.state_dir}; waiting for it", file=sys.stderr)
        lock = statelock.acquire(config.state_dir, wait=True)
    except errors.ConfigError as err:  # not the daemon's user: only the daemon can
        try:
            daemon = _answering(args, cmd)
        except _OlderDaemon:
            daemon = None
        if daemon is not None:
            yield Handover(daemon, listed[0])
            return
        require_owner(archive, doing)  # names the user it must run as
        raise errors.UsageError(
            f"nbankd is not running and {err.message}",
            hint="start nbankd to hand it the work, or run the command as its user",
        ) from None
    try:
        yield None
    finally:
        lock.release()


#: the identifiers sent per request (a request line is at most 64 KiB)
ID_BUDGET = 48 * 1024


def _batches(ids: list[str] | None) -> list[list[str] | None]:
    if ids is None:
        return [None]
    out: list[list[str] | None] = []
    batch: list[str] = []
    size = 0
    for id in ids:
        cost = len(json.dumps(id)) + 2
        if batch and size + cost > ID_BUDGET:
            out.append(batch)
            batch, size = [], 0
        batch.append(id)
        size += cost
    out.append(batch)
    return out


def run_job(
    daemon: ControlClient,
    cmd: str,
    request: dict[str, Any],
    ids: list[str] | None,
    started: Callable[[dict[str, Any]], None],
    event: Callable[[list[Any]], None],
) -> dict[str, Any]:
    """Hands a job (``copy``, ``tape-import``) to the daemon, the identifiers in as
    many requests as they need; calls ``started`` with the first answer and
    ``event`` with each event the job records, until it ends; returns the last
    job-status answer (its ``skipped`` the events nbankd dropped unread, in all). An
    error that ended the job is raised with the exit status the daemon gave it."""
    job = None
    parts = _batches(ids)
    for n, batch in enumerate(parts):
        more = n < len(parts) - 1
        body: dict[str, Any] = {"ids": batch, "more": more}
        answer = daemon.call(cmd, {**request, **body} if job is None else {"job": job, **body})
        if job is None:
            job = answer["job"]
            started(answer)
    poll = min(10.0, daemon.timeout / 2)
    since = skipped = 0
    stopped = (
        f"nbankd stopped during the {cmd}; what it finished is kept: run the same "
        "command again to finish the rest"
    )
    try:
        while True:
            state = daemon.call("job-status", {"job": job, "since": since, "wait": poll})
            if state.get("skipped"):
                skipped += state["skipped"]
                print(
                    f"nbankd dropped {state['skipped']} lines of the {cmd} that nbankctl "
                    "had not read in time; its summary still counts them",
                    file=sys.stderr,
                )
            for e in state["events"]:
                if e[0] == "wait":
                    print(lines_without_controls(str(e[1])), file=sys.stderr, flush=True)
                else:
                    event(e)
            since = state["next"]
            if state["done"]:
                break
    except errors.DaemonUnreachable:
        print(stopped, file=sys.stderr)
        raise
    except ControlError as err:
        if err.code != "not-found":
            raise
        raise errors.DaemonUnreachable(  # a new nbankd answers: it knows no such job
            f"nbankd restarted during the {cmd} (its job is gone)",
            hint="what it finished is kept: run the same command again to finish the rest",
        ) from None
    error = state.get("error")
    if error:
        message = error["message"] + (f" ({error['hint']})" if error.get("hint") else "")
        raise ControlError(error["code"], message, exit_code=error["exit"])
    return {**state, "skipped": skipped}


def no_stdin_tar(args: argparse.Namespace) -> None:
    if args.tar == "-":
        raise errors.UsageError(
            "nbankd is running and does this import itself, but a tar file on standard "
            "input cannot be handed to it",
            hint="give the tar file's path (one nbankd's user can read), or run the "
            "import as the archive's user without the daemon configuration (-r URL)",
        )


def cmd_import(args: argparse.Namespace, report: Report) -> None:
    wanted = wanted_ids(args)
    archive = open_archive(args.archive)
    with where_to_run(args, archive, "tape-import", "an import") as handover:
        if handover is not None:
            no_stdin_tar(args)
            _import_by_daemon(args, report, handover, wanted)
            return
        with registry_for(args) as reg:
            _header(args, f"registry: {describe(reg)}\nsource: {args.tar}")
            with _bar(_tar_size(args.tar), "B") as (advance, bar):
                summary = tape_import.import_tar(
                    reg,
                    args.tar,
                    args.archive,
                    wanted=wanted,
                    dry_run=args.dry_run,
                    max_size=args.max_size,
                    report=_printer(args, bar),
                    advance=advance,
                )
    _finish(args, report, summary, ("imported", "already", "skipped"))


class _Tallied(tape.Summary):
    """A summary from nbankd's tallies (when some of its lines were dropped unread)."""

    def __init__(self, counts: Counter[str], failed: int) -> None:
        super().__init__()
        self._counts, self._failed = counts, failed

    @property
    def failed(self) -> int:
        return self._failed

    def counts(self) -> Counter[str]:
        return self._counts


def _import_by_daemon(
    args: argparse.Namespace,
    report: Report,
    handover: Handover,
    wanted: list[str] | None,
) -> None:
    """The import done by the running daemon, its lines printed here as they come."""
    tar = os.path.realpath(args.tar)  # nbankd follows no link: resolved as you can
    summary = tape.Summary()
    show = _printer(args, None)
    if not args.json:
        print("nbankd is running: handing the import to it", file=sys.stderr)

    def started(answer: dict[str, Any]) -> None:
        registry = without_controls(str(answer["registry"]))
        _header(args, f"registry: {registry}\nsource: {without_controls(tar)}")

    def event(e: list[Any]) -> None:
        if e[0] == "outcome":
            outcome = tape.Outcome(**e[1])
            summary.outcomes.append(outcome)
            show(outcome)

    request = {"archive": str(handover.archive), "tar": tar, "max_size": args.max_size}
    state = run_job(handover.daemon, "tape-import", request, wanted, started, event)
    if state["skipped"]:  # some lines were dropped: nbankd's tallies are the whole count
        summary = _Tallied(Counter(state.get("counts", {})), int(state.get("failures", 0)))
    _finish(args, report, summary, ("imported", "already", "skipped"))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``tape register|prune|import`` to nbankctl's sub-command parser."""
    tp = sub.add_parser("tape", help="tape workflow: register, prune, import")
    tsub = tp.add_subparsers(metavar="COMMAND")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("-y", "--dry-run", action="store_true", help="change nothing; say what would")

    pp = tsub.add_parser(
        "register",
        parents=[common, dry],
        help="hash a tar file written to tape and register its matching resources there",
    )
    pp.add_argument("-n", "--archive-name", help="archive name (default: TAPE-FILE_NUMBER)")
    pp.add_argument("tape", metavar="TAPE", help="name of the tape")
    pp.add_argument("file_number", metavar="FILE_NUMBER", type=int, help="file index on the tape")
    pp.add_argument("tar", metavar="TAR", help="the tar file written there ('-' for stdin)")
    pp.set_defaults(func=cmd_register)

    pp = tsub.add_parser(
        "prune", parents=[common, dry], help="delete local copies that are stored elsewhere"
    )
    pp.add_argument(
        "--no-hash",
        dest="hash",
        action="store_false",
        help="trust a local second copy that exists without re-hashing it",
    )
    pp.add_argument(
        "--unverified",
        action="store_true",
        help="also prune resources registered without a SHA-1 (nothing can check their copies)",
    )
    pp.add_argument("archive", metavar="ARCHIVE", help="name of the local archive to prune")
    pp.add_argument("list", metavar="LIST", help="file of resource ids, one a line; '-' for stdin")
    pp.set_defaults(func=cmd_prune)

    pp = tsub.add_parser(
        "import", parents=[common, dry], help="copy resources from a tar file into an archive"
    )
    pp.add_argument(
        "--max-size",
        type=size,
        metavar="SIZE",
        help="refuse files, and folder resources in total, larger than this (e.g. 50G)",
    )
    pp.add_argument("tar", metavar="TAR", help="the tar file ('-' for stdin)")
    pp.add_argument("archive", metavar="ARCHIVE", help="path of the destination archive")
    pp.add_argument(
        "ids", metavar="ID", nargs="*", help="import only these resources (default: all)"
    )
    pp.add_argument(
        "-f",
        "--from-file",
        metavar="FILE",
        help="import only the resources listed in FILE, one id a line ('-' for stdin)",
    )
    pp.set_defaults(func=cmd_import)
