"""``nbankctl tape register | prune | import``: the tape workflow (logic in :mod:`nbankd.tape`).

``register`` hashes every member before it records a location
(:mod:`nbankd.tape_register`); ``prune`` trusts a tape copy only with the key
``register`` gives it, and a resource without a SHA-1 only with ``--unverified``;
``import`` takes identifiers (arguments and/or ``-f FILE``) to import only those.
Each prints one line per member or resource (JSON lines with ``--json``) and a
summary, shows a tqdm progress bar on a terminal only, and exits 1 when anything
failed or was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nbankctl.registry_access import describe
from nbankctl.registry_cmds import registry_for
from nbankctl.report import Report
from nbankd import errors, tape, tape_import, tape_register

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


def _printer(args: argparse.Namespace, bar: Any) -> Callable[[tape.Outcome], None]:
    def report(outcome: tape.Outcome) -> None:
        if args.json:
            line = json.dumps(outcome.to_json())
        else:
            mark = "✗" if not outcome.ok else "-"
            line = f"  {mark} {outcome.item} -> {outcome.message}"
        if bar is not None:
            bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

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
    print(
        text if not args.json else json.dumps({"summary": dict(counts), "failed": summary.failed})
    )
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
    if not args.json:
        print(text)
        if args.dry_run:
            print("DRY RUN: nothing will be changed")


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
        summary = tape.prune(
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


def cmd_import(args: argparse.Namespace, report: Report) -> None:
    wanted = wanted_ids(args)
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
