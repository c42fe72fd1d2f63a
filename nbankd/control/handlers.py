"""What each control command does, as functions over the running :class:`Daemon`.

Every handler takes the daemon and the request's ``args`` and returns a
JSON-safe value (the reply's ``result``); it raises
:class:`~nbankd.control.protocol.ProtocolError` or an :class:`~nbankd.errors.NbankdError`
for an error reply. Handlers run in the control server's connection threads:
they read the daemon's shared state under its lock, and change it only through
small, thread-safe steps (flags, :meth:`Daemon.request_rescan`).
"""

from __future__ import annotations

import heapq
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from nbankd import errors
from nbankd.config import load_config, parse_duration
from nbankd.control import deposit_handlers, job_handlers, registry_check, status_handler
from nbankd.control.protocol import QUEUE_LIMIT, ProtocolError, no_nul, wait_arg
from nbankd.daemon import explain as explain_mod
from nbankd.daemon import requeue as requeue_mod
from nbankd.deposit import moves
from nbankd.deposit.receipts import read_receipts
from nbankd.timefmt import iso
from nbankd.watch import settle

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon
    from nbankd.daemon.view import InboxState

log = structlog.get_logger("nbankd.control")

Handler = Callable[["Daemon", dict[str, Any]], Any]
RELOAD_WAIT = 120.0
AUDIT_WAIT = 60.0
HISTORY_LIMIT = 50


# --- helpers -------------------------------------------------------------------------


def _arg(
    args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    value = args.get(name, default)
    if value is None:
        return default
    wrong_bool = isinstance(value, bool) and bool not in _as_tuple(kind)  # bool is an int
    if wrong_bool or not isinstance(value, kind):
        raise ProtocolError("usage", f"argument {name!r} must be {_kind_name(kind)}")
    if isinstance(value, str):
        no_nul(name, value)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _inboxes(daemon: Daemon) -> Mapping[str, InboxState]:
    return daemon.snapshot().inboxes


def resolve_inbox(daemon: Daemon, name: str) -> str:
    """The key of the inbox ``name`` designates: its path (as configured or resolved)
    or, when unambiguous, its folder's name."""
    inboxes = _inboxes(daemon)
    if name in inboxes:
        return name
    wanted = os.path.abspath(name)
    for key, state in inboxes.items():
        if wanted in (str(state.config.path), os.path.realpath(state.config.path)):
            return key
    if os.path.realpath(wanted) in {os.path.realpath(k) for k in inboxes}:
        return next(k for k in inboxes if os.path.realpath(k) == os.path.realpath(wanted))
    by_name = [k for k in inboxes if os.path.basename(k.rstrip("/")) == name]
    if len(by_name) == 1:
        return by_name[0]
    known = ", ".join(sorted(inboxes)) or "none"
    raise ProtocolError("not-found", f"no inbox {name!r} (inboxes: {known})")


def _inbox_keys(daemon: Daemon, args: dict[str, Any]) -> list[str]:
    name = _arg(args, "inbox", str)
    return [resolve_inbox(daemon, name)] if name else list(_inboxes(daemon))


def parse_since(value: Any, now: float) -> float | None:
    """``--since``: seconds since the epoch, a duration back from now, or an ISO date."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ProtocolError(
                "usage", f"'since' {value} is not a time: give seconds since the epoch"
            ) from None
    if not isinstance(value, str):
        raise ProtocolError("usage", "'since' must be a duration (24h) or an ISO date")
    if not (value.isdigit() and len(value) == 8):  # 20240501: a date, not seconds
        try:
            return now - parse_duration(value)
        except ValueError:
            pass
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.astimezone()  # a date without zone is local time
        return when.timestamp()
    except (ValueError, OverflowError):
        raise ProtocolError(
            "usage",
            f"--since {value!r} is neither a duration (30m, 24h, 7d) nor an ISO date "
            "this machine's clock can hold (2024-05-01, 20240501, 2024-05-01T10:00)",
        ) from None


# --- read-only commands --------------------------------------------------------------


QUEUE_SCAN_WAIT = 5.0  # seconds queue waits for a fresh scan of the inboxes


def queue(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Items in flight and the files waiting in inboxes, from a scan made for this
    request (``fresh`` False when it took over QUEUE_SCAN_WAIT: the last scan's). A
    reader's request reuses a scan younger than 2 s, so readers asking in a loop
    cannot keep the daemon rescanning; an admin's always gets a new scan.

    At most ``limit`` entries of each list are described (default and ceiling
    :data:`QUEUE_LIMIT`), so a backlog of 100 000 files costs the reply and the
    daemon's memory no more than that; ``counts`` has every entry counted, by state,
    and ``truncated`` says whether a list was cut short."""
    limit = _arg(args, "limit", int, QUEUE_LIMIT)
    if limit < 1 or limit > QUEUE_LIMIT:
        raise ProtocolError("usage", f"argument 'limit' must be 1 to {QUEUE_LIMIT}")
    fresh = daemon.fresh_scan(QUEUE_SCAN_WAIT, max_age=float(args.get("fresh_within", 2.0)))
    now = daemon.clock()
    items = daemon.journal.unfinished()
    snap = daemon.snapshot()
    running = snap.running
    waiting = {i.id for i in snap.waiting}
    inboxes = snap.inboxes
    out = []
    in_flight: Counter[str] = Counter()
    active: set[tuple[str, str]] = set()
    for item in items:
        active.add((item.inbox, item.relpath_str))
        status = "running" if item.id in running else "backoff" if item.id in waiting else "queued"
        in_flight[status] += 1
        if len(out) >= limit:
            continue
        out.append(
            {
                "token": item.token,
                "inbox": item.inbox,
                "relpath": item.relpath_str,
                "state": str(item.state),
                "status": status,
                "attempts": item.attempts,
                "next_attempt": iso(item.not_before) if item.not_before > now else None,
                "error_code": item.error_code,
                "error": item.error_message,
                "hint": item.error_hint,
                "id": item.name,
                "created": iso(item.created),
            }
        )
    pending = []
    waiting_files: Counter[str] = Counter()
    for key, state in inboxes.items():
        for rel, verdict in sorted(state.verdicts.items()):
            if (key, rel) in active:
                continue
            what = verdict.state.value
            if verdict.state is settle.State.READY and state.paused:
                what = "paused"
            waiting_files[what] += 1
            if len(pending) >= limit:
                continue
            pending.append(
                {
                    "inbox": key,
                    "relpath": rel,
                    "state": what,
                    "reason": verdict.reason,
                    "seconds_left": verdict.seconds_left,
                }
            )
    scanned = [s.last_scan for s in inboxes.values() if s.last_scan is not None]
    counts = {"items": dict(in_flight), "pending": dict(waiting_files)}
    return {
        "items": out,
        "pending": pending,
        "counts": counts,
        "truncated": sum(in_flight.values()) > len(out)
        or sum(waiting_files.values()) > len(pending),
        "fresh": fresh,
        "scanned": iso(min(scanned)) if scanned else None,
    }


def history(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    now = daemon.clock()
    inbox = _arg(args, "inbox", str)
    key = resolve_inbox(daemon, inbox) if inbox else None
    since = parse_since(args.get("since"), now)
    wanted_id = _arg(args, "id", str)
    limit = _arg(args, "limit", int, HISTORY_LIMIT)
    if limit < 0:
        raise ProtocolError("usage", "'limit' must be >= 0")

    def receipt_time(r: dict[str, Any]) -> float:
        try:
            return datetime.fromisoformat(str(r.get("time"))).timestamp()
        except ValueError:
            return 0.0

    def matches(r: Any) -> bool:
        if not isinstance(r, dict):
            return False
        if key is not None and r.get("inbox") != key:
            return False
        if wanted_id is not None and r.get("id") != wanted_id:
            return False
        return since is None or receipt_time(r) >= since

    matched = 0

    def found() -> Iterator[tuple[float, int, dict[str, Any]]]:
        """The matching receipts one at a time: only ``limit`` of them are ever held."""
        nonlocal matched
        for n, r in enumerate(read_receipts(daemon.config.state_dir / "receipts")):
            if matches(r):
                matched += 1
                yield receipt_time(r), n, r

    # receipt times have whole seconds: ties keep log order (appended later = newer)
    ordered = heapq.nlargest(limit, found()) if limit else sorted(found(), reverse=True)
    # receipts keep the URL of their deposit; show where the record lives now
    newest = moves.follow([r for _, _, r in ordered], daemon.config.state_dir)
    return {"receipts": newest, "matched": matched}


def explain(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    path = _file_path(args, "explain")
    if path is None:
        raise ProtocolError("usage", "explain needs a path")
    return explain_mod.explain(
        path,
        _inboxes(daemon),
        daemon.journal,
        now=daemon.clock(),
        config_source=daemon.config.source,
    )


# --- commands that change state ------------------------------------------------------


def _file_path(args: dict[str, Any], command: str) -> str | None:
    """The ``path`` argument of ``command``, when given: an absolute path that can name
    a file (the daemon's working directory is not the caller's; a lone surrogate
    encodes to no file name), else a usage error."""
    path = _arg(args, "path", str)
    if not path:
        return None
    if not os.path.isabs(path):
        raise ProtocolError("usage", f"{command} needs an absolute path, not {path!r}")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ProtocolError(
            "usage", f"argument 'path' holds a lone surrogate ({path!r}); no file name can"
        ) from None
    return path


def requeue(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    path = _file_path(args, "requeue")
    every = _arg(args, "all", bool, False)
    specs = daemon.snapshot().specs
    if every:
        if path:
            raise ProtocolError("usage", "give a path or --all-rejected, not both")
        inbox = _arg(args, "inbox", str)
        key = resolve_inbox(daemon, inbox) if inbox else None
        result = requeue_mod.requeue_all(specs, daemon.journal, inbox=key)
        done = result["requeued"]
    elif path:
        done = [requeue_mod.requeue(path, specs, daemon.journal)]
        result = {"requeued": done, "failed": []}
    else:
        raise ProtocolError("usage", "requeue needs a path, or --all-rejected")
    for key in {r["inbox"] for r in done}:
        daemon.request_rescan(key)
    for r in done:
        log.info("requeued", inbox=r["inbox"], source=r["requeued"], rejected=r["rejected_path"])
    return result


def _set_paused(daemon: Daemon, args: dict[str, Any], paused: bool) -> dict[str, Any]:
    keys = _inbox_keys(daemon, args)
    try:
        daemon.set_paused(keys, paused)  # recorded in state_dir first: kept across restarts
    except OSError as err:
        doing = f"recording the change in {daemon.config.state_dir}"
        limit = errors.process_limit_problem(err, doing)
        if limit is not None:  # nbankd's own limit: state_dir is not at fault
            raise ProtocolError(
                "process-limit",
                f"{limit}; nothing was changed",
                exit_code=errors.EXIT_UNREACHABLE,
            ) from None
        raise ProtocolError(
            "internal",
            f"cannot record the change in {daemon.config.state_dir}: {err}; nothing was "
            "changed (check that the daemon's user can write its state_dir)",
            exit_code=errors.EXIT_PROBLEMS,
        ) from None
    for key in keys:
        log.info("inbox paused" if paused else "inbox resumed", inbox=key)
    if not paused:
        for key in keys:
            daemon.request_rescan(key)
    return {
        "changed": keys,
        "paused": {k: s.paused for k, s in _inboxes(daemon).items()},
    }


def pause(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return _set_paused(daemon, args, True)


def resume(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return _set_paused(daemon, args, False)


def rescan(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    keys = _inbox_keys(daemon, args)
    for key in keys:
        daemon.request_rescan(key)
    return {"rescan": keys, "requested": iso(daemon.clock())}


def reload(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Reloads the configuration and says whether it applied: a bad file is the
    ConfigError listing its problems; a reload that fails after reading it (a folder
    that cannot be made) is an error naming why, the running configuration kept."""
    source = daemon.config.source
    # a bad file: the ConfigError becomes the reply; the running daemon keeps its
    # state_dir and control_socket (the loader warns when the file changes them)
    try:
        new = load_config(source, running=daemon.config)
    except errors.ConfigError:
        # the daemon's own reload fails the same way, so that it logs it and status
        # shows it until a reload succeeds, as for SIGHUP (it applies the file when it
        # was fixed meanwhile: status then says nothing of it)
        daemon.reload()
        raise
    outcome: list[str | None] = []

    def run() -> None:
        outcome.append(daemon.reload())  # this reload's own answer

    worker = threading.Thread(target=run, name="reload", daemon=True)
    worker.start()
    worker.join(RELOAD_WAIT)
    if not worker.is_alive() and not outcome:
        raise ProtocolError(
            "internal",
            "reload failed (see the daemon's log); the running configuration is kept",
            exit_code=errors.EXIT_PROBLEMS,
        )
    if outcome and outcome[0] is not None:
        raise errors.ConfigError(f"reload failed; {outcome[0]}")
    return {
        "source": str(source),
        "done": bool(outcome),
        "inboxes": len(new.inboxes),
        "warnings": [str(p) for p in new.warnings],
    }


def audit(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Queues an audit (``full``: re-hash everything) and returns its ticket
    (``request``) and state; with ``request`` given, reports on that one instead.
    Either way waits up to ``wait`` seconds (at most :data:`AUDIT_WAIT`) for it to
    finish. The state is ``queued``, ``running`` (with progress) or ``done`` (with
    the ``report``); nbankctl polls until ``done``."""
    auditor = daemon.auditor
    if auditor is None:
        raise ProtocolError(
            "internal",
            "audits are disabled in this daemon (see its log)",
            exit_code=errors.EXIT_PROBLEMS,
        )
    wait = wait_arg(args, "wait", AUDIT_WAIT)
    ticket = _arg(args, "request", str)
    if ticket is None:
        full = _arg(args, "full", bool, False)
        ticket = auditor.request(full)
        log.info("audit requested", request=ticket, full=full)
    state = auditor.wait(ticket, wait)
    if state is None:
        raise ProtocolError("not-found", f"no audit request or report {ticket!r}")
    return state


HANDLERS: dict[str, Handler] = {
    "status": status_handler.status,
    "queue": queue,
    "history": history,
    "explain": explain,
    "requeue": requeue,
    "pause": pause,
    "resume": resume,
    "rescan": rescan,
    "reload": reload,
    "audit": audit,
    "check-registry": registry_check.check_registry,
    "deposit": deposit_handlers.deposit,
    "deposit-status": deposit_handlers.deposit_status,
    **job_handlers.COMMANDS,
}


#: commands the dispatcher hands the peer (``args["peer"]``, a Peer only it can make):
#: what they read or move for the peer, the peer must be able to read or move itself
PEER_COMMANDS = job_handlers.PEER_COMMANDS | {"deposit", "check-registry"}


def dispatcher(daemon: Daemon) -> Callable[[str, dict[str, Any], Any], Any]:
    """The server's ``dispatch``: runs the named command over ``daemon``."""

    def dispatch(cmd: str, args: dict[str, Any], peer: Any) -> Any:
        handler = HANDLERS.get(cmd)
        if handler is None:
            raise ProtocolError("unknown-command", f"unknown command {cmd!r}")
        if cmd == "queue":  # set here, never by the client: readers reuse recent scans
            args = {**args, "fresh_within": 0.0 if getattr(peer, "admin", False) else 2.0}
        if cmd in PEER_COMMANDS:  # set here, never by the client
            args = {**args, "peer": peer}
        return handler(daemon, args)

    return dispatch


__all__ = ["HANDLERS", "dispatcher", "parse_since", "resolve_inbox"]
