"""``nbankctl fetch``, ``export`` and ``copy``: resources out of an archive, as ``nbank``
0.13's commands of those names (logic in :mod:`nbankd.transfer`).

Every resource is read once and kept only if it matches its registered SHA-1.
``fetch`` prints ``ID -> PATH`` lines on stdout, as nbank does; ``export`` and
``copy`` report on stderr, as nbank's log does. With ``--json`` each resource is one
JSON line on stdout, followed by a summary line. Exit status: 0 all done, 1 any
resource failed, 2 usage or configuration, 3 registry unreachable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nbankctl.registry_access import describe
from nbankctl.registry_cmds import registry_for
from nbankctl.report import Report
from nbankctl.tape_cmds import Handover, read_ids, run_job, where_to_run
from nbankd import __version__, errors
from nbankd.archive.opening import open_archive
from nbankd.hashing import SourceReadError
from nbankd.names import printable, without_controls
from nbankd.registry import credentials
from nbankd.transfer import copying
from nbankd.transfer import export as exporting
from nbankd.transfer.copying import UNVERIFIED, human_size
from nbankd.transfer.fetching import check_extension, fetch, target_path
from nbankd.transfer.reading import Advance
from nbankd.transfer.sources import Source, find_sources


class Console:
    """Where a command's lines go: progress and results on stderr (nbank's log; above
    the progress bar shown on a terminal), and with ``--json`` JSON lines on stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json: bool = args.json
        self._bar: Any = None

    def log(self, text: str) -> None:
        """A line on stderr; the control characters of what it quotes (a registry's or
        nbankd's text, a name) shown as text, so it stays one line."""
        if self.json:
            return
        text = without_controls(text)
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def emit(self, obj: dict[str, Any]) -> None:
        if self.json:
            print(json.dumps(obj), flush=True)

    @contextmanager
    def progress(self, total: int | None) -> Iterator[Advance | None]:
        """A byte-count progress bar on stderr when it is a terminal (not with --json)."""
        if self.json or not sys.stderr.isatty():
            yield None
            return
        self._bar = tqdm(total=total, unit="B", unit_scale=True, leave=False, file=sys.stderr)
        try:
            yield self._bar.update
        finally:
            self._bar.close()
            self._bar = None


def requested_ids(args: argparse.Namespace) -> list[str]:
    """The identifiers of the command line and of ``-f FILE``, each once, in order."""
    ids = list(args.ids)
    if args.from_file is not None:
        ids += read_ids(args.from_file)
    if not ids:
        raise errors.UsageError(
            "no identifiers given", hint="name resources, or give -f FILE with one id a line"
        )
    return list(dict.fromkeys(ids))


def _failed(con: Console, report: Report, id: str, why: object) -> None:
    report.failed()
    if isinstance(why, errors.RegistryUnavailable | errors.RegistryAuthError):
        report.unreachable()
    con.log(f"  ✗ {id} -> {why}")
    con.emit({"id": id, "status": "failed", "message": str(why)})


def _unlocated(con: Console, report: Report, sources: list[Source]) -> list[Source]:
    """Reports the sources without a readable copy here; returns the others."""
    for s in sources:
        if not s.ok:
            _failed(con, report, s.id, s.error)
    return [s for s in sources if s.ok]


# --- fetch ---------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace, report: Report) -> None:
    dest: Path = args.dest or Path()
    check_extension(args.extension)
    if not dest.is_dir():
        raise errors.UsageError(f"-d {dest}: no such folder", hint="create it first")

    def auth_for(url: str) -> tuple[str, str] | None:
        creds = credentials.resolve(url, cli_auth=getattr(args, "auth", None))
        return None if creds is None else creds.as_tuple()

    with registry_for(args) as reg:
        sources = find_sources(reg, args.ids)
    for s in sources:
        if s.record is None or not s.locations:
            report.failed()
            _fetch_line(args, s.id, None, "(no locations found)")
            continue
        try:
            target = target_path(dest, s, args.extension)
            done = fetch(s, target, replace=args.force, auth_for=auth_for)
        except (OSError, ValueError) as err:  # no usable target name for it in DEST
            report.failed()
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            _fetch_line(args, s.id, None, f"(cannot fetch '{s.id}' into {dest}: {why})")
            continue
        except errors.NbankdError as err:
            report.failed()
            if isinstance(err, errors.RegistryUnavailable):
                report.unreachable()
            _fetch_line(args, s.id, None, f"({err})")
            continue
        _fetch_line(args, s.id, done.path, str(done.path), verified=done.verified)
        if not done.verified and not args.json:
            line = f"nbankctl: {printable(s.id)} -> {printable(str(done.path))}{UNVERIFIED}"
            print(line, file=sys.stderr, flush=True)


def _fetch_line(
    args: argparse.Namespace, id: str, path: Path | None, text: str, *, verified: bool = False
) -> None:
    if args.json:
        status = "fetched" if path is not None else "failed"
        out: dict[str, Any] = {"id": id, "status": status, "path": str(path) if path else None}
        if path is None:
            out["message"] = text[1:-1] if text.startswith("(") and text.endswith(")") else text
        else:
            out["verified"] = verified
        print(json.dumps(out), flush=True)
    else:
        print(f"{printable(id):<20}\t-> {without_controls(text)}", flush=True)


# --- export --------------------------------------------------------------------------


def _manifest(url: str, entries: list[dict[str, Any]]) -> bytes:
    doc = {
        "registry": url,
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nbankctl_version": __version__,
        "resources": entries,
    }
    return json.dumps(doc, indent=2).encode("utf-8") + b"\n"


def _manifest_entry(s: Source) -> dict[str, Any]:
    assert s.path is not None and s.record is not None
    entry: dict[str, Any] = {"name": s.id, "path": s.path.name, "sha1": s.sha1}
    entry.update((k, v) for k, v in s.record.to_json().items() if k != "locations")
    return entry


def _check_manifest(out: Path, sources: list[Source]) -> None:
    for s in sources:
        if s.path is not None and s.path.name == exporting.MANIFEST_NAME:
            raise errors.UsageError(
                f"'{s.id}' is stored as {exporting.MANIFEST_NAME}, so there can be no manifest",
                hint="export it without --manifest",
            )
    existing = out / exporting.MANIFEST_NAME
    if out.is_dir() and (existing.exists() or existing.is_symlink()):
        raise errors.UsageError(
            f"'{existing}' already exists", hint="remove it or export elsewhere"
        )


def cmd_export(args: argparse.Namespace, report: Report) -> None:
    con = Console(args)
    out: Path = args.out
    exporting.check_out(out, compress=args.compress)
    ids = requested_ids(args)
    with registry_for(args) as reg:
        con.log(f"registry: {describe(reg)}")
        url = reg.url
        sources = find_sources(reg, ids, archive=args.archive)
    requested = len(sources)
    good = _unlocated(con, report, sources)
    written = total = 0
    if good:
        if args.manifest:
            _check_manifest(out, good)
        con.log(f"writing {len(good)} resource(s) to {out}")
        written, total = _export(args, con, report, url, good)
    text = (
        f"Resources requested: {requested}; exported: {written} ({human_size(total)}); "
        f"failed: {report.failures}"
    )
    con.log(text + (" (marked with ✗ above)" if report.failures else ""))
    summary = {"requested": requested, "exported": written, "bytes": total}
    con.emit({"summary": {**summary, "failed": report.failures}, "out": str(out)})


def _export(
    args: argparse.Namespace, con: Console, report: Report, url: str, sources: list[Source]
) -> tuple[int, int]:
    """Writes the sources to OUT; returns how many were written and their bytes."""
    out: Path = args.out
    export = exporting.open_export(out, compress=args.compress)
    entries: list[dict[str, Any]] = []
    written = total = 0
    try:
        with con.progress(copying.total_size(sources)) as advance:
            for s in sources:
                assert s.path is not None
                try:
                    read = exporting.write_resource(export, s.path, s.sha1, advance=advance)
                except (errors.NbankdError, SourceReadError) as err:
                    _failed(con, report, s.id, err)
                    continue
                except OSError as err:
                    if not isinstance(export, exporting.FolderExport):
                        raise _out_error(export, f"'{s.id}'", err) from err
                    _failed(con, report, s.id, _out_error(export, f"'{s.path.name}'", err))
                    continue
                written, total = written + 1, total + read.size
                entries.append(_manifest_entry(s))
                note = "" if s.sha1 else UNVERIFIED
                con.log(f"  - {s.id} -> {s.path.name}{note}  ({human_size(read.size)})")
                result = {"id": s.id, "status": "exported", "member": s.path.name}
                con.emit(
                    {**result, "sha1": read.sha1, "verified": bool(s.sha1), "bytes": read.size}
                )
        if args.manifest and entries:
            try:
                export.add_bytes(exporting.MANIFEST_NAME, _manifest(url, entries))
            except OSError as err:
                raise _out_error(export, exporting.MANIFEST_NAME, err) from err
            con.log(f"  - {exporting.MANIFEST_NAME}")
        if written or isinstance(export, exporting.FolderExport):
            try:
                export.finish()
            except OSError as err:
                raise _out_error(export, "", err) from err
        else:
            export.discard()
    except BaseException:
        export.discard()
        raise
    return written, total


def _out_error(export: exporting.Export, what: str, err: OSError) -> errors.ArchiveError:
    """An error writing ``what`` (a resource, the manifest, or when empty the end of a
    tar or zip file) to the export, saying what it leaves at OUT: a folder export keeps
    the resources published before; a tar or zip file is published whole or not at all."""
    why = err.strerror or str(err)
    out = export.out
    if isinstance(export, exporting.FolderExport):
        return errors.ArchiveError(
            f"cannot write {what} in {out}: {why}",
            hint=f"the resources reported exported are in {out}; free space there (or fix "
            "its permissions) and export the others again",
        )
    return errors.ArchiveError(
        f"cannot write {out}{f' ({what})' if what else ''}: {why}",
        hint=f"nothing was exported (a {out.suffix} file is published whole or not at all); "
        "free space there (or fix its permissions) and run the export again",
    )


# --- copy ----------------------------------------------------------------------------


class _CopyOut:
    """The copy's :class:`~nbankd.transfer.copying.Output` on this console."""

    def __init__(self, con: Console, report: Report) -> None:
        self.con, self.report = con, report
        self.log, self.emit, self.progress = con.log, con.emit, con.progress

    @property
    def failures(self) -> int:
        return self.report.failures

    def failed(self, unreachable: bool) -> None:
        self.report.failed()
        if unreachable:
            self.report.unreachable()


def cmd_copy(args: argparse.Namespace, report: Report) -> None:
    con = Console(args)
    out = _CopyOut(con, report)
    ids = requested_ids(args)
    archive = open_archive(args.dest)
    with where_to_run(args, archive, "copy", "a copy") as handover:
        if handover is not None:
            _copy_by_daemon(args, out, handover, ids)
            return
        with registry_for(args, fallback_url=archive.registry_url) as reg:
            con.log(f"registry: {describe(reg)}")
            copying.copy_into(
                reg, archive, ids, out, source_archive=args.archive, dry_run=args.dry_run
            )


def _copy_by_daemon(
    args: argparse.Namespace,
    out: _CopyOut,
    handover: Handover,
    ids: list[str],
) -> None:
    """The copy done by the running daemon, its lines said here as they come."""
    out.log("nbankd is running: handing the copy to it")

    def event(e: list[Any]) -> None:
        kind, value = e
        if kind == "log":
            out.log(value)
        elif kind == "emit":
            out.emit(value)
        elif kind == "failed":
            out.failed(bool(value))

    request = {"archive": str(handover.archive), "source_archive": args.archive}
    said = lambda a: out.log(f"registry: {a['registry']}")  # noqa: E731
    state = run_job(handover.daemon, "copy", request, ids, said, event)
    if state["skipped"]:  # lines dropped unread: nbankd's count of failures is the whole
        out.report.failed(max(0, int(state.get("failures", 0)) - out.failures))


# --- parser --------------------------------------------------------------------------


def _selection(pp: argparse.ArgumentParser) -> None:
    pp.add_argument("-a", "--archive", metavar="ARCHIVE", help="only read copies in this archive")
    pp.add_argument(
        "-f",
        "--from-file",
        metavar="FILE",
        help="read identifiers from FILE, one per line ('-' for standard input)",
    )
    pp.add_argument("ids", nargs="*", metavar="ID", help="identifier(s) of the resource(s)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``fetch``, ``export`` and ``copy`` to nbankctl's sub-command parser."""
    pp = sub.add_parser(
        "fetch", parents=[common], help="fetch resources into a folder, checking their SHA-1"
    )
    pp.add_argument("-f", "--force", action="store_true", help="replace an existing target file")
    pp.add_argument("-d", "--dest", type=Path, help="folder to fetch into (default: here)")
    pp.add_argument("-e", "--extension", help="give fetched files this extension")
    pp.add_argument("ids", nargs="+", metavar="ID", help="identifier(s) of the resource(s)")
    pp.set_defaults(func=cmd_fetch)

    pp = sub.add_parser(
        "export", parents=[common], help="write resources to a tar file, zip file or folder"
    )
    pp.add_argument("--compress", action="store_true", help="deflate the members of a zip file")
    pp.add_argument(
        "--manifest", action="store_true", help="add the resources' records as manifest.json"
    )
    pp.add_argument(
        "out", type=Path, metavar="OUT", help="a .tar or .zip file to create, or else a folder"
    )
    _selection(pp)
    pp.set_defaults(func=cmd_export)

    pp = sub.add_parser("copy", parents=[common], help="copy resources into another archive")
    pp.add_argument(
        "-y", "--dry-run", action="store_true", help="read and check only; change nothing"
    )
    pp.add_argument("dest", type=Path, metavar="DEST", help="path of the destination archive")
    _selection(pp)
    pp.set_defaults(func=cmd_copy)


__all__ = ["cmd_copy", "cmd_export", "cmd_fetch", "register"]
