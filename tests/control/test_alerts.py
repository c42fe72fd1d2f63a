"""Alerts sent for real: a webhook to a local HTTP server, email to a local SMTP server
(aiosmtpd), and a running daemon telling of a rejection, then of its resolution."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from fixtures.daemon import status_json, wait_for
from nbankd.config.model import EmailConfig, WebhookConfig
from nbankd.control.alert_rules import Message, Tracked
from nbankd.control.alerts import send_email, send_webhook

MESSAGE = Message(
    problems=(
        Tracked(0.0, "3 rejected input(s) wait in /srv/inbox/rig3/rejected", "nbankctl explain"),
    ),
    resolved=(Tracked(0.0, "the archive of /srv/inbox/rig3 cannot take deposits", "c", 0.0),),
)


class Hook:
    """A local HTTP server recording each POST (body and Authorization header)."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[dict[str, Any], str | None]] = []
        self.status = status
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append((json.loads(body), self.headers.get("Authorization")))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/x"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


class Mailbox:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.mails: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope, message_from_bytes(envelope.content)))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_webhook_posts_the_message_with_its_token(hook: Hook, tmp_path: Path) -> None:
    """The webhook gets one JSON POST naming the problem, its command and the token."""
    token = tmp_path / "hook-token"
    token.write_text("s3cret-token\n")
    send_webhook(WebhookConfig(url=hook.url, token_file=token), MESSAGE, "rig3")
    [(body, auth)] = hook.posts
    assert auth == "Bearer s3cret-token"
    assert body["subject"] == "nbankd on rig3: 1 problem(s)"
    assert body["problems"][0]["command"] == "nbankctl explain"
    assert "resolved: the archive" in body["text"]


def test_a_webhook_refusal_is_an_error(tmp_path: Path) -> None:
    """A 5xx answer is reported as a failed send (tried again later by the service)."""
    refusing = Hook(status=503)
    try:
        with pytest.raises(OSError, match="answered 503"):
            send_webhook(WebhookConfig(url=refusing.url), MESSAGE, "rig3")
    finally:
        refusing.close()


def test_email_is_sent_with_credentials(tmp_path: Path) -> None:
    """One mail to every recipient, logged in with auth_file's user and password."""
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=True)

    box = Mailbox()
    port = _free_port()
    controller = Controller(
        box, hostname="127.0.0.1", port=port,
        authenticator=authenticator, auth_require_tls=False,
    )  # fmt: skip
    controller.start()
    try:
        auth = tmp_path / "smtp"
        auth.write_text("alerts:pw\n")
        cfg = EmailConfig(
            to=("lab@example.org", "pi@example.org"), from_="nbankd@rig3.example.org",
            smtp=("127.0.0.1", port), starttls=False, auth_file=auth,
        )  # fmt: skip
        send_email(cfg, MESSAGE, "rig3")
    finally:
        controller.stop()
    [(envelope, mail)] = box.mails
    assert sorted(envelope.rcpt_tos) == ["lab@example.org", "pi@example.org"]
    assert mail["Subject"] == "nbankd on rig3: 1 problem(s)"
    assert "more: nbankctl explain" in mail.get_payload()
    assert logins == [("alerts", "pw")]


def test_daemon_tells_of_a_rejection_and_of_its_resolution(daemon_factory: Any, hook: Hook) -> None:
    """A rejected input is told once through the webhook; once it is moved away from
    the rejected folder, a resolved message follows."""
    h = daemon_factory(
        extra_config={"alerts": {"webhook": {"url": hook.url}, "check_every": "0.3s"}}
    )
    h.start()
    h.drop("bad name.wav", b"a name the registry refuses")
    wait_for(lambda: hook.posts, 60, "the rejection told")
    body = hook.posts[0][0]
    assert "1 rejected input(s)" in body["problems"][0]["summary"]
    rejected = [p for p in h.rejected.iterdir()] if h.rejected.is_dir() else []
    for path in rejected:
        path.unlink()
    wait_for(lambda: any(p[0]["resolved"] for p in hook.posts), 60, "the resolution told")
    assert len([p for p in hook.posts if p[0]["problems"]]) == 1  # told once, not repeated
    h.stop()


def test_a_failing_notifier_shows_in_status_and_deposits_go_on(daemon_factory: Any) -> None:
    """A webhook that refuses makes status degraded naming it; a deposit still lands."""
    refusing = Hook(status=500)
    try:
        h = daemon_factory(
            extra_config={"alerts": {"webhook": {"url": refusing.url}, "check_every": "0.3s"}}
        )
        h.start()
        h.drop("bad name.wav", b"rejected, so there is something to tell")
        wait_for(
            lambda: any("alerts could not be sent" in d for d in status_json(h)[1]["degraded"]),
            60,
            "status to name the failing webhook",
        )
        h.drop("fine.wav", b"deposited all the same")
        wait_for(lambda: any(r["id"] == "fine" for r in h.receipts()), 60, "the deposit")
        h.stop()
    finally:
        refusing.close()
