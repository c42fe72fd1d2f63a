"""Telling people when something is wrong: the alert service and its notifiers.

Every ``alerts.check_every`` (default 30 s) a thread reads the status document, decides with
:mod:`nbankd.control.alert_rules` what to tell, and sends one message to each
configured notifier: a webhook (a JSON POST, with ``Authorization: Bearer`` from
``token_file``) and email (SMTP, STARTTLS unless turned off, credentials from
``auth_file``: ``user:password``). A notifier that fails never holds up deposits:
the message is tried again at the next check, and the failure shows in
``nbankctl status`` (:attr:`AlertService.problem`) until a send succeeds.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
import structlog

from nbankd import errors
from nbankd.config.model import AlertsConfig, EmailConfig, WebhookConfig
from nbankd.control import alert_rules
from nbankd.registry import credentials

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon

log = structlog.get_logger("nbankd.alerts")

SEND_TIMEOUT = 20.0


def _token(path: Path) -> str:
    """The first line of a webhook's token file; OSError naming it when it cannot be
    read or is empty (never a request sent with an empty token)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise OSError(f"the webhook's token_file {path} is empty")
    return lines[0].strip()


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
    try:
        resp = requests.post(cfg.url, data=json.dumps(body), headers=headers, timeout=SEND_TIMEOUT)
    except requests.RequestException as err:  # its text names the whole URL: never shown
        raise OSError(f"webhook {shown} unreachable ({type(err).__name__})") from None
    if resp.status_code >= 300:
        raise OSError(f"webhook {shown} answered {resp.status_code}")


def send_email(cfg: EmailConfig, message: alert_rules.Message, host: str) -> None:
    mail = EmailMessage()
    mail["Subject"] = message.subject(host)
    mail["From"] = cfg.from_
    mail["To"] = ", ".join(cfg.to)
    mail.set_content(message.text())
    smtp_host, port = cfg.smtp
    with smtplib.SMTP(smtp_host, port, timeout=SEND_TIMEOUT) as smtp:
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
        self.state = alert_rules.State()
        self.problem: str | None = None  # why the last send failed, shown in status
        self.sent = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alerts", daemon=True)
        self._thread.start()

    def check(self, now: float | None = None) -> alert_rules.Message | None:
        """One check: decides and sends; returns the message sent or tried."""
        from nbankd.control import handlers

        now = time.time() if now is None else now
        status = handlers.status(self.daemon, {})
        snap = self.daemon.snapshot()
        expect = {str(i.path): i.expect_every for i in snap.config.inboxes if i.expect_every}
        present = alert_rules.conditions(
            status,
            snap.tally.last_deposit,
            expect,
            now=now,
            started=snap.started,
            unavailable_after=self.cfg.unavailable_after,
        )
        new, message = alert_rules.step(
            self.state,
            present,
            now=now,
            repeat_every=self.cfg.repeat_every,
            group_wait=self.cfg.group_wait,
        )
        if message is None:
            self.state = new
            return None
        failures = []
        for name, send in self._notifiers():
            try:
                send(message)
            except (
                OSError,
                requests.RequestException,
                smtplib.SMTPException,
                errors.NbankdError,  # an unreadable or malformed auth_file
            ) as err:
                failures.append(f"{name}: {err}")
        if failures:
            self.state = alert_rules.unsent(new, self.state, message)
            problem = "alerts could not be sent (" + "; ".join(failures) + "); tried again"
            if problem != self.problem:
                log.warning("alert not sent", error=problem)
            self.problem = problem
        else:
            self.state, self.problem = new, None
            self.sent += 1
            log.info("alert sent", problems=len(message.problems), resolved=len(message.resolved))
        return message

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


def start_alerts(daemon: Daemon) -> AlertService | None:
    """The alert service ``daemon.config.alerts`` asks for, or None when off."""
    cfg = daemon.config.alerts
    return AlertService(daemon, cfg) if cfg.enabled else None


__all__ = ["AlertService", "send_email", "send_webhook", "start_alerts"]
