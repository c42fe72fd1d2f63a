"""The ``nbankd`` command: run the daemon in the foreground, or check a configuration."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from nbankd import errors
from nbankd.errors import exit_code_for
from nbankd.versions import version_text

WEDGE_AFTER_DEFAULT = 900.0


class _Version(argparse.Action):
    """``--version``: nbankd's version and its libraries', on one unwrapped line."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kw: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nbankd",
        description="Deposit files dropped into watched inboxes into neurobank archives.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the versions in use and exit")
    p.add_argument(
        "-c",
        "--config",
        help="configuration file (default: $NBANKD_CONFIG or /etc/nbankd/config.yaml)",
    )
    p.add_argument(
        "--adopt-archives",
        action="store_true",
        help="with an empty embedded registry (a lost state_dir), register every resource "
        "already stored in the configured archives, marked adopted, then run; run it "
        "again to finish an adoption cut short",
    )
    sub = p.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate and explain a configuration")
    check.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    check.add_argument("--offline", action="store_true", help="do not ask the registry")
    return p


class Liveness:
    """From the main loop: STATUS updates, and watchdog pings while workers make progress.

    A worker that has been inside one step for longer than ``wedge_after`` seconds
    stops the pings, so systemd restarts a hung daemon (``WatchdogSec=``).
    """

    STATUS_EVERY = 5.0

    def __init__(self, notifier: Any, wedge_after: float) -> None:
        from nbankd.service.notify import Heartbeat

        self.notifier = notifier
        self.heartbeat = Heartbeat()
        self.wedge_after = wedge_after
        self.watchdog_every = notifier.watchdog_interval()
        self.interval = min(self.watchdog_every or self.STATUS_EVERY, self.STATUS_EVERY)
        self._next = 0.0
        self._last_status = ""
        self._withheld = False

    def extend_timeout(self, usec: int, status: str | None = None) -> bool:
        """Asks systemd for ``usec`` more microseconds to finish starting (a long
        adoption), with ``status`` its one-line status; a no-op outside systemd."""
        return bool(self.notifier.extend_timeout(usec, status))

    def tick(self, daemon: Any) -> float:
        now = time.monotonic()
        self.heartbeat.beat("main", now)
        if now >= self._next:
            if self.watchdog_every is not None:
                stale = self.notifier.watchdog_if_healthy(self.heartbeat, self.wedge_after, now)
                if stale and not self._withheld:
                    from nbankd.daemon.service import log

                    log.error(
                        "worker not making progress; withholding watchdog ping", workers=stale
                    )
                self._withheld = bool(stale)
            status = daemon.status_line()
            if status != self._last_status:
                self.notifier.status(status)
                self._last_status = status
            self._next = now + self.interval
        return max(0.05, self._next - now)


def run(config_path: str | None, *, adopt_archives: bool = False) -> int:
    from nbankd import seams
    from nbankd.config import find_config_path, load_config
    from nbankd.control import start_control_server
    from nbankd.control.alerts import start_alerts
    from nbankd.control.metrics import start_metrics
    from nbankd.daemon.service import Daemon, install_signal_handlers
    from nbankd.service.capabilities import keep_capabilities_to_self
    from nbankd.service.limits import SPARE, check_open_file_limit
    from nbankd.service.logs import configure_logging
    from nbankd.service.logwriter import start_writer
    from nbankd.service.notify import Notifier

    check_open_file_limit()  # exit 2 naming LimitNOFILE=, never a failure half-way
    SPARE.hold()  # first: a low number, free for the control socket's accept()
    config = load_config(find_config_path(config_path), filesystem=True)
    configure_logging(config.log.format, config.log.level)
    if not keep_capabilities_to_self():  # CAP_LEASE is the daemon's, never its readers'
        structlog.get_logger("nbankd").warning(
            "cannot clear the ambient capabilities: metadata readers inherit CAP_LEASE"
        )
    notifier = Notifier()
    liveness = Liveness(notifier, seams.wedge_after(WEDGE_AFTER_DEFAULT))
    daemon = Daemon(
        config,
        notifier=liveness,
        adopt_archives=adopt_archives,
        serve=start_control_server,
        serve_metrics=start_metrics,
        serve_alerts=start_alerts,
    )
    install_signal_handlers(daemon)
    try:
        start_writer()  # logs from a queue from now on: deposits never wait on them
        daemon.start()
    except errors.ProcessLimit as err:  # exit 2, as for a limit found too low above
        raise errors.ConfigError(err.message, hint=err.hint) from err
    except (OSError, RuntimeError) as err:
        problem = errors.process_limit_problem(err, "starting")
        if problem is None:
            raise
        raise errors.ConfigError(problem) from err
    notifier.ready(daemon.status_line())
    try:
        daemon.run()
    finally:
        notifier.stopping("stopping: parking in-flight items")
        daemon.shutdown()
    return 0


def check_config(config_path: str | None, *, offline: bool) -> int:
    from nbankd.config import (
        check_against_registry,
        check_paths,
        describe_config,
        find_config_path,
        parse_config,
    )

    path = find_config_path(config_path)
    config, problems = parse_config(path, filesystem=True)
    if config is not None:
        problems += check_paths(config)
    print(f"# configuration: {path}")
    if config is not None:
        print(describe_config(config))
    errors_found = [p for p in problems if p.is_error]
    for p in problems:
        print(f"{p.severity}: {p}", file=sys.stderr)
    if config is None or errors_found:
        return errors.EXIT_USAGE
    if offline:
        print("# registry not asked (--offline)")
        return errors.EXIT_OK
    if config.embedded:
        print("# registry: embedded (datatypes and archives are created at start)")
        return errors.EXIT_OK
    from nbankd.registry.factory import open_registry

    registry = open_registry(config.registry, registry_auth=config.registry_auth)
    try:
        found = check_against_registry(config, registry)
    finally:
        registry.close()
    for p in found:
        print(f"{p.severity}: {p}", file=sys.stderr)
    if any(p.code == "registry-unavailable" for p in found):
        return errors.EXIT_UNREACHABLE
    if any(p.is_error for p in found):
        return errors.EXIT_USAGE
    print(f"# registry {config.registry}: datatypes, archives and credentials OK")
    return errors.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _decided(lambda: check_config(args.config_sub or args.config, offline=args.offline))
    code = _decided(lambda: run(args.config, adopt_archives=args.adopt_archives))
    _leave_stuck_steps(code)
    from nbankd.service import logwriter

    logwriter.flush()  # the last lines out, waiting a little for a stuck output
    return code


def _decided(command: Callable[[], int]) -> int:
    """The exit status of ``command``: its own, or the one its error decides (the
    error said on stderr within a deadline: a pipe nobody reads never holds the exit)."""
    try:
        return command()
    except errors.NbankdError as err:
        from nbankd.service import logwriter

        logwriter.say_within(sys.stderr, f"nbankd: {err}")
        return exit_code_for(err)
    except KeyboardInterrupt:
        return 130


#: how long the daemon's exit waits for threads still running after its stop's grace
EXIT_JOIN = 1.0


def _leave_stuck_steps(code: int) -> None:
    """Ends the process with ``code`` now if a thread is still running a second after
    the stop's grace (a step waiting on a registry that never answers): the
    interpreter's exit would join it and outlast the service manager's stop timeout.
    Every step is journaled before it runs, so an abandoned one resumes at the next
    start, as after ``kill -9``."""
    from nbankd.service import logwriter

    me = threading.current_thread()
    deadline = time.monotonic() + EXIT_JOIN
    others = [t for t in threading.enumerate() if t is not me and not logwriter.is_writer(t)]
    for thread in others:  # a pool's threads are joined at exit, even daemon ones
        thread.join(max(0.0, deadline - time.monotonic()))  # (started from one, they are)
    stuck = [t.name for t in others if t.is_alive()]
    if not stuck:
        return
    structlog.get_logger("nbankd").warning(
        "steps still running after the stop's grace are left to the journal; they "
        "resume at the next start",
        threads=stuck[:8],
    )
    logwriter.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
