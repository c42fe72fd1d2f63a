"""``nbankctl`` commands that talk to the running daemon over its control socket.

``status | queue | history | explain FILE | requeue FILE|--all-rejected [INBOX] |
pause [INBOX] | resume [INBOX] | rescan [INBOX] | audit [--full] | reload``

The socket is ``--socket PATH``, else the configuration's ``control_socket``
(``-c FILE``, ``$NBANKD_CONFIG``, else ``/etc/nbankd/config.yaml``; when the
default file is missing or unreadable, the default socket path). Output is a
readable summary; ``--json`` prints the reply's result as JSON. Exit status:
0 ok, 1 problems (status degraded, audit findings, some inputs not requeued), 2 usage,
configuration or permission (``audit`` while the daemon's audits are disabled), 3
daemon unreachable (``audit``: or the registry, with nothing else wrong).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbankctl import render
from nbankctl.report import Handler, Report
from nbankd import errors
from nbankd.audit.model import REGISTRY_OUTAGE_CODES
from nbankd.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, find_config_path, load_config
from nbankd.config.model import DEFAULT_CONTROL_SOCKET
from nbankd.control.client import DEFAULT_TIMEOUT, NOT_RUNNING_HINT, ControlClient
from nbankd.control.protocol import QUEUE_LIMIT, READ_COMMANDS

#: seconds each ``audit`` request waits in the daemon before nbankctl asks again
AUDIT_POLL = 30.0
#: seconds read-only commands wait for an answer by default (a stopped daemon: exit 3)
READ_TIMEOUT = 10.0


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket to use (see the module docstring)."""
    if getattr(args, "socket", None):
        return Path(os.path.abspath(args.socket))
    explicit = bool(getattr(args, "config", None) or os.environ.get(CONFIG_ENV))
    path = find_config_path(getattr(args, "config", None))
    if not explicit and path == DEFAULT_CONFIG_PATH:
        try:
            return load_config(path).control_socket
        except errors.ConfigError:
            return DEFAULT_CONTROL_SOCKET
    return load_config(path).control_socket


def client(args: argparse.Namespace, cmd: str) -> ControlClient:
    """A client for the socket :func:`socket_path` picks, with ``--timeout`` (else a
    short one for read-only commands), whose "not running" hint names how that
    daemon would be started."""
    hint = NOT_RUNNING_HINT
    if getattr(args, "socket", None):
        hint = "start the daemon that owns this socket, or give the right --socket"
    elif getattr(args, "config", None) or os.environ.get(CONFIG_ENV):
        config = shlex.quote(str(find_config_path(getattr(args, "config", None))))
        hint = f"start it with: nbankd -c {config}"
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = READ_TIMEOUT if cmd in READ_COMMANDS else DEFAULT_TIMEOUT
    return ControlClient(socket_path(args), timeout=timeout, hint=hint)


def _call(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None) -> Any:
    return client(args, cmd).call(cmd, cmd_args or {})


def _emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    render.write(render.to_json(result) if getattr(args, "json", False) else human(result))


# --- handlers ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, report: Report) -> None:
    result = _call(args, "status")
    _emit(args, result, render.status)
    if result.get("degraded"):
        report.failed()


def cmd_queue(args: argparse.Namespace, report: Report) -> None:
    request: dict[str, Any] = {}
    if args.limit is not None:
        if not 1 <= args.limit <= QUEUE_LIMIT:
            raise errors.UsageError(f"--limit must be 1 to {QUEUE_LIMIT}")
        request["limit"] = args.limit
    _emit(args, _call(args, "queue", request), render.queue)


def cmd_history(args: argparse.Namespace, report: Report) -> None:
    if args.limit is not None and args.limit < 0:
        raise errors.UsageError("--limit must be 0 or more")
    request: dict[str, Any] = {"limit": args.limit}
    if args.inbox:
        request["inbox"] = _inbox_arg(args.inbox)
    if args.since:
        request["since"] = args.since
    if args.id:
        request["id"] = args.id
    _emit(args, _call(args, "history", request), render.history)


def cmd_explain(args: argparse.Namespace, report: Report) -> None:
    _emit(args, _call(args, "explain", {"path": os.path.abspath(args.file)}), render.explain)


def cmd_requeue(args: argparse.Namespace, report: Report) -> None:
    if args.all_rejected:
        request: dict[str, Any] = {"all": True}
        if args.target:
            request["inbox"] = _inbox_arg(args.target)
    elif args.target:
        request = {"path": os.path.abspath(args.target)}
    else:
        raise errors.UsageError("requeue needs FILE, or --all-rejected [INBOX]")
    result = _call(args, "requeue", request)
    if getattr(args, "json", False):
        render.write(render.to_json(result))
    else:
        out, err = render.requeue(result)
        if out:
            render.write(out)
        if err:
            render.write(err, sys.stderr)
    if result.get("failed"):
        report.failed()


def _inbox_arg(value: str) -> str:
    """An inbox given as a path is sent absolute; a bare folder name is sent as is."""
    return os.path.abspath(value) if os.sep in value or value in (".", "..") else value


def _inbox_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"inbox": _inbox_arg(args.inbox)} if args.inbox else {}


def cmd_pause(args: argparse.Namespace, report: Report) -> None:
    _emit(args, _call(args, "pause", _inbox_request(args)), lambda r: render.paused(r, "paused"))


def cmd_resume(args: argparse.Namespace, report: Report) -> None:
    result = _call(args, "resume", _inbox_request(args))
    _emit(args, result, lambda r: render.paused(r, "resumed"))


def cmd_rescan(args: argparse.Namespace, report: Report) -> None:
    _emit(args, _call(args, "rescan", _inbox_request(args)), render.rescan)


def cmd_audit(args: argparse.Namespace, report: Report) -> None:
    """Runs an audit now and waits for its report: exit 0 clean, 1 anything wrong, 3
    when the only thing wrong is that the registry could not be reached (2 when the
    daemon's audits are disabled: the error names the cache file and the fix)."""
    daemon = client(args, "audit")
    wait = min(AUDIT_POLL, daemon.timeout / 2)  # each request answers within --timeout
    state = daemon.call("audit", {"full": bool(args.full), "wait": wait})
    ticket = state.get("request")
    progress = not getattr(args, "json", False) and sys.stderr.isatty()
    while state.get("state") != "done":
        if state.get("state") == "cancelled":
            raise errors.DaemonUnreachable(
                "nbankd stopped before the audit finished (it resumes when nbankd starts again)"
            )
        if progress:
            render.write(render.audit_progress(state), sys.stderr)
        state = daemon.call("audit", {"request": ticket, "wait": wait})
    audit = state["report"]
    _emit(args, audit, render.audit)
    if audit.get("ok"):
        pass
    elif _registry_outage(audit):
        report.unreachable()  # the only thing wrong: the registry could not be reached
    else:
        report.failed()


def _registry_outage(audit: dict[str, Any]) -> bool:
    """Nothing found, and every error says the registry could not be reached."""
    if "registry_outage" in audit:
        return bool(audit["registry_outage"])
    codes = {a.get("error_code") for a in audit.get("archives") or () if a.get("error")}
    if audit.get("error"):
        codes.add(audit.get("error_code"))
    return not audit.get("findings") and bool(codes) and codes <= REGISTRY_OUTAGE_CODES


def cmd_reload(args: argparse.Namespace, report: Report) -> None:
    _emit(args, _call(args, "reload"), render.reload)


# --- parser --------------------------------------------------------------------------


def _options() -> argparse.ArgumentParser:
    """``-c``, ``--json``, ``--debug``, ``--socket`` and ``--timeout`` for each daemon
    command.

    Not ``cli``'s shared ``common`` parser: argparse copies a sub-parser's defaults
    over what the main parser parsed, so ``nbankctl -c FILE status`` would lose
    ``-c``. Defaults here are SUPPRESS, so the option works before or after the
    command name (the main parser supplies the defaults).
    """
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        help="nbankd configuration (default: $NBANKD_CONFIG or /etc/nbankd/config.yaml)",
    )
    opts.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    opts.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug messages on stderr (never credentials)",
    )
    opts.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's control socket (default: control_socket of the configuration)",
    )
    opts.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        help=f"how long to wait for the daemon's answer before exit 3 (default: "
        f"{READ_TIMEOUT:g} s for status, queue, history and explain; "
        f"{DEFAULT_TIMEOUT:g} s for the others)",
    )
    return opts


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parents = [_options()]

    def add(name: str, func: Handler, help: str) -> Any:
        p = subparsers.add_parser(name, parents=parents, help=help, description=help)
        p.set_defaults(func=func)
        return p

    add("status", cmd_status, "the daemon's health; exits 1 when degraded")
    p = add("queue", cmd_queue, "deposits in flight and files waiting in inboxes")
    p.add_argument(
        "--limit",
        type=int,
        help=f"list at most this many of each (1 to {QUEUE_LIMIT}, the default; "
        "every one is counted)",
    )
    p = add("history", cmd_history, "receipts of deposits, newest first")
    p.add_argument("--inbox", help="only this inbox (path, or folder name)")
    p.add_argument("--since", help="only since then: a duration back (24h, 7d) or an ISO date")
    p.add_argument("--id", help="only the deposit with this identifier")
    p.add_argument("--limit", type=int, default=50, help="at most this many (0: all; default 50)")
    p = add("explain", cmd_explain, "why a file is, or is not, being deposited")
    p.add_argument(
        "file", metavar="FILE", help="a path in an inbox, its rejected folder, or an original path"
    )
    p = add("requeue", cmd_requeue, "move a rejected input back into its inbox")
    p.add_argument(
        "target",
        nargs="?",
        metavar="FILE|INBOX",
        help="the rejected file or its original path; with --all-rejected, an inbox",
    )
    p.add_argument(
        "--all-rejected",
        action="store_true",
        help="requeue every rejected input (of INBOX, else of every inbox)",
    )
    for name, func, text in (
        ("pause", cmd_pause, "stop claiming new files (all inboxes when none is given)"),
        ("resume", cmd_resume, "claim files again (all inboxes when none is given)"),
        ("rescan", cmd_rescan, "scan inboxes now (all when none is given)"),
    ):
        p = add(name, func, text)
        p.add_argument("inbox", nargs="?", metavar="INBOX", help="inbox path or folder name")
    p = add(
        "audit",
        cmd_audit,
        "audit archives against the registry now and wait for the report; exits 1 on problems",
    )
    p.add_argument("--full", action="store_true", help="re-hash every resource (full scrub)")
    add("reload", cmd_reload, "re-read the configuration file")
