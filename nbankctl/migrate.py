"""``nbankctl registry export | import | migrate | switch``: moving a registry's records.

- ``export [-o FILE]`` writes every datatype, archive, resource and location of the
  registry (``-r URL``, ``$NBANK_REGISTRY`` or the configuration's, embedded
  included) as JSON lines in UTF-8 (:mod:`nbankd.migration.snapshot`), warning of each
  resource no registry can be given again (metadata that is not an object, or not
  UTF-8), which an import then reports as blocked: the file holds them, and the
  command exits 1, as what it wrote cannot all be restored;
- ``import FILE --to URL`` creates on a django-neurobank registry what it lacks,
  keeping every name and SHA-1; ``migrate --to URL`` exports and imports in one go;
- ``switch --to URL`` (:mod:`nbankctl.migrate_switch`) moves a running nbankd from
  its embedded registry to django-neurobank.

Import and migrate print one line per conflict, blocked, failed or altered record
(created, but the server stored something else, e.g. through metadata aliases), and
per datatype or archive the target has with another extension or accessibility
(every record with ``-v``; JSON lines with ``--json``), then a summary, with a
progress bar on a terminal; ``--dry-run`` changes nothing. Exit status: 0 done, 1
conflicts, failures or altered records (reported, never touched), 2 usage, 3
registry unreachable (run again: nothing is created twice).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nbankctl import migrate_switch
from nbankctl.migrate_import import import_snapshot, progress, target_url
from nbankctl.registry_access import describe, open_registry
from nbankctl.report import Report
from nbankd import errors
from nbankd.migration import snapshot
from nbankd.names import printable, without_controls


def export_registry(args: argparse.Namespace, report: Report) -> snapshot.Snapshot:
    """Every record of the registry in use; each resource no registry can be given
    again is warned of on stderr and recorded as a failure (exit 1)."""
    with open_registry(args) as source:
        if not args.json:
            print(f"source: {describe(source)}", file=sys.stderr)
        with progress(None, "record") as (advance, _bar):
            snap = snapshot.take(source, advance=advance)
    unstorable = snapshot.unstorable(snap)
    for message in unstorable:
        print(f"nbankctl: warning: {printable(message)}", file=sys.stderr)
    report.failed(len(unstorable))
    return snap


def _export_note(snap: snapshot.Snapshot, where: str) -> str:
    counts = snap.counts()
    parts = ", ".join(f"{n} {kind}(s)" for kind, n in counts.items())
    return f"exported {parts} to {where}"


# --- commands ---------------------------------------------------------------------------


def save_export(snap: snapshot.Snapshot, path: Path, option: str) -> None:
    """Writes an export file; UsageError naming it when it cannot be written."""
    try:
        snapshot.save(snap, path)
    except OSError as err:
        raise errors.UsageError(
            f"cannot write the export file {path}: {err.strerror or err}",
            hint=f"give {option} a file in an existing folder you may write",
        ) from None
    print(_export_note(snap, str(path)), file=sys.stderr)


def cmd_export(args: argparse.Namespace, report: Report) -> None:
    snap = export_registry(args, report)
    if args.output and args.output != "-":
        save_export(snap, Path(args.output), "-o")
    else:
        # UTF-8 whatever the locale says, as an export file is (see snapshot.save)
        sys.stdout.flush()
        for text in snapshot.lines(snap):
            sys.stdout.buffer.write(text.encode("utf-8") + b"\n")
        sys.stdout.buffer.flush()


def cmd_import(args: argparse.Namespace, report: Report) -> None:
    url = target_url(args.to)
    snap = snapshot.load(args.file)
    if not args.json:
        source = f"{args.file} (exported from {snap.source or '?'} {snap.exported_at})"
        print(f"source: {without_controls(source)}")
    if not import_snapshot(args, snap, url):
        report.failed()


def cmd_migrate(args: argparse.Namespace, report: Report) -> None:
    url = target_url(args.to)
    snap = export_registry(args, report)
    if args.save_export:
        save_export(snap, Path(args.save_export), "--save-export")
    if not import_snapshot(args, snap, url):
        report.failed()


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of jobs from 1 to 32")
    return n


def import_options(pp: argparse.ArgumentParser) -> None:
    pp.add_argument(
        "--to", required=True, metavar="URL", help="the django-neurobank registry to fill"
    )
    pp.add_argument("-y", "--dry-run", action="store_true", help="change nothing; say what would")
    pp.add_argument("-v", "--verbose", action="store_true", help="a line for every record")
    pp.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=1,
        metavar="N",
        help="create N records at once (default 1; a server checking passwords with PBKDF2 "
        "takes about a second per write: use up to its number of workers)",
    )
    pp.add_argument(
        "--registry-auth",
        metavar="FILE",
        help="credentials for the target (user:password or netrc; default: $CREDENTIALS_"
        "DIRECTORY/registry, the configuration's registry_auth, ~/.netrc)",
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``registry export|import|migrate|switch`` to nbankctl's sub-command parser."""
    rp = sub.add_parser(
        "registry", help="export, import or migrate a registry; switch nbankd to another"
    )
    rsub = rp.add_subparsers(metavar="COMMAND")

    pp = rsub.add_parser("export", parents=[common], help="every record of the registry as JSON")
    pp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    pp.set_defaults(func=cmd_export)

    pp = rsub.add_parser(
        "import", parents=[common], help="create what a django-neurobank registry lacks"
    )
    pp.add_argument("file", metavar="FILE", help="an export file ('-' for stdin)")
    import_options(pp)
    pp.set_defaults(func=cmd_import)

    pp = rsub.add_parser(
        "migrate", parents=[common], help="export this registry and import it into another"
    )
    import_options(pp)
    pp.add_argument("--save-export", metavar="FILE", help="also keep the export in FILE")
    pp.set_defaults(func=cmd_migrate)

    migrate_switch.register(rsub, common, import_options)


__all__ = ["register"]
