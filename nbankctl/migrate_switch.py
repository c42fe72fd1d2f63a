"""``nbankctl registry switch --to URL``: move nbankd from its embedded registry.

In order, stopping at the first problem:

1. pause every inbox of the daemon (control socket), recording which ones in
   ``state_dir/migration/paused.json`` first, and wait until nothing is in flight;
2. export the embedded registry to ``state_dir/migration/export-<time>.jsonl``
   (kept: it holds the original creation times, which a server sets itself);
3. import it into the django-neurobank registry; any conflict or failure stops the
   switch here, with the daemon resumed on the embedded registry as before;
4. check the credentials the daemon will write with (``--registry-auth``, else the
   configuration's ``registry_auth``), and that the daemon's user may read them;
5. check that the daemon paused in step 1 still runs, paused (else pause it again
   and import what it deposited meanwhile); rewrite the ``registry`` field of each
   configured archive's ``nbank.json`` naming the embedded registry (its
   ``registry_url`` or its database's ``file:`` URL; backup ``nbank.json.bak-<time>``);
6. record the move in ``state_dir/registry-moves.jsonl`` (``nbankctl history`` shows
   old receipts under the new URL; the receipts themselves never change);
7. point the configuration at the URL (backup ``<config>.bak-<time>``), or, when the
   file cannot be edited safely, print the exact edits and leave the daemon paused;
8. check the daemon again, reload it, check that it now uses the URL;
9. catch up: read the embedded registry again and, while it differs from what was
   imported, import what it holds new; then resume the inboxes paused in step 1
   (with nbankd stopped: take them out of its ``state_dir/paused.json``).

Every step is idempotent. After an interruption, a hand edit, or an archive that was
unmounted, run the same command again: on a configuration already naming the URL
it finds the old registry in ``registry-moves.jsonl`` and redoes the safe steps
(import, nbank.json, move record, reload, catch-up, resume). Its import brings only
what the embedded registry holds beyond the export recorded with the move (deposits
made since): the server is the registry by then, so a record corrected or a location
removed there since stays as the server has it. Once step 5 has begun, a failure
leaves the daemon paused unless it already uses the URL.

Only a missing socket file or a refused connection mean that nbankd is not running;
the files are then switched and the configuration takes effect when it starts. Any
other failure to reach it stops the switch before anything changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbankctl import migrate_credentials
from nbankctl.daemon_cmds import socket_path
from nbankctl.migrate_credentials import warn
from nbankctl.migrate_import import import_snapshot, target_url
from nbankctl.migrate_release import release
from nbankctl.report import Report
from nbankd import errors, seams
from nbankd.config import find_config_path, load_config
from nbankd.deposit import moves
from nbankd.migration import snapshot, switch
from nbankd.migration.pausing import (
    Daemon,
    migration_folder,
    state_owner,
)
from nbankd.names import without_controls
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.timefmt import compact_stamp

POLL = 0.2
CATCH_UP_ROUNDS = 5
#: fault-injection points of the switch (NBANKD_CRASH_AT=NAME, NBANKD_PAUSE_AT=NAME)
BEFORE_NBANK_JSON = "switch-before-nbank-json"
AFTER_NBANK_JSON = "switch-after-nbank-json"
AFTER_CONFIG = "switch-after-config"


def note(text: str, *, json_output: bool = False) -> None:
    """A line of the switch's progress: on standard output, or, with ``--json`` (whose
    document alone goes there), on standard error. One line: the control characters of
    what it quotes (a registry's or nbankd's text, a path) are shown as text
    (:func:`~nbankd.names.without_controls`)."""
    print(without_controls(text), file=sys.stderr if json_output else sys.stdout, flush=True)


def _stamp() -> str:
    return compact_stamp(time.time())


class Switch:
    """One run of ``registry switch`` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run: bool = args.dry_run
        self.url = target_url(args.to)
        self.path = find_config_path(getattr(args, "config", None))
        self.config = load_config(self.path)
        self.stamp = _stamp()
        self.old_url, self.rerun = self._old_registry()
        db_url = self.config.embedded_db_path.as_uri() + "/"
        self.olds = (self.old_url, db_url)
        self.imported: snapshot.Snapshot | None = None  # the last snapshot imported
        self.imported_path: Path | None = None  # and its export file (the move records it)
        self.export_path: Path | None = None  # the last export this run kept
        self.earlier_path: Path | None = None  # the export recorded with the move (a re-run)
        self.files_changed = self.rerun
        self.finished = False
        self.daemon = Daemon(
            socket_path(args), self.config.state_dir, self.say, self.url, self.finishing_command()
        )

    def say(self, text: str) -> None:
        """A line of progress (:func:`note`)."""
        note(text, json_output=bool(getattr(self.args, "json", False)))

    def finishing_command(self) -> list[str]:
        """The command line that finishes this switch if it is cut short, as status
        names it: this run's configuration, socket and credentials file (paths only)."""
        args = self.args
        words = ["nbankctl"]
        if getattr(args, "config", None):
            words += ["-c", str(Path(args.config).absolute())]
        words += ["registry", "switch", "--to", self.url]
        if getattr(args, "registry_auth", None):
            words += ["--registry-auth", str(Path(args.registry_auth).absolute())]
        if getattr(args, "socket", None):
            words += ["--socket", str(Path(args.socket).absolute())]
        return words

    def _old_registry(self) -> tuple[str, bool]:
        """(the URL of the registry moved from, whether this finishes an earlier switch)."""
        config, url, path = self.config, self.url, self.path
        if config.embedded:
            with EmbeddedRegistry(config.embedded_db_path, url=config.registry_url) as old:
                return old.url, False
        if not switch.same_registry(config.registry, url):
            raise errors.UsageError(
                f"{path} uses registry {config.registry}, not the embedded one",
                hint="'registry switch' moves an embedded registry; copy records between "
                "servers with 'nbankctl registry migrate -r OLD --to NEW'",
            )
        old = moves.moved_to(config.state_dir, url)
        if old is None:
            raise errors.UsageError(
                f"{path} uses {url} already, and {moves.moves_path(config.state_dir)} records "
                "no move to it: there is no switch to finish",
                hint="'registry switch' moves an embedded registry; after a switch by hand, "
                "add the move to that file (see docs/migration.md, 'Doing it by hand')",
            )
        if not config.embedded_db_path.is_file():
            raise errors.UsageError(
                f"{path} uses {url} already and the embedded registry "
                f"{config.embedded_db_path} is gone: there is nothing to finish"
            )
        self.say(f"{path} uses {url} already: finishing the switch from {old}")
        return old, True

    # -- the steps ------------------------------------------------------------------

    def read_embedded(self) -> snapshot.Snapshot:
        with EmbeddedRegistry(self.config.embedded_db_path, url=self.old_url) as source:
            return snapshot.take(source)

    def export(self) -> snapshot.Snapshot:
        """Reads the embedded registry and (unless a dry run) keeps the export file."""
        snap = self.read_embedded()
        counts = ", ".join(f"{n} {k}(s)" for k, n in snap.counts().items())
        if self.dry_run:
            self.say(f"read the embedded registry {snap.source}: {counts}")
            return snap
        folder = migration_folder(self.config.state_dir)
        for n in range(1000):
            path = folder / f"export-{self.stamp}{f'-{n}' if n else ''}.jsonl"
            try:
                snapshot.save(snap, path, owner=state_owner(self.config.state_dir), replace=False)
                break
            except FileExistsError:
                continue
            except OSError as err:
                raise errors.UsageError(
                    f"cannot write the export file {path}: {err.strerror or err}",
                    hint="run the switch as root or as nbankd's user (who owns state_dir)",
                ) from None
        else:
            raise errors.UsageError(f"{folder} holds 1000 exports of {self.stamp}: clean it up")
        self.export_path = path
        self.say(f"exported the embedded registry {snap.source} to {path}: {counts}")
        return snap

    def recorded_export(self) -> Path | None:
        """The export file recorded with the move this run finishes
        (``registry-moves.jsonl``, its last line from the old registry to the URL)."""
        found = None
        for move in moves.records(self.config.state_dir):  # torn lines skipped
            if switch.same_registry(move.get("from"), self.old_url) and switch.same_registry(
                move.get("to"), self.url
            ):
                export = move.get("export")
                found = Path(export) if isinstance(export, str) and export else None
        return found

    def earlier_import(self) -> snapshot.Snapshot | None:
        """What the earlier run of this switch imported (the export recorded with the
        move), or None, said, when it is not known: everything is imported then."""
        self.earlier_path = self.recorded_export()
        whole = (
            "importing the whole embedded registry (a record corrected on the server since "
            "the move shows as a conflict, and a location removed there comes back: check "
            "them after the switch)"
        )
        if self.earlier_path is None:
            where = moves.moves_path(self.config.state_dir)
            warn(f"{where} records no export with the move: {whole}")
            return None
        try:
            return snapshot.load(self.earlier_path)
        except errors.UsageError as err:
            warn(f"{err.message}: {whole}")
            return None

    def import_changes(
        self,
        snap: snapshot.Snapshot,
        earlier: snapshot.Snapshot | None,
        since: str,
        *,
        header: bool = True,
    ) -> bool:
        """Imports ``snap``; with ``earlier`` (imported before), only what ``snap`` holds
        that ``earlier`` did not: what is on the server already is the server's now, and
        a record corrected or removed there since is not brought back. True when the
        import found no problem."""
        if earlier is None:
            ok = import_snapshot(self.args, snap, self.url, header=header)
        else:
            new = snapshot.changes(snap, earlier)
            if new.empty:
                self.say(f"the embedded registry holds nothing new since {since}")
                ok = True
            else:
                counts = ", ".join(f"{n} {k}(s)" for k, n in new.snapshot.counts().items())
                self.say(f"importing what the embedded registry holds new since {since}: {counts}")
                ok = import_snapshot(
                    self.args, new.snapshot, self.url, header=header, moved=new.moved
                )
        if ok:
            self.imported, self.imported_path = snap, self.export_path
        return ok

    def credentials(self) -> None:
        """Proves, before anything irreversible, that nbankd will be able to write to the
        new registry with the credentials nbankd itself will use."""
        path = self.args.registry_auth
        path = Path(path).absolute() if path else self.config.registry_auth
        for line in migrate_credentials.prove(self.url, self.config, path, self.daemon):
            self.say(line)

    def _hand_edit(self, path: Path, why: str) -> None:
        warn(
            f"{path} {why}:\n  when it can be read and written, run this command again, or set "
            f'"registry": "{self.url}" in it by hand (keep a copy)'
        )

    def archives(self) -> int:
        """Rewrites nbank.json of each archive naming the old registry; returns problems."""
        problems = 0
        for archive in self.config.archives:
            update = switch.check_nbank_json(archive.nbank_json, self.olds, self.url)
            if update.action == "rewrite":
                if self.dry_run:
                    self.say(f"would point {update.path} at {self.url} (backup kept)")
                    continue
                try:
                    backup = switch.rewrite_nbank_json(update.path, self.url, self.stamp)
                except OSError as err:
                    problems += 1
                    self._hand_edit(update.path, f"cannot be rewritten: {err.strerror or err}")
                    continue
                self.say(f"{update.path}: registry -> {self.url} (backup {backup.name})")
            elif update.action == "unreadable":
                problems += 1
                self._hand_edit(update.path, update.message)
            else:
                self.say(f"{update.path} {update.message}")
        return problems

    def record_move(self) -> None:
        state_dir = self.config.state_dir
        export = str(self.imported_path) if self.imported_path else None
        try:
            recorded = moves.record_move(
                state_dir, self.old_url, self.url, time=self.stamp, export=export
            )
        except OSError as err:
            raise errors.ProblemsFound(
                f"cannot append to {moves.moves_path(state_dir)}: {err.strerror or err}",
                hint="run the switch again as root or as nbankd's user (who owns state_dir)",
            ) from None
        if recorded:
            self.say(f"recorded the move in {moves.moves_path(state_dir)}")

    def configuration(self) -> tuple[bool, list[str]]:
        """Points the configuration at the URL; (done, the edits to make by hand if not)."""
        args, path, url = self.args, self.path, self.url
        auth = str(Path(args.registry_auth).absolute()) if args.registry_auth else None
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            warn(f"cannot read {path}: {err.strerror or err}")
            return False, [f"set 'registry: {url}'", "remove 'registry_url'"]
        edit = switch.edit_config_text(text, url, registry_auth=auth, stamp=self.stamp)
        if edit.text is not None and not edit.changed:
            self.say(f"{path} uses {url} already")
            return True, []
        why = edit.unsafe or switch.config_unsafe_reason(path)
        if why or edit.text is None:
            warn(f"not editing {path}: {why}")
            return False, list(edit.edits)
        if self.dry_run:
            self.say(f"would edit {path}: {'; '.join(edit.edits)} (backup kept)")
            return True, []
        try:
            backup = switch.write_config(path, edit.text, self.stamp, validate=load_config)
        except (OSError, errors.ConfigError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            warn(f"not editing {path}: {reason}")
            return False, list(edit.edits)
        self.say(f"{path}: {'; '.join(edit.edits)} (backup {backup.name})")
        return True, []

    def reload(self) -> None:
        """Reloads the daemon and waits until its registry is the URL."""
        daemon, url = self.daemon, self.url
        if switch.same_registry(daemon.registry_url(), url):
            self.say(f"nbankd uses {url} already")
            return
        result = daemon.call("reload")
        for warning in result.get("warnings", []):
            warn(f"nbankd: {warning}")
        deadline = time.monotonic() + self.args.wait
        while True:
            registry = daemon.call("status").get("registry", {})
            if switch.same_registry(registry.get("url"), url):
                if registry.get("problem"):
                    warn(f"warning: nbankd: {registry['problem']}")
                self.say(f"nbankd now uses {url}")
                return
            if time.monotonic() > deadline:
                raise errors.ProblemsFound(
                    f"after reloading, nbankd still uses {registry.get('url')}",
                    hint="see its log (journalctl -u nbankd); the inboxes stay paused",
                )
            time.sleep(POLL)

    def catch_up(self) -> None:
        """Imports what reached the embedded registry after the export, until nothing does."""
        assert self.imported is not None
        for _ in range(CATCH_UP_ROUNDS):
            snap = self.read_embedded()
            if _records(snap) == _records(self.imported):
                return
            before = {r.name for r in self.imported.resources}
            new = sum(r.name not in before for r in snap.resources)
            self.say(
                f"the embedded registry changed since it was exported ({new} new resource(s)): "
                "importing again"
            )
            snap = self.export()
            if not self.import_changes(snap, self.imported, "the import above", header=False):
                raise errors.ProblemsFound(
                    "importing what reached the embedded registry during the switch found "
                    "problems (see above)",
                    hint="fix them, then run the same command again",
                )
        raise errors.ProblemsFound(
            "the embedded registry keeps changing during the switch",
            hint="is another nbankd depositing into it (with another control socket)? "
            "stop it, then run the same command again",
        )

    def check_daemon(self) -> None:
        """Re-pauses and catches up if the daemon restarted or was resumed meanwhile."""
        if self.daemon.running and not self.daemon.check():
            self.daemon.wait_idle(self.args.wait)
            self.catch_up()

    # -- the whole ------------------------------------------------------------------

    def run(self, report: Report) -> None:
        """Carries out the switch; records into ``report`` what stops or spoils it short
        of an error (import problems, hand edits needed, archives left)."""
        daemon = self.daemon
        if daemon.running and not self.dry_run:
            daemon.wait_idle(self.args.wait)
        snap = self.export()
        earlier = self.earlier_import() if self.rerun else None
        since = f"the export recorded with the move ({self.earlier_path})"
        if not self.import_changes(snap, earlier, since):
            warn(
                "the import found problems: fix them, then run the switch again"
                if self.rerun
                else "the import found problems: nothing was switched"
            )
            report.failed()
            return
        if self.dry_run:
            self.dry_run_rest(report)
            return
        self.credentials()
        seams.reached(BEFORE_NBANK_JSON)
        self.check_daemon()
        self.files_changed = True  # from here on, never resume a daemon half-switched
        problems = self.archives()
        seams.reached(AFTER_NBANK_JSON)
        self.record_move()
        done, edits = self.configuration()
        if not done:
            warn(
                f"make these edits in {self.path} by hand:\n"
                + "".join(f"  - {e}\n" for e in edits)
                + f"then run the same command again ('nbankctl registry switch --to {self.url}'"
                "): it imports what is left, reloads nbankd and resumes it"
            )
            report.failed()
            return
        seams.reached(AFTER_CONFIG)
        if daemon.running:
            self.check_daemon()
            self.reload()
        self.catch_up()
        self.finished = True
        if problems:
            warn(f"{problems} archive(s) still name the old registry: see above")
            report.failed(problems)
            return
        self.say(f"switched to {self.url}")

    def dry_run_rest(self, report: Report) -> None:
        self.credentials()
        problems = self.archives()
        done, edits = self.configuration()
        if not done:
            warn("the switch would stop here and ask for these edits: " + "; ".join(edits))
            report.failed()  # the configuration would need editing by hand
        report.failed(problems)  # archives whose nbank.json could not be rewritten
        self.say("(dry run: nothing was changed)")


def _records(snap: snapshot.Snapshot) -> tuple[Any, ...]:
    return (snap.datatypes, snap.archives, snap.resources, snap.locations)


def cmd_switch(args: argparse.Namespace, report: Report) -> None:
    run = Switch(args)
    daemon = run.daemon
    if not daemon.running:
        run.say(f"nbankd is not running (no answer on {daemon.path}): switching its files only")
    elif run.dry_run:
        run.say(f"nbankd runs ({daemon.path}); the switch would pause it first")
    else:
        daemon.pause()
    try:
        run.run(report)
    except BaseException:
        release(run)  # prints its own failure; the original error is the one raised
        raise
    if not release(run):
        report.failed()
    if args.json:  # the progress went to standard error; what became of it, here
        json.dump(
            {
                "registry": run.url,
                "previous": run.old_url,
                "config": str(run.path),
                "dry_run": run.dry_run,
                "switched": run.finished,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")


def register(
    rsub: Any, common: argparse.ArgumentParser, options: Callable[[argparse.ArgumentParser], None]
) -> None:
    pp = rsub.add_parser(
        "switch",
        parents=[common],
        help="move nbankd from its embedded registry to django-neurobank",
    )
    options(pp)
    pp.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for deposits in flight, and for the reload (default 600)",
    )
    pp.add_argument(
        "--socket",
        help="the daemon's control socket (default: control_socket of the configuration)",
    )
    pp.set_defaults(func=cmd_switch)


__all__ = ["Switch", "cmd_switch", "register"]
