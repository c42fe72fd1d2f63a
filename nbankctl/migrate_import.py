"""Importing a registry snapshot into django-neurobank, shown as it goes: the plan,
a line per noteworthy step, a progress bar, and a summary. Shared by ``registry
import|migrate`` (:mod:`nbankctl.migrate`) and ``registry switch``
(:mod:`nbankctl.migrate_switch`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nbankctl.registry_access import warn_cli_auth
from nbankd import errors
from nbankd.config import find_config_path, load_config
from nbankd.migration import execute, snapshot
from nbankd.migration.plan import Plan, Step, Verdict, make_plan
from nbankd.names import lines_without_controls, printable, without_controls
from nbankd.registry import credentials
from nbankd.registry.http import HttpRegistry
from nbankd.registry.http_transport import normalise_url

_MARKS = {
    "created": "+",
    "present": "=",
    "altered": "!",
    "conflict": "✗",
    "blocked": "✗",
    "failed": "✗",
}
_PLAN_MARKS = {"create": "+", "present": "=", "conflict": "✗", "blocked": "✗"}
KINDS = ("datatype", "archive", "resource", "location")


@contextmanager
def progress(total: int | None, unit: str) -> Iterator[tuple[Callable[[int], None], Any]]:
    """A progress bar on stderr when it is a terminal; yields (advance, bar or None)."""
    if not sys.stderr.isatty():
        yield (lambda _n: None), None
        return
    bar = tqdm(total=total, unit=unit, leave=False, file=sys.stderr)
    try:
        yield bar.update, bar
    finally:
        bar.close()


def say(text: str, bar: Any = None) -> None:
    if bar is not None:
        bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


# --- the target ----------------------------------------------------------------------


def target_url(text: str) -> str:
    if text.strip().lower() == "embedded":
        raise errors.UsageError(
            "--to must be the URL of a django-neurobank registry, not 'embedded'",
            hint="write it like https://host/neurobank/",
        )
    url, userinfo = normalise_url(text)
    if userinfo is not None:
        raise errors.UsageError(
            "--to must not carry user:password@ (other users see command lines, and the "
            "URL is written into nbank.json and the configuration)",
            hint="give the URL alone, and the credentials in a file with --registry-auth FILE "
            "or in ~/.netrc",
        )
    return url


def auth_file(args: argparse.Namespace) -> Path | None:
    """``--registry-auth FILE``, else the configuration's ``registry_auth`` if it loads."""
    if getattr(args, "registry_auth", None):
        return Path(args.registry_auth).expanduser().absolute()
    try:
        return load_config(find_config_path(getattr(args, "config", None))).registry_auth
    except errors.ConfigError:
        return None


def open_target(args: argparse.Namespace, url: str) -> HttpRegistry:
    """The django-neurobank registry to import into; credentials as for any nbankctl write."""
    warn_cli_auth(args)
    creds = credentials.resolve(url, registry_auth=auth_file(args), cli_auth=args.auth)
    if creds is not None and creds.warning and creds.warning != credentials.ARGV_WARNING:
        print(f"nbankctl: warning: {creds.warning}", file=sys.stderr)
    target = HttpRegistry(url, creds)
    info = target.info()
    if info.get("name") != "django-neurobank":
        target.close()
        raise errors.RegistryError(
            f"{url} answers as {info.get('name')!r}, not django-neurobank",
            hint="give the URL of a django-neurobank registry (ending with /neurobank/)",
        )
    return target


# --- import ----------------------------------------------------------------------------


def _summary_text(counts: Counter[tuple[str, str]], labels: tuple[str, ...]) -> list[str]:
    out = []
    for kind in KINDS:
        parts = [f"{counts[(kind, label)]} {label}" for label in labels if counts[(kind, label)]]
        out.append(f"{kind}s: {', '.join(parts) or 'none'}")
    return out


def _noteworthy(step: Step) -> bool:
    """A datatype or archive present with another extension or accessibility: always shown
    (an extension changes the file name of every resource of that datatype)."""
    return step.verdict is Verdict.PRESENT and bool(step.message)


def show_plan(args: argparse.Namespace, plan: Plan) -> None:
    for step in plan.steps:
        if args.json:
            say(json.dumps(step.to_json()))
        elif (
            args.verbose or step.verdict in (Verdict.CONFLICT, Verdict.BLOCKED) or _noteworthy(step)
        ):
            say(_line(_PLAN_MARKS[step.verdict], step, str(step.verdict), step.message))


def _line(mark: str, step: Step, status: str, message: str) -> str:
    """A step's line: the record's name and the message (which may quote a registry's
    text) shown with their control characters as text, on one line."""
    text = f"  {mark} {step.kind} {printable(step.name)}: {status}"
    return f"{text} ({without_controls(message)})" if message else text


def import_snapshot(
    args: argparse.Namespace,
    source: snapshot.Snapshot,
    url: str,
    *,
    header: bool = True,
    moved: frozenset[str] = frozenset(),
) -> bool:
    """Plans and (unless ``--dry-run``) carries out the import, printing it as it goes;
    True when it found no problem: no conflict or blocked record (planned, on a dry
    run), none failed and none altered by the registry (each is printed). ``moved``:
    resources imported earlier whose record on the target wins (see make_plan)."""
    with open_target(args, url) as target:
        if source.backend != "embedded" and source.source.rstrip("/") == target.url.rstrip("/"):
            raise errors.UsageError(f"the export comes from {target.url} itself: nothing to do")
        if header and not args.json:
            print(f"target: {without_controls(target.url)}")
            if args.dry_run:
                print("DRY RUN: nothing will be changed")
        plan = make_plan(source, execute.read_target(target, source), moved=moved)
        if args.dry_run:
            show_plan(args, plan)
            counts = plan.counts()
            labels = ("create", "present", "conflict", "blocked")
            if args.json:
                say(json.dumps({"summary": _flat(counts), "dry_run": True}))
            else:
                for text in _summary_text(counts, labels):
                    print(text.replace(" create", " to create"))
                print("(dry run: nothing was changed)")
            return not plan.problems
        if plan.to_create:
            target.check_credentials()  # refused credentials: stop before the first write
        outcomes: list[execute.Outcome] = []
        with progress(len(plan.to_create), "record") as (advance, bar):

            def show(o: execute.Outcome) -> None:
                outcomes.append(o)
                if args.json:
                    say(json.dumps(o.to_json()), bar)
                elif args.verbose or not o.ok or (o.status == "present" and _noteworthy(o.step)):
                    say(_line(_MARKS[o.status], o.step, o.status, o.message), bar)

            try:
                execute.carry_out(
                    plan,
                    target,
                    report=show,
                    advance=advance,
                    jobs=args.jobs,
                    opener=target.clone,
                )
            except errors.NbankdError as err:
                made = sum(o.status == "created" for o in outcomes)
                print(
                    f"nbankctl: import interrupted after {made} creation(s): "
                    f"{lines_without_controls(str(err))}\n"
                    "nbankctl: nothing is half-made; run the same command again to finish",
                    file=sys.stderr,
                )
                raise
    counts = Counter((str(o.step.kind), o.status) for o in outcomes)
    failed = sum(not o.ok for o in outcomes)
    if args.json:
        say(json.dumps({"summary": _flat(counts), "problems": failed}))
    else:
        labels = ("created", "present", "altered", "conflict", "blocked", "failed")
        for text in _summary_text(counts, labels):
            print(text)
        altered = sum(o.status == "altered" for o in outcomes)
        if altered:
            print(
                f"{altered} record(s) created but changed by the registry: see above; "
                "compare them with the export"
            )
        if failed > altered:
            print(f"{failed - altered} record(s) not imported: see above; fix them and run again")
    return not failed


def _flat(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(counts.items()):
        out.setdefault(kind, {})[status] = n
    return out


__all__ = [
    "auth_file",
    "import_snapshot",
    "open_target",
    "progress",
    "say",
    "show_plan",
    "target_url",
]
