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
- with a daemon configuration (``-c FILE`` or ``$NBANKD_CONFIG``), in its
  ``state_dir``: the daemon must be stopped (its lock is taken; a running daemon is
  named), and the command must run as the archive's ``access.user``. An item left
  unfinished there is finished by the daemon's start as well as by the next deposit.

Every run first finishes what an interrupted run left. A step that fails for a
while (registry unreachable) is retried with the daemon's backoff for ``--wait``
seconds; what is still unfinished then is named, with where its file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from nbankctl import registry_access
from nbankctl.report import Report
from nbankd import errors
from nbankd.archive.layout import Archive
from nbankd.archive.opening import open_archive
from nbankd.config.model import Config, FileMetadata
from nbankd.daemon import statelock
from nbankd.deposit import manual, policy
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import State
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.registry.base import Registry

JOURNAL_NAME = "journal.sqlite3"
DEFAULT_WAIT = 30.0


def user_state_dir(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/nbankctl``, or ``~/.local/state/nbankctl``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "nbankctl"


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE as JSON when it parses (no NaN or Infinity), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return key, json.loads(value, parse_constant=no_constants)
    except ValueError:
        return key, value


class _KeyValues(argparse.Action):
    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        key, value = parse_key_value(str(values))
        current = dict(getattr(namespace, self.dest) or {})
        current[key] = value
        setattr(namespace, self.dest, current)


def _say(args: argparse.Namespace, text: str) -> None:
    """A progress line: on stderr, as nbank logs it (stdout carries only -j records)."""
    print(text, file=sys.stderr)


def _emit(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json_out or args.json:
        print(json.dumps(record, default=str), flush=True)


# --- where and as whom ---------------------------------------------------------------


def _daemon_config(args: argparse.Namespace) -> Config | None:
    """The daemon configuration named by -c or $NBANKD_CONFIG (never the default
    path: used like nbank, a deposit keeps its own journal)."""
    if getattr(args, "registry", None) or not (args.config or os.environ.get("NBANKD_CONFIG")):
        return None
    from nbankd.config import find_config_path, load_config

    return load_config(find_config_path(args.config))


def _check_user(archive: Archive) -> None:
    user = archive.policy.access.user
    if user is None:
        return
    me = pwd.getpwuid(os.geteuid()).pw_name
    if me != user:
        raise errors.UsageError(
            f"archive {archive.path} is owned by {user!r} (access.user in its nbank.json); "
            f"a deposit run as {me!r} would leave files it cannot own",
            hint=f"run the deposit as {user} (e.g. sudo -u {user} nbankctl deposit ...)",
        )


def _lock(state_dir: Path) -> statelock.StateLock:
    """The user's own journal's lock: one manual deposit after another."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return statelock.acquire(state_dir, wait=True)


# --- inputs --------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> list[Path]:
    files = list(args.file)
    if args.read_stdin:
        files += [Path(line.strip()) for line in sys.stdin if line.strip()]
    return [Path(os.path.abspath(f)) for f in files]


def _refusal(path: Path, zip_directories: bool) -> str | None:
    """Why ``path`` cannot be deposited as given, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    import stat

    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; deposit the file it points to"
    if stat.S_ISDIR(st.st_mode):
        if zip_directories:
            return None
        return "is a directory; zip it first, or deposit with --zip-directories"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


# --- the run -------------------------------------------------------------------------


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
    _report(args, report, described)


def _report(args: argparse.Namespace, report: Report, described: list[dict[str, Any]]) -> None:
    """Says how each input ended (stderr; -j lines on stdout) and records failures."""
    unreachable = False
    for d in described:
        record, state = d["record"], d["state"]
        source = record["source"]
        if state == State.DONE:
            _say(args, f"{source}: deposited as {record['id']} ({d['url']})")
        elif d["held"] is not None:
            _say(
                args,
                f"{source}: unfinished ({state}: {record['error']}); kept safe as "
                f"{d['held']}; the next `nbankctl deposit` finishes it",
            )
            unreachable |= d["code"] in ("registry-unavailable", "auth")
        else:
            _say(args, f"{source}: not deposited: {record['error']}")
            if d["where"] is not None and d["where"] != source:
                _say(args, f"  (kept at {d['where']}: its place was taken meanwhile)")
        if state != State.DONE:
            report.failed()
        _emit(args, record)
    if unreachable:
        report.unreachable()


def _dry_run(
    args: argparse.Namespace,
    report: Report,
    reg: Registry,
    spec: InboxSpec,
    archive: Archive,
    paths: list[Path],
) -> None:
    """Judges each input as the claim would, and asks the registry about its name."""
    rules = spec.rules(
        auto_identifiers=archive.policy.auto_identifiers,
        auto_id_type=archive.policy.auto_id_type,
        keep_extensions=archive.policy.keep_extensions,
        allow_directories=archive.policy.allow_directories,
    )
    for path in paths:
        try:
            plan = policy.plan(path.name, rules, policy.Sidecar(), token=os.urandom(16))
            if not plan.auto and reg.get_resource(plan.name) is not None:
                raise policy.PolicyError("name-taken", f"'{plan.name}' is already registered")
        except errors.NbankdError as err:
            _say(args, f"{path}: would not be deposited: {err}")
            _emit(args, {"source": str(path), "error": str(err)})
            report.failed()
            continue
        _say(args, f"{path}: OK as {plan.name if not plan.auto else '(automatic id)'} (dry run)")
        _emit(
            args,
            {
                "source": str(path),
                "id": None if plan.auto else plan.name,
                "dry_run": True,
                "metadata": plan.metadata,
            },
        )


def cmd_deposit(args: argparse.Namespace, report: Report) -> None:
    from nbankd.service.logs import configure_logging

    # the steps' own log, on stderr, for what this command does not say itself
    configure_logging("console", "error", stream=sys.stderr)
    archive = open_archive(args.directory)
    config = _daemon_config(args)
    metadata = dict(args.metadata or {})
    for key in ("experimenter", "animal"):
        if getattr(args, key):
            metadata[key] = getattr(args, key)
    mode = "skip" if not args.read_metadata else "read"
    if args.override_file_metadata:
        mode = "override"
    by_folder: dict[Path, list[str]] = {}
    for path in _inputs(args):
        refused = _refusal(path, args.zip_directories)
        if refused is not None:
            _say(args, f"{path}: not deposited: {refused}")
            _emit(args, {"source": str(path), "error": refused})
            report.failed()
            continue
        by_folder.setdefault(path.parent, []).append(path.name)
    lock = None
    if config is not None and not args.dry_run:
        try:
            lock = statelock.acquire(config.state_dir)
        except statelock.StateDirInUse:  # the daemon runs: it does the work
            _via_daemon(args, report, archive, by_folder, metadata, mode)
            return
        except errors.ConfigError as err:  # not the daemon's user: only the daemon can
            try:
                _via_daemon(args, report, archive, by_folder, metadata, mode)
            except errors.DaemonUnreachable:
                raise errors.UsageError(
                    f"nbankd is not running and {err.message}",
                    hint="start nbankd to hand it the files, or run the deposit as its user",
                ) from None
            return
    try:
        _by_hand(args, report, config, archive, by_folder, metadata, mode, lock)
    finally:
        if lock is not None:
            lock.release()


def _by_hand(
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
        _check_user(archive)
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


#: paths per deposit request to the daemon (a request line is at most 64 KiB)
BATCH = 100


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
    files = [str(folder / n) for folder, names in by_folder.items() for n in names]
    _say(args, f"nbankd is running: handing {len(files)} file(s) to it")
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
        ids += daemon.call("deposit", request)["items"]
    wait = DEFAULT_WAIT if args.wait is None else args.wait
    began = time.monotonic()
    poll = min(10.0, daemon.timeout / 2)
    while True:
        state = daemon.call("deposit-status", {"items": ids, "wait": poll})
        if state["done"]:
            break
        stuck = all(d["code"] for d in state["items"] if d["held"] is not None)
        if stuck and time.monotonic() - began >= wait:
            break  # every unfinished one waits after an error: the daemon keeps trying
    _report(args, report, state["items"])


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
                _say(
                    args,
                    f"note: an earlier deposit of {item.relpath_str!r} waits for registry "
                    f"{manual.registry_of(item)}; run a deposit with -r that URL to finish it",
                )
        if ours:
            _say(args, f"finishing {len(ours)} file(s) an interrupted deposit left")
        items = list(ours)
        made: list[Path] = []
        for folder, names in by_folder.items():
            inbox = inbox_of(folder)
            fresh = not os.path.lexists(folder / ".nbank")
            specs[inbox.key] = inbox.spec(prepare=True)
            if fresh:
                made.append(folder)
            dirs = [n for n in names if os.path.isdir(folder / n)]
            files = [n for n in names if n not in dirs]
            for kind, group in (("file", files), ("dir", dirs)):
                if group:
                    items += manual.journal_files(
                        journal, inbox, group, kind=kind, now=steps.clock()
                    )
        wait = DEFAULT_WAIT if args.wait is None else args.wait
        _finish(args, report, _drive_all(steps, items, wait))
        for folder in made:
            manual.tidy(folder)
    finally:
        journal.close()


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "deposit",
        parents=[common],
        help="deposit files into an archive (as nbank deposit), journaled and verified",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("directory", type=Path, metavar="ARCHIVE", help="path of the archive")
    p.add_argument("file", nargs="*", type=Path, help="files to deposit")
    p.add_argument("-d", "--dtype", help="the datatype of the deposited resources")
    p.add_argument(
        "-H", "--hash", action="store_true", help="accepted for nbank; every file is hashed"
    )
    p.add_argument(
        "-A", "--auto-id", action="store_true", help="let the registry choose the identifiers"
    )
    p.add_argument(
        "-y", "--dry-run", action="store_true", help="check everything; register and move nothing"
    )
    p.add_argument(
        "-k",
        dest="metadata",
        action=_KeyValues,
        default={},
        metavar="KEY=VALUE",
        help="a metadata field (VALUE read as JSON when it parses); repeat for more",
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


__all__ = ["cmd_deposit", "parse_key_value", "register", "user_state_dir"]
