"""``nbankctl registry switch --to URL``: move a running nbankd from its embedded registry.

In order, stopping at the first problem:

1. pause every inbox of the daemon (control socket) and wait until nothing is in
   flight, so no deposit registers in the embedded registry after the export;
2. export the embedded registry to ``state_dir/migration/export-<time>.jsonl``
   (kept: it holds the original creation times, which a server sets itself);
3. import it into the django-neurobank registry; any conflict or failure stops the
   switch here, with the daemon resumed on the embedded registry as before;
4. check the credentials the daemon will write with (``--registry-auth``, else the
   configuration's ``registry_auth``);
5. rewrite the ``registry`` field of each configured archive's ``nbank.json`` that
   names the embedded registry (backup ``nbank.json.bak-<time>`` beside it);
6. record the move in ``state_dir/registry-moves.jsonl`` (``nbankctl history``
   shows old receipts under the new URL; the receipts themselves never change);
7. point the configuration at the URL (backup ``<config>.bak-<time>``), or, when the
   file cannot be edited safely, print the exact edit and leave the daemon paused;
8. reload the daemon, check that it now uses the URL, and resume the inboxes this
   command paused.

Every step is idempotent: after an interruption, run the same command again. Once
step 5 has begun, a failure leaves the daemon paused (it would otherwise deposit
into a registry the archives no longer name); ``nbankctl resume`` after fixing.
Without a running daemon (no control socket answers) the files are switched and
the new configuration takes effect when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nbankctl.daemon_cmds import socket_path
from nbankctl.migrate import import_snapshot, target_url
from nbankd import errors
from nbankd.config import find_config_path, load_config
from nbankd.config.model import Config
from nbankd.control.client import ControlClient
from nbankd.migration import moves, snapshot, switch
from nbankd.registry import credentials
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry

IDLE_GRACE = 0.5  # the queue must stay empty this long (a scan may be journaling an item)
POLL = 0.2


def note(text: str) -> None:
    print(text, flush=True)


class Daemon:
    """The running nbankd, or None-like when no daemon answers (``client`` is None)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.client: ControlClient | None = ControlClient(path)
        self.paused_by_us: list[str] = []
        try:
            self.status = self.client.call("status")
        except errors.DaemonUnreachable:
            self.client = None
            self.status = {}

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert self.client is not None
        return self.client.call(cmd, args or {})

    def pause(self) -> None:
        already = {i["path"] for i in self.status.get("inboxes", []) if i.get("paused")}
        result = self.call("pause")
        self.paused_by_us = [k for k in result.get("paused", {}) if k not in already]
        note(f"paused {len(self.paused_by_us)} inbox(es) of nbankd ({self.path})")

    def wait_idle(self, timeout: float) -> None:
        """Waits until no deposit is in flight; DaemonUnreachable-free ProblemsFound if not."""
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            items = self.call("queue").get("items", [])
            now = time.monotonic()
            if items:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= IDLE_GRACE:
                note("no deposit in flight")
                return
            time.sleep(POLL)
        listing = "; ".join(
            f"{i.get('relpath')} ({i.get('state')}, {i.get('error') or i.get('status')})"
            for i in items[:5]
        )
        raise errors.ProblemsFound(
            f"deposits still in flight after {timeout:g} s: {listing}",
            hint="let them finish (nbankctl queue) or raise --wait, then run the switch again",
        )

    def resume(self) -> None:
        for key in self.paused_by_us:
            self.call("resume", {"inbox": key})
        if self.paused_by_us:
            note(f"resumed {len(self.paused_by_us)} inbox(es)")
        self.paused_by_us = []

    def reload_to(self, url: str, timeout: float) -> None:
        """Reloads the configuration and waits until the daemon's registry is ``url``."""
        result = self.call("reload")
        for warning in result.get("warnings", []):
            print(f"nbankctl: nbankd: {warning}", file=sys.stderr)
        deadline = time.monotonic() + timeout
        while True:
            registry = self.call("status").get("registry", {})
            if switch.same_registry(registry.get("url"), url):
                if registry.get("problem"):
                    print(f"nbankctl: warning: nbankd: {registry['problem']}", file=sys.stderr)
                note(f"nbankd now uses {url}")
                return
            if time.monotonic() > deadline:
                raise errors.ProblemsFound(
                    f"after reloading, nbankd still uses {registry.get('url')}",
                    hint="see its log (journalctl -u nbankd); the inboxes stay paused",
                )
            time.sleep(POLL)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _daemon_credentials(args: argparse.Namespace, config: Config, url: str) -> None:
    """Proves the credentials the daemon will use may write (when they are in a file)."""
    path = Path(args.registry_auth).absolute() if args.registry_auth else config.registry_auth
    if path is None:
        note(
            "note: the configuration names no registry_auth; nbankd will write with "
            "$CREDENTIALS_DIRECTORY/registry or its user's ~/.netrc"
        )
        return
    creds = credentials.load_file(path, credentials.registry_host(url))
    with HttpRegistry(url, creds) as reg:
        reg.check_credentials()
    note(f"credentials in {path} may write to {url}")


def _export(config: Config, stamp: str, dry_run: bool) -> tuple[snapshot.Snapshot, Path | None]:
    with EmbeddedRegistry(config.embedded_db_path, url=config.registry_url) as source:
        snap = snapshot.take(source)
    counts = ", ".join(f"{n} {k}(s)" for k, n in snap.counts().items())
    if dry_run:
        note(f"read the embedded registry {snap.source}: {counts}")
        return snap, None
    folder = config.state_dir / "migration"
    folder.mkdir(mode=0o750, exist_ok=True)
    path = folder / f"export-{stamp}.jsonl"
    snapshot.save(snap, path)
    owner = os.stat(config.state_dir)  # root runs this; the daemon's user owns state_dir
    for made in (folder, path):
        with contextlib.suppress(PermissionError):
            os.chown(made, owner.st_uid, owner.st_gid)
    note(f"exported the embedded registry {snap.source} to {path}: {counts}")
    return snap, path


def _archives(config: Config, old: str, new: str, stamp: str, dry_run: bool) -> int:
    """Rewrites nbank.json of each archive naming the old registry; returns problems."""
    problems = 0
    for archive in config.archives:
        update = switch.check_nbank_json(archive.nbank_json, old, new)
        if update.action == "rewrite":
            if dry_run:
                note(f"would point {update.path} at {new} (backup kept)")
                continue
            backup = switch.rewrite_nbank_json(update.path, new, stamp)
            note(f"{update.path}: registry -> {new} (backup {backup.name})")
        elif update.action == "unreadable":
            problems += 1
            print(f"nbankctl: {update.path} {update.message}", file=sys.stderr)
        else:
            note(f"{update.path} {update.message}")
    return problems


def _configuration(
    args: argparse.Namespace, path: Path, url: str, stamp: str
) -> tuple[bool, list[str]]:
    """Points the configuration at ``url``; (done, the edits to make by hand if not)."""
    auth = str(Path(args.registry_auth).absolute()) if args.registry_auth else None
    text = path.read_text(encoding="utf-8")
    edit = switch.edit_config_text(text, url, registry_auth=auth, stamp=stamp)
    if edit.text is not None and not edit.changed:
        note(f"{path} uses {url} already")
        return True, []
    why = edit.unsafe or switch.config_unsafe_reason(path)
    if why or edit.text is None:
        print(f"nbankctl: not editing {path}: {why}", file=sys.stderr)
        return False, list(edit.edits)
    if args.dry_run:
        note(f"would edit {path}: {'; '.join(edit.edits)} (backup kept)")
        return True, []
    backup = switch.write_config(path, edit.text, stamp, validate=load_config)
    note(f"{path}: {'; '.join(edit.edits)} (backup {backup.name})")
    return True, []


def cmd_switch(args: argparse.Namespace) -> int:
    url = target_url(args.to)
    path = find_config_path(getattr(args, "config", None))
    config = load_config(path)
    if not config.embedded:
        if switch.same_registry(config.registry, url):
            raise errors.UsageError(
                f"{path} uses {url} already: the switch is done",
                hint="if nbankd is still paused, run 'nbankctl reload' and 'nbankctl resume'",
            )
        raise errors.UsageError(
            f"{path} uses registry {config.registry}, not the embedded one",
            hint="'registry switch' moves an embedded registry; copy records between servers "
            "with 'nbankctl registry migrate -r OLD --to NEW'",
        )
    old = EmbeddedRegistry(config.embedded_db_path, url=config.registry_url)
    old_url = old.url
    old.close()
    stamp = _stamp()
    daemon = Daemon(socket_path(args))
    if daemon.client is None:
        note(f"nbankd is not running (no answer on {daemon.path}): switching its files only")
    elif args.dry_run:
        note(f"nbankd runs ({daemon.path}); the switch would pause it first")
        daemon.client = None  # a dry run neither pauses nor reloads it
    else:
        daemon.pause()
    keep_paused = False
    try:
        if daemon.client is not None:
            daemon.wait_idle(args.wait)
        snap, export_path = _export(config, stamp, args.dry_run)
        code = import_snapshot(args, snap, url)
        if code != errors.EXIT_OK:
            print(
                "nbankctl: the import found problems: nothing was switched",
                file=sys.stderr,
            )
            return code
        if args.dry_run:
            _archives(config, old_url, url, stamp, dry_run=True)
            _configuration(args, path, url, stamp)
            note("(dry run: nothing was changed)")
            return errors.EXIT_OK
        _daemon_credentials(args, config, url)
        keep_paused = True  # from here on, files change: never resume half-switched
        problems = _archives(config, old_url, url, stamp, dry_run=False)
        export = str(export_path) if export_path else None
        if moves.record_move(config.state_dir, old_url, url, time=stamp, export=export):
            note(f"recorded the move in {moves.moves_path(config.state_dir)}")
        done, edits = _configuration(args, path, url, stamp)
        if not done:
            print(
                f"nbankctl: make these edits in {path} by hand:\n"
                + "".join(f"  - {e}\n" for e in edits)
                + "then run 'nbankctl reload' and 'nbankctl resume'"
                + (" (nbankd stays paused until then)" if daemon.client else ""),
                file=sys.stderr,
            )
            return errors.EXIT_PROBLEMS
        if daemon.client is not None:
            daemon.reload_to(url, args.wait)
        keep_paused = False
        if problems:
            print(
                f"nbankctl: {problems} archive(s) could not be checked: see above", file=sys.stderr
            )
            return errors.EXIT_PROBLEMS
        note(f"switched to {url}")
        return errors.EXIT_OK
    finally:
        if daemon.client is not None:
            if keep_paused:
                print(
                    "nbankctl: nbankd stays paused: 'nbankctl resume' when ready", file=sys.stderr
                )
            else:
                daemon.resume()


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


__all__ = ["Daemon", "cmd_switch", "register"]
