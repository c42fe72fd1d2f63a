"""``nbankctl check registry | archive | all | tar``: nbank 0.13's integrity checks.

- ``check registry``: resources with no location (problems) and archives holding
  nothing (said, not problems);
- ``check archive PATH`` (also ``nbankctl archive check``): the archive's files
  against the registry and its owners and modes against its policy
  (:mod:`nbankctl.checkarchive`); every file is hashed unless ``--no-hash``;
- ``check all``: the registry, then every neurobank archive registered whose folder
  is on this host (the others are listed as skipped);
- ``check tar TAR [-a ARCHIVE]``: every member of a tar (as ``export`` and ``nbank``
  write them, ``resources/<id[:2]>/<id><ext>``) hashed while the tar is read once,
  against the registered SHA-1; with ``-a``, also what the registry places in
  ARCHIVE and the tar lacks.

``--fix`` (archive, all) changes only what is safe without asking: owners, groups
and modes set to the archive's policy, a missing ``staging/`` made, misplaced
resources refiled. At a terminal it then asks, one by one, about leftovers of
transfers (only those unchanged for an hour) and about copies of resources
registered elsewhere (only when their SHA-1 was checked): delete, add this archive
as a location, or skip. With standard input not a terminal it never asks.

Reports go to standard error, as nbank's do; ``--json`` writes to standard output.
Exit status: 0 clean, 1 problems found, 2 usage, 3 registry unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from nbankctl.registry_access import describe, open_registry
from nbankctl.report import Report
from nbankd import errors
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.audit.listing import list_registered
from nbankd.audit.model import INCOMPLETE, REGISTERED_ELSEWHERE
from nbankd.names import printable
from nbankd.registry.base import Registry

if TYPE_CHECKING:  # imported when a check runs: the registry's listing starts first
    from nbankctl import checkarchive


def say(text: str = "") -> None:
    """A line of the report (standard error, where nbank writes its reports). What it
    quotes from the registry, the archive or a tar goes through :func:`shown`."""
    print(text, file=sys.stderr)


def shown(value: object) -> str:
    """A name, path, finding or error as one line of plain text: control characters
    (a terminal's escapes among them) and undecodable bytes as ``\\xNN``
    (:func:`~nbankd.names.printable`)."""
    return printable(str(value))


def dump(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- check archive ---------------------------------------------------------------------


def _fix(
    reg: Registry, archive: Archive, name: str, result: checkarchive.Report, quiet: bool
) -> bool:
    """What ``--fix`` does (see the module docstring); True if anything changed."""
    from nbankctl import checkarchive

    moved, refused = checkarchive.fix_misplaced(archive, result)
    fixed, unfixed = checkarchive.fix_permissions(archive, result)
    done = [f"moved {shown(old)} -> {shown(new)}" for old, new in moved]
    done += [f"set owner, group and mode of {shown(path)} to the policy's" for path in fixed]
    for line in [] if quiet else done:
        say(line)
    for why in refused:
        say(f"not moved: {shown(why)}")
    for why in unfixed:
        say(f"not fixed: {shown(why)}")
    asks = [
        f
        for f in result.findings
        if f.kind == INCOMPLETE
        or (f.kind == REGISTERED_ELSEWHERE and f.resource in result.verified_elsewhere)
    ]
    if asks and checkarchive.interactive():
        resolved = checkarchive.resolve_at_terminal(reg, archive, name, result, say)
        for line in resolved:
            say(f"   - {line}")
        done += resolved
    elif asks:
        say(
            f"not asking about {len(asks)} leftover(s) or copies registered elsewhere: "
            "standard input is not a terminal (run the check with --fix at one)"
        )
    return bool(done)


def _print_archive(args: argparse.Namespace, result: checkarchive.Report) -> None:
    if args.verbose:
        for name, path in result.passed:
            # nbank's words
            if name in result.unhashed:
                status = "OK (no hash to verify)"
            else:
                status = "OK" if result.hashed else "OK (hash not checked)"
            say(f" - {shown(name)} : {shown(path)} - {status}")
    for finding in result.findings:
        say(f" - {shown(finding)}")
    say()
    say(result.summary())
    if not result.hashed:
        say("SHA-1s not verified (--no-hash): corrupt copies were not looked for")


def _archive(
    args: argparse.Namespace,
    reg: Registry,
    archive: Archive,
    name: str,
    check: checkarchive.Check,
) -> checkarchive.Report:
    """Finishes a started check of ``archive`` (registered as ``name``), fixes what
    ``--fix`` may and judges again after a change; prints it unless ``--json``."""
    from nbankctl import checkarchive

    try:
        result = check.finish(reg, name)
        if args.fix and _fix(reg, archive, name, result, args.json):
            result = checkarchive.check_archive(archive, reg, name, check_hash=args.hash)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise errors.ArchiveUnavailable(
            f"archive {archive.path}: {err.strerror or err}{where} while checking it",
            hint="is the archive mounted, and readable by this user?",
        ) from err
    if not args.json:
        _print_archive(args, result)
    return result


def cmd_check_archive(args: argparse.Namespace, report: Report) -> None:
    archive = open_archive(args.path)
    lister = ThreadPoolExecutor(1, thread_name_prefix="nbankctl-list")
    with _registry(args, fallback_url=archive.registry_url) as reg, lister:
        # the listing takes longest (the server's work): it starts first, under the name
        # init gives an archive; the walk and the reads start while it runs
        guess = archive.path.name
        ahead = (guess, lister.submit(list_registered, reg, guess))
        from nbankctl import checkarchive

        check = checkarchive.start(archive, check_hash=args.hash, ahead=ahead)
        try:
            record = reg.find_archive_by_root(str(archive.path))
            if record is None:
                say(f"No archive associated with '{shown(archive.path)}' in registry {reg.url}")
                say("register it with: nbankctl init (on a new folder) or ask the registry admin")
                report.failed()
                return
            if not args.json:
                say(f"archive: {shown(archive.path)} ({shown(record.name)})")
                say(f"registry: {shown(describe(reg))}")
            if archive.registry_url.rstrip("/") != reg.url.rstrip("/"):
                say(f"nbankctl: nbank.json names another registry ({shown(archive.registry_url)}); "
                    f"checked {reg.url}")  # fmt: skip
            result = _archive(args, reg, archive, record.name, check)
        finally:
            check.close()
    if args.json:
        dump(result.to_json())
    report.failed(len(result.findings))


@contextmanager
def _registry(args: argparse.Namespace, *, fallback_url: str | None = None) -> Iterator[Registry]:
    """The registry chosen for the command, closed on the way out."""
    registry = open_registry(args, fallback_url=fallback_url)
    try:
        yield registry
    finally:
        registry.close()


# --- check registry, check all ---------------------------------------------------------


def _registry_findings(reg: Registry) -> tuple[list[str], list[str]]:
    """(resources with no location, archives with no resources)."""
    from nbankd.audit.listing import without_location

    homeless = without_location(reg)
    if homeless is None:  # an older server ignores has_location: look at every record
        homeless = {r.name for r in reg.search() if not r.locations}
    empty = [
        a.name for a in reg.list_archives() if next(iter(reg.search(archive=a.name)), None) is None
    ]
    return sorted(homeless), sorted(empty)


def _check_registry(args: argparse.Namespace, reg: Registry) -> dict[str, Any]:
    homeless, empty = _registry_findings(reg)
    if not args.json:
        for name in homeless:
            say(f" - {shown(name)}: has NO locations")
        for name in empty:
            say(f" - archive {shown(name)}: has no resources")
        say()
        say(f"Resources without locations: {len(homeless)}; empty archives: {len(empty)}")
    return {
        "registry": reg.url,
        "ok": not homeless,
        "no_location": homeless,
        "empty_archives": empty,
    }


def cmd_check_registry(args: argparse.Namespace, report: Report) -> None:
    with _registry(args) as reg:
        if not args.json:
            say(f"registry: {describe(reg)}")
        out = _check_registry(args, reg)
    if args.json:
        dump(out)
    report.failed(len(out["no_location"]))


def _one_of_all(
    args: argparse.Namespace, reg: Registry, name: str, root: Path
) -> tuple[dict[str, Any] | None, list[str]]:
    """Checks one archive of ``check all``: (its report's JSON, or None if it could not
    be checked; the problems beside its findings: its nbank.json, why not checked)."""
    from nbankctl import checkarchive

    try:
        archive = open_archive(root)
    except errors.NbankdError as err:
        return None, [str(err)]
    problems = []
    if archive.path != root:
        problems.append(f"registered root resolves to {archive.path}: deposits won't find it")
    if archive.registry_url.rstrip("/") != reg.url.rstrip("/"):
        problems.append(f"nbank.json names another registry ({archive.registry_url})")
    check = checkarchive.start(archive, check_hash=args.hash)
    try:
        result = _archive(args, reg, archive, name, check)
    except errors.ArchiveError as err:
        return None, [*problems, str(err)]
    finally:
        check.close()
    return result.to_json(), problems


def cmd_check_all(args: argparse.Namespace, report: Report) -> None:
    failed: list[str] = []
    skipped: dict[str, str] = {}
    archives: list[dict[str, Any]] = []
    with _registry(args) as reg:
        if not args.json:
            say(f"registry: {describe(reg)}")
        registry_out = _check_registry(args, reg)
        if registry_out["no_location"]:
            failed.append("(registry)")
        for a in sorted(reg.list_archives(), key=lambda a: a.name):
            root = Path(a.root)
            if a.scheme != "neurobank":
                skipped[a.name] = f"{a.scheme} archive"
                continue
            if not root.is_dir():
                skipped[a.name] = f"{root} is not on this host"
                continue
            if not args.json:
                say(f"\narchive {shown(a.name)}: {shown(root)}")
            result, problems = _one_of_all(args, reg, a.name, root)
            for line in [] if args.json else problems:
                say(f" - {shown(line)}")
            ok = not problems and result is not None and bool(result["ok"])
            if not ok:
                failed.append(a.name)
            archives.append({"name": a.name, "ok": ok, "problems": problems, "check": result})
    if args.json:
        dump({"registry": registry_out, "archives": archives, "skipped": skipped, "failed": failed})
    else:
        say(f"\nskipped archives: {len(skipped)}")
        for name, why in skipped.items():
            say(f" - {shown(name)}: {shown(why)}")
        names = ", ".join(shown(name) for name in failed)
        say(f"failed checks: {names}" if failed else "all checks passed")
    report.failed(len(failed))


# --- check tar -------------------------------------------------------------------------


def _tar_verdict(entry: Any, sha1: str | None) -> tuple[str, str]:
    """(ok | unverified | failed, what to say) for one member of a registered resource."""
    if entry.problem is not None:
        return "failed", f"cannot hash it: {entry.problem}"
    if sha1 is None:
        return "unverified", "OK (no registered hash to check)"
    if entry.sha1 != sha1.lower():
        return "failed", f"SHA-1 {entry.sha1} does not match the registered {sha1.lower()}"
    return "ok", "OK"


def cmd_check_tar(args: argparse.Namespace, report: Report) -> None:
    from nbankd.tape_register import scan_tar

    counts = {"ok": 0, "unverified": 0, "failed": 0}
    members: list[dict[str, Any]] = []
    refused: list[tuple[str, str]] = []  # every member tape import refuses, and why
    with _registry(args) as reg:
        expected: dict[str, str | None] = {}
        if args.archive is not None:
            if reg.get_archive(args.archive) is None:
                raise errors.NotFound(  # exit 1, as nbank's and tape prune's
                    f"registry {reg.url} has no archive '{args.archive}'",
                    hint="see nbankctl archive list for the archives' names",
                )
            expected = list_registered(reg, args.archive)
        if not args.json:
            say(f"registry: {describe(reg)}")
            say(f"source: {shown(args.tar)}")
            if args.archive is not None:
                say(f"archive: {shown(args.archive)} ({len(expected)} resources in the registry)")
        # every member hashed while the tar is read once; broken: why it stopped early
        entries, broken = scan_tar(args.tar, refused=refused)
        records = {r.name: r for r in reg.get_resources(dict.fromkeys(e.id for e in entries))}
    seen: set[str] = set()
    unregistered: list[str] = []
    not_here: list[str] = []
    told: list[str] = []  # refused members reported below as registered resources
    inside: PurePosixPath | None = None  # the folder resource whose files these are
    for entry in entries:
        record = records.get(entry.id)
        refusal = None
        if entry.refused is not None and record is not None:  # it cannot come back from here
            refusal = f"tape import refuses it: {entry.refused}"
            told.append(entry.name)
        path = PurePosixPath(entry.name)
        if record is None:
            if not entry.is_dir and not (inside is not None and path.is_relative_to(inside)):
                unregistered.append(entry.name)
                if not args.json:
                    say(f"  ? {shown(entry.name)} -> '{shown(entry.id)}' not in the registry")
            continue
        seen.add(record.name)
        if entry.is_dir and refusal is None:
            inside = path
        status, text = ("failed", refusal) if refusal else _tar_verdict(entry, record.sha1)
        counts[status] += 1
        located = args.archive is None or args.archive in record.locations
        if not located:
            not_here.append(record.name)
        members.append(
            {"member": entry.name, "id": record.name, "status": status, "detail": text,
             "sha1": entry.sha1, "registered_sha1": record.sha1}
        )  # fmt: skip
        if not args.json:
            mark = "✗" if status == "failed" else "-"
            say(f"  {mark} {shown(entry.name)} -> {shown(text)}")
            if not located:
                say(f"  - {shown(entry.name)} -> not registered to {shown(args.archive)}")
    # the members refused that are no registered resource (a link, a stray file)
    others = [{"member": name, "problem": why} for name, why in refused]
    for name in told:
        others.remove(next(o for o in others if o["member"] == name))
    unread = sorted(set(expected) - seen)
    # after a read error, what was not reached may still be on the tape
    missing, not_checked = ([], unread) if broken else (unread, [])
    ok = not (counts["failed"] or missing or broken or others)
    if args.json:
        dump(
            {"tar": str(args.tar), "archive": args.archive, "ok": ok,
             "counts": counts, "members": members, "not_in_registry": unregistered,
             "missing_from_tar": missing, "not_registered_to_archive": not_here,
             "read_error": broken, "not_checked": not_checked, "refused_members": others}
        )  # fmt: skip
    else:
        for other in others:
            why = shown(other["problem"])
            say(f"  ✗ {shown(other['member'])} -> tape import refuses it: {why}")
        if broken:
            say(f"nbankctl: cannot read {shown(args.tar)} to the end: {shown(broken)}")
        for name in missing:
            say(
                f"  ✗ {shown(name)}: registered to {shown(args.archive)} "
                "but MISSING from the tar file"
            )
        for name in not_checked:
            say(f"  ? {shown(name)}: not checked, as reading stopped before it")
        say()
        say(
            f"Resources checked: {sum(counts.values())}; failed: {counts['failed']}; "
            f"no registered hash: {counts['unverified']}; "
            f"files not in the registry: {len(unregistered)}"
            + (f"; other members tape import refuses: {len(others)}" if others else "")
        )
        if args.archive is not None:
            stopped = f"; not checked (reading stopped): {len(not_checked)}" if broken else ""
            say(
                f"Missing from the tar file: {len(missing)}{stopped}; "
                f"not registered to {shown(args.archive)}: {len(not_here)}"
            )
    report.failed(counts["failed"] + len(missing) + bool(broken) + len(others))


# --- parser ----------------------------------------------------------------------------


def archive_options(pp: argparse.ArgumentParser) -> None:
    """nbank's options of ``check archive`` and ``check all`` (and ``-H``, kept)."""
    pp.add_argument(
        "-v", "--verbose", action="store_true",
        help="list every resource checked, not only problems",
    )  # fmt: skip
    pp.add_argument(
        "--fix", action="store_true",
        help="set owners (as root), groups and modes to the archive's policy, make a "
        "missing staging/, refile misplaced resources; at a terminal, also ask about "
        "leftovers and copies registered elsewhere",
    )  # fmt: skip
    pp.add_argument(
        "--no-hash", action="store_false", dest="hash",
        help="do not read and hash the stored files (faster; corrupt copies go unnoticed)",
    )  # fmt: skip
    pp.add_argument(
        "-H", "--hash", action="store_true", default=True,
        help="verify every SHA-1 (the default; kept for older scripts)",
    )  # fmt: skip


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``check`` and its sub-commands to nbankctl's sub-command parser."""
    ck = sub.add_parser("check", help="check the registry, archives and tar files")
    cs = ck.add_subparsers(metavar="COMMAND")
    pp = cs.add_parser(
        "registry", parents=[common], help="resources with no location, archives with nothing"
    )
    pp.set_defaults(func=cmd_check_registry)
    pp = cs.add_parser(
        "archive", parents=[common],
        help="an archive's files against the registry, its owners and modes against its policy",
    )  # fmt: skip
    archive_options(pp)
    pp.add_argument("path", type=Path, help="the archive's folder")
    pp.set_defaults(func=cmd_check_archive)
    pp = cs.add_parser(
        "all", parents=[common], help="the registry, then every archive on this host"
    )
    archive_options(pp)
    pp.set_defaults(func=cmd_check_all)
    pp = cs.add_parser("tar", parents=[common], help="a tar file's resources against the registry")
    pp.add_argument("tar", help="the tar file, or '-' for standard input")
    pp.add_argument(
        "-a", "--archive",
        help="also report resources the registry places in ARCHIVE that the tar lacks",
    )  # fmt: skip
    pp.set_defaults(func=cmd_check_tar)


__all__ = ["archive_options", "cmd_check_archive", "register"]
