"""Telling people when something is wrong: the alert service and its notifiers.

Every ``alerts.check_every`` (default 30 s) a thread reads the status document, decides with
:mod:`nbankd.control.alert_rules` what to tell, and sends one message to each
configured notifier: a webhook (a JSON POST, with ``Authorization: Bearer`` from
``token_file``) and email (SMTP, STARTTLS unless turned off, credentials from
``auth_file``: ``user:password``). Each notifier keeps its own alerting state: a
notifier that fails never holds up deposits nor the other notifier; its message is
tried again at the next check, then less often while it keeps failing (``check_every``
doubled each time, at most :data:`MAX_BACKOFF`: a refused password is not retried
every 30 s all weekend), and the failure shows in ``nbankctl status``
(:attr:`AlertService.problem`) until a send succeeds. Any error of a notifier counts
as a failed send, and a send that has not finished after :func:`send_deadline` is
given up (an SMTP or HTTP server that trickles its answer holds nothing).

What each notifier has told is kept in ``state_dir`` (:mod:`nbankd.control.alert_memory`),
so a problem told before a restart and gone after it is resolved.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
import structlog

from nbankd import errors
from nbankd.config.model import AlertsConfig, EmailConfig, WebhookConfig
from nbankd.control import alert_memory, alert_rules
from nbankd.control.alert_status import degraded_conditions
from nbankd.daemon import requeue
from nbankd.names import without_controls
from nbankd.registry import credentials
from nbankd.registry.http_transport import NO_AUTH, settle_environment
from nbankd.smallfile import SmallFileError, read_regular

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon
    from nbankd.daemon.view import InboxState

log = structlog.get_logger("nbankd.alerts")

SEND_TIMEOUT = 20.0  # seconds each connection or read may take
MAX_BACKOFF = 600.0  # at most this long between two tries of a notifier that fails


def send_deadline() -> float:
    """Seconds a whole send may take (each read may take :data:`SEND_TIMEOUT`: a
    server sending one line at a time would hold it forever)."""
    return 2 * SEND_TIMEOUT


#: a bearer token is a line; a token file this large is not one
TOKEN_MAX_BYTES = 64 << 10


def _token(path: Path) -> str:
    """The first line of a webhook's token file; OSError naming it when it cannot be
    read or is empty (never a request sent with an empty token)."""
    try:
        raw, _st = read_regular(path, TOKEN_MAX_BYTES)
    except SmallFileError as err:
        if err.errno in errors.DESCRIPTOR_ERRNOS:  # nbankd's limit: the file is not at fault
            short = OSError(err.errno, err.strerror)
            doing = f"reading the webhook's token_file {path}"
            raise errors.open_file_limit(short, doing) from None
        why = {
            "missing": "does not exist",
            "not-regular": f"is {err.noun}, not a regular file",
            "too-large": f"is larger than {TOKEN_MAX_BYTES // 1024} KiB",
        }.get(err.reason, f"cannot be read: {err.strerror}")
        raise OSError(f"the webhook's token_file {path} {why}") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise OSError(f"the webhook's token_file {path} is not UTF-8 text") from None
    if not lines or not lines[0].strip():
        raise OSError(f"the webhook's token_file {path} is empty")
    token = lines[0].strip()
    if not (token.isascii() and token.isprintable()):
        raise OSError(
            f"the webhook's token_file {path} holds characters an HTTP header cannot "
            "carry (only printable ASCII)"
        )
    return token


def shown_url(url: str) -> str:
    """A webhook URL as logs and status may show it: scheme and host only (chat
    services put their secret in the path or the query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/..."


def send_webhook(
    cfg: WebhookConfig, message: alert_rules.Message, host: str, now: float | None = None
) -> None:
    headers = {"Content-Type": "application/json"}
    if cfg.token_file is not None:
        headers["Authorization"] = f"Bearer {_token(cfg.token_file)}"
    when = time.time() if now is None else now
    body = {**message.to_json(host, when), "text": message.text()}
    shown = shown_url(cfg.url)
    # the environment's proxy and CA bundle, never ~/.netrc's credentials (a ``default``
    # entry would go to any host, and would replace the token); no redirect followed,
    # so the message and token go nowhere but the configured URL
    with requests.Session() as session:
        try:
            settle_environment(session, cfg.url)
            resp = session.post(
                cfg.url,
                data=json.dumps(body),
                headers=headers,
                auth=NO_AUTH,
                timeout=SEND_TIMEOUT,
                allow_redirects=False,
            )
        except (requests.RequestException, ValueError, OSError) as err:  # its text names the URL
            short = descriptor_shortage(err)
            if short is not None:  # no socket for want of a descriptor: not the webhook's fault
                raise errors.open_file_limit(short, f"sending the alert to {shown}") from None
            raise OSError(f"webhook {shown} unreachable ({type(err).__name__})") from None
    if 300 <= resp.status_code < 400:
        raise OSError(
            f"webhook {shown} answered {resp.status_code}, a redirect: set alerts' webhook "
            "url to the address it points to"
        )
    if resp.status_code >= 400:
        raise OSError(f"webhook {shown} answered {resp.status_code}")


def descriptor_shortage(err: BaseException) -> OSError | None:
    """The EMFILE or ENFILE behind ``err`` (requests and urllib3 wrap the socket's
    error: causes, contexts, a ``reason``, arguments), or None."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if errors.out_of_descriptors(e):
            assert isinstance(e, OSError)
            return e
        around = (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
        todo += [x for x in around if isinstance(x, BaseException)]
    return None


def mail_text(text: str) -> str:
    """``text`` as an email body can carry it: each line :func:`without_controls` (a
    name's bytes that are not UTF-8, or its control characters, as ``\\xNN``; the
    names in alerts are already shown through :func:`~nbankd.names.printable`, so a
    backslash in one stays as printable wrote it)."""
    return "\n".join(without_controls(line) for line in text.split("\n"))


#: (SMTP host, port) -> the thread of a send given up on that has not ended yet
_hanging: dict[tuple[str, int], threading.Thread] = {}
_hanging_lock = threading.Lock()


def send_email(cfg: EmailConfig, message: alert_rules.Message, host: str) -> None:
    """Sends ``message``; gives up (TimeoutError) after :func:`send_deadline`.

    The exchange runs in a thread of its own. At the deadline its connection is shut
    down, which ends the read it waits on at once; a server still greeting then (the
    connection is not ours to cut before the greeting ends) holds only that thread,
    and no other send goes to that server until it has ended."""
    mail = EmailMessage()
    mail["Subject"] = message.subject(host)
    mail["From"] = cfg.from_
    mail["To"] = ", ".join(cfg.to)
    mail.set_content(mail_text(message.text()))
    server = cfg.smtp
    with _hanging_lock:
        earlier = _hanging.get(server)
        if earlier is not None and earlier.is_alive():
            raise TimeoutError(
                f"SMTP server {server[0]}:{server[1]} still holds a send given up on earlier"
            )
        _hanging.pop(server, None)
    connected: list[smtplib.SMTP] = []
    outcome: list[Exception | None] = []
    done = threading.Event()

    def run() -> None:
        try:
            _exchange(cfg, mail, connected)
        except Exception as err:  # handed to the caller below
            outcome.append(err)
        else:
            outcome.append(None)
        finally:
            done.set()

    worker = threading.Thread(target=run, name="smtp", daemon=True)
    worker.start()
    deadline = send_deadline()
    if not done.wait(deadline):
        for smtp in connected:
            sock = smtp.sock
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if not done.wait(1.0):
            with _hanging_lock:
                _hanging[server] = worker
        raise TimeoutError(
            f"SMTP server {server[0]}:{server[1]} had not finished after {deadline:g}s"
        )
    if not outcome:
        raise RuntimeError("the SMTP exchange ended without a result")
    if outcome[0] is not None:
        raise outcome[0]


def _exchange(cfg: EmailConfig, mail: EmailMessage, connected: list[smtplib.SMTP]) -> None:
    """The SMTP exchange of one mail; the connection goes in ``connected`` once open."""
    smtp_host, port = cfg.smtp
    with smtplib.SMTP(smtp_host, port, timeout=SEND_TIMEOUT) as smtp:
        connected.append(smtp)
        if cfg.starttls:
            # the server's certificate is checked (system CAs, or cafile): credentials
            # are never sent to whoever answers on the SMTP port
            cafile = str(cfg.cafile) if cfg.cafile is not None else None
            smtp.starttls(context=ssl.create_default_context(cafile=cafile))
        if cfg.auth_file is not None:  # user:password, or netrc lines for the SMTP host
            creds = credentials.load_file(cfg.auth_file, smtp_host)
            smtp.login(creds.username, creds.password)
        smtp.send_message(mail)


class AlertService:
    """The thread that checks and tells; :meth:`stop` ends it."""

    def __init__(self, daemon: Daemon, cfg: AlertsConfig) -> None:
        self.daemon = daemon
        self.cfg = cfg
        self.host = socket.gethostname()
        #: each notifier's alerting state: one that fails is retried alone, and the
        #: others do not receive the message again
        self.states: dict[str, alert_rules.State] = {}
        self.problem: str | None = None  # why the last send failed, shown in status
        self._failures: dict[str, int] = {}  # notifier -> failed sends in a row
        self._retry_at: dict[str, float] = {}  # notifier -> not tried again before
        self._failed: dict[str, str] = {}  # notifier -> its last error
        self.sent = 0
        self._busy: dict[str, threading.Thread] = {}  # notifier -> a send given up on
        self._state_dir = daemon.config.state_dir
        self.states.update(alert_memory.load(self._state_dir, [n for n, _ in self._notifiers()]))
        self._kept = alert_memory.fingerprint(self.states)  # as alerts.json holds them
        self._keep_problem: str | None = None
        #: why rejected folders could not be listed at the last check (logged once)
        self._listing_problems: set[str] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alerts", daemon=True)
        self._thread.start()

    def check(self, now: float | None = None) -> alert_rules.Message | None:
        """One check: decides and sends; returns the message sent or tried."""
        from nbankd.control import status_handler

        now = time.time() if now is None else now
        status = status_handler.status(self.daemon, {})
        snap = self.daemon.snapshot()
        expect = {str(i.path): i.expect_every for i in snap.config.inboxes if i.expect_every}
        rejected, unlisted = self._rejected(snap.inboxes)
        auditor = self.daemon.auditor
        report = auditor.last if auditor is not None else None
        present = alert_rules.conditions(
            status,
            snap.tally.last_deposit,
            expect,
            now=now,
            started=snap.started,
            unavailable_after=self.cfg.unavailable_after,
            rejected=rejected,
            unfinished=self.daemon.journal.unfinished(),
            audit=report,
        )
        present += degraded_conditions(status, self.cfg.unavailable_after)
        # no audit report yet (audits disabled, none run): findings told before are not
        # known to be gone
        hold = alert_rules.audit_held(report) if report is not None else ["audit:"]
        hold += alert_rules.rejected_held(unlisted)  # not listed now: not known to be gone
        sent: alert_rules.Message | None = None
        failures = []
        for name, send in self._notifiers():
            old = self.states.get(name, alert_rules.State())
            new, message = alert_rules.step(
                old,
                present,
                now=now,
                repeat_every=self.cfg.repeat_every,
                group_wait=self.cfg.group_wait,
                hold=hold,
            )
            if message is None:
                self.states[name] = new
                continue
            if now < self._retry_at.get(name, 0.0):  # backing off after failures
                self.states[name] = alert_rules.unsent(new, old, message)
                failures.append(self._failed[name])
                continue
            sent = message
            try:
                self._send_within(name, send, message)
            except Exception as err:  # whatever it is, this message did not go out
                self.states[name] = alert_rules.unsent(new, old, message)
                self._failures[name] = self._failures.get(name, 0) + 1
                backoff = self.cfg.check_every * 2 ** (self._failures[name] - 1)
                self._retry_at[name] = now + min(backoff, MAX_BACKOFF)
                self._failed[name] = f"{name}: {_reason(err)}"
                failures.append(self._failed[name])
            else:
                self.states[name] = new
                self._failures.pop(name, None)
                self._retry_at.pop(name, None)
                self.sent += 1
                log.info(
                    "alert sent",
                    notifier=name,
                    problems=len(message.problems),
                    resolved=len(message.resolved),
                )
        if failures:
            problem = "alerts could not be sent (" + "; ".join(failures) + "); tried again"
            if problem != self.problem:
                log.warning("alert not sent", error=problem)
            self.problem = problem
        else:
            self.problem = None
        self._keep()
        return sent

    def _rejected(
        self, inboxes: Mapping[str, InboxState]
    ) -> tuple[dict[str, list[str]], list[str]]:
        """Inbox -> the paths in its rejected folders, and the inboxes whose folders
        could not be listed for want of file descriptors (EMFILE, ENFILE; none listed
        for them): nbankd's open-file limit, logged once while it lasts (status tells
        it too), not an error of the alert check at each ``check_every``."""
        rejected: dict[str, list[str]] = {}
        unlisted: list[str] = []
        problems: set[str] = set()
        for key, state in inboxes.items():
            try:
                rejected[key] = [str(p) for p in requeue.rejected_contents(state.config).entries]
            except OSError as err:
                problem = errors.process_limit_problem(
                    err, f"listing the rejected folders of {key} for alerts"
                )
                if problem is None:
                    raise
                rejected[key] = []  # not the count status may have: its inputs are held
                unlisted.append(key)
                problems.add(problem)
        for problem in sorted(problems - self._listing_problems):
            log.warning("rejected inputs not listed for alerts", error=problem)
        self._listing_problems = problems
        return rejected, unlisted

    def _send_within(
        self, name: str, send: Callable[[alert_rules.Message], None], message: alert_rules.Message
    ) -> None:
        """``send(message)`` in a thread of its own, given up (TimeoutError) when it has
        not finished after :func:`send_deadline` and a margin; a notifier whose send
        was given up on is not tried again until that send has ended."""
        busy = self._busy.get(name)
        if busy is not None and busy.is_alive():
            raise TimeoutError("a send given up on earlier has not ended yet")
        self._busy.pop(name, None)
        outcome: list[Exception | None] = []

        def run() -> None:
            try:
                send(message)
            except Exception as err:  # handed to the alert thread below
                outcome.append(err)
            else:
                outcome.append(None)

        thread = threading.Thread(target=run, name=f"alerts-{name}", daemon=True)
        thread.start()
        wait = send_deadline() + 5.0
        thread.join(wait)
        if thread.is_alive():
            self._busy[name] = thread
            raise TimeoutError(f"the send had not finished after {wait:g}s")
        if not outcome:
            raise RuntimeError("the send ended without a result")
        if outcome[0] is not None:
            raise outcome[0]

    def _keep(self) -> None:
        """Writes what was told to ``state_dir`` when it changed; a failure is logged
        once and tried again at the next check."""
        kept = alert_memory.fingerprint(self.states)
        if kept == self._kept:
            return
        try:
            alert_memory.save(self._state_dir, self.states)
        except OSError as err:
            problem = alert_memory.unsaved(self._state_dir, err)
            if problem != self._keep_problem:
                log.warning(
                    "what alerts told is not kept; a restart may not resolve it", error=problem
                )
            self._keep_problem = problem
        else:
            self._kept, self._keep_problem = kept, None

    def _notifiers(self) -> list[tuple[str, Callable[[alert_rules.Message], None]]]:
        out: list[tuple[str, Callable[[alert_rules.Message], None]]] = []
        if self.cfg.webhook is not None:
            hook = self.cfg.webhook
            out.append(("webhook", lambda m: send_webhook(hook, m, self.host, time.time())))
        if self.cfg.email is not None:
            mail = self.cfg.email
            out.append(("email", lambda m: send_email(mail, m, self.host)))
        return out

    def _loop(self) -> None:
        while not self._stopping.wait(self.cfg.check_every):
            try:
                self.check()
            except Exception:  # a bug here must never stop the daemon
                log.exception("alert check failed")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=SEND_TIMEOUT + 5)


def _reason(err: Exception) -> str:
    """A failed send's error in words (its type when it is not one of ours); nbankd
    out of file descriptors or threads is told as its limit, never as the notifier's
    fault."""
    if not isinstance(err, errors.NbankdError):
        short = descriptor_shortage(err)
        if short is not None:
            return str(errors.open_file_limit(short, "sending the alert"))
        if errors.thread_refused(err):
            return str(errors.thread_limit("sending the alert"))
    known = (OSError, requests.RequestException, smtplib.SMTPException, errors.NbankdError)
    return str(err) if isinstance(err, known) else f"{type(err).__name__}: {err}"


def start_alerts(daemon: Daemon) -> AlertService | None:
    """The alert service ``daemon.config.alerts`` asks for, or None when off."""
    cfg = daemon.config.alerts
    return AlertService(daemon, cfg) if cfg.enabled else None


__all__ = [
    "AlertService",
    "mail_text",
    "send_deadline",
    "send_email",
    "send_webhook",
    "start_alerts",
]
