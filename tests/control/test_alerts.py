"""Alerts sent for real: a webhook to a local HTTP server, email to a local SMTP server
(aiosmtpd), and a running daemon telling of a rejection, then of its resolution."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import urllib.request
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from fixtures.daemon import status_json, wait_for
from fixtures.tls import self_signed
from fixtures.webhooks import Hook
from nbankd import errors
from nbankd.config.model import EmailConfig, WebhookConfig
from nbankd.control.alert_rules import Message, Tracked
from nbankd.control.alerts import send_email, send_webhook

REJECTED = "3 rejected input(s) wait in /srv/inbox/rig3/rejected"
MESSAGE = Message(
    problems=(
        Tracked(0.0, REJECTED, "nbankctl explain", kind="rejected", inbox="/srv/inbox/rig3"),
    ),
    resolved=(Tracked(0.0, "the archive of /srv/inbox/rig3 cannot take deposits", "c", 0.0),),
)


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
    assert {k: body[k] for k in ("kind", "summary", "inbox", "path", "hint")} == {
        "kind": "rejected", "summary": REJECTED, "inbox": "/srv/inbox/rig3", "path": None,
        "hint": "nbankctl explain",
    }  # fmt: skip
    assert body["time"].startswith("20")
    assert [a["state"] for a in body["alerts"]] == ["firing", "resolved"]
    assert "resolved: the archive" in body["text"]


def test_a_webhook_refusal_is_an_error(tmp_path: Path) -> None:
    """A 5xx answer is reported as a failed send (tried again later by the service)."""
    refusing = Hook(status=503)
    try:
        with pytest.raises(OSError, match="answered 503"):
            send_webhook(WebhookConfig(url=refusing.url), MESSAGE, "rig3")
    finally:
        refusing.close()


@pytest.fixture
def netrc_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ~/.netrc whose ``default`` entry (any host) holds the registry's password."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login lab password registry-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.usefixtures("netrc_default")
@pytest.mark.parametrize("with_token", [False, True])
def test_a_netrc_default_entry_is_never_sent_to_the_webhook(
    hook: Hook, tmp_path: Path, with_token: bool
) -> None:
    """~/.netrc's credentials never go to the webhook: no Authorization without a token
    file, the token's Bearer header (not netrc's Basic) with one."""
    token = tmp_path / "hook-token"
    token.write_text("s3cret-token\n")
    send_webhook(
        WebhookConfig(url=hook.url, token_file=token if with_token else None), MESSAGE, "x"
    )
    [(_, auth)] = hook.posts
    assert auth == ("Bearer s3cret-token" if with_token else None)


def test_a_webhook_redirect_is_an_error_and_not_followed(hook: Hook, tmp_path: Path) -> None:
    """A webhook answering a redirect has failed (its message names the status); the
    message and token are never sent where it points."""
    token = tmp_path / "hook-token"
    token.write_text("s3cret-token\n")
    redirecting = Hook(status=307, location=hook.url)
    try:
        with pytest.raises(OSError, match="answered 307"):
            send_webhook(WebhookConfig(url=redirecting.url, token_file=token), MESSAGE, "rig3")
    finally:
        redirecting.close()
    assert len(redirecting.posts) == 1
    assert hook.posts == []


def test_a_webhook_goes_through_the_environments_proxy(
    hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY from the environment is used to reach the webhook (a lab's way out)."""
    monkeypatch.setenv("HTTP_PROXY", hook.url.rsplit("/hooks/", 1)[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    send_webhook(WebhookConfig(url="http://hooks.invalid/services/x"), MESSAGE, "rig3")
    assert hook.paths == ["http://hooks.invalid/services/x"]


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


def _states(post: tuple[dict[str, Any], Any]) -> list[str]:
    return [a["state"] for a in post[0]["alerts"]]


def test_daemon_tells_of_a_rejection_and_of_its_resolution(daemon_factory: Any, hook: Hook) -> None:
    """A daemon tells each rejection by path, a later one too, and resolves the one removed."""
    alerts = {"webhook": {"url": hook.url}, "check_every": "0.3s", "group_wait": "0s"}
    h = daemon_factory(extra_config={"alerts": alerts})
    h.start()
    h.drop("bad name.wav", b"a name the registry refuses")
    wait_for(lambda: hook.posts, 60, "the rejection told")
    body = hook.posts[0][0]
    assert body["kind"] == "rejected" and body["path"].endswith("bad name.wav")
    assert body["hint"].startswith("nbankctl explain ")
    h.drop("worse name.wav", b"another name the registry refuses")
    wait_for(
        lambda: any("worse name.wav" in str(a["path"]) for p in hook.posts for a in p[0]["alerts"]),
        60,
        "the second rejection told",
    )
    for path in h.rejected.iterdir():
        if path.name.startswith("bad name.wav"):
            path.unlink()
    wait_for(lambda: any("resolved" in _states(p) for p in hook.posts), 60, "the resolution")
    [resolution] = [p for p in hook.posts if "resolved" in _states(p)]
    [gone] = resolution[0]["alerts"]
    assert gone["path"].endswith("bad name.wav") and gone["state"] == "resolved"
    fired = [a["path"] for p in hook.posts for a in p[0]["alerts"] if a["state"] == "firing"]
    assert len(fired) == 2 and len(set(fired)) == 2  # each told once
    h.stop()


def test_a_failing_notifier_shows_in_status_and_deposits_go_on(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A refusing webhook degrades status; deposits go on; its token and URL path stay hidden."""
    refusing = Hook(status=500)
    secret_path, token = "T0KEN1N-PATH-93a1", "b3arer-s3cret-77"
    token_file = tmp_path / "hook-token"
    token_file.write_text(token + "\n")
    port = _free_port()
    try:
        alerts = {
            "webhook": {"url": f"{refusing.url}/{secret_path}", "token_file": str(token_file)},
            "check_every": "0.3s",
            "group_wait": "0s",
        }
        h = daemon_factory(
            extra_config={"alerts": alerts, "metrics": {"listen": f"127.0.0.1:{port}"}}
        )
        h.start()
        h.drop("bad name.wav", b"rejected, so there is something to tell")
        wait_for(
            lambda: any("alerts could not be sent" in d for d in status_json(h)[1]["degraded"]),
            60,
            "status to name the failing webhook",
        )
        [line] = [d for d in status_json(h)[1]["degraded"] if "alerts could not be sent" in d]
        assert "http://127.0.0.1/..." in line and "answered 500" in line
        h.drop("fine.wav", b"deposited all the same")
        wait_for(lambda: any(r["id"] == "fine" for r in h.receipts()), 60, "the deposit")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        shown = json.dumps(status_json(h)[1]) + metrics + h.log_path.read_text()
        h.stop()
        shown += h.log_path.read_text()
        assert secret_path not in shown and token not in shown
        assert refusing.posts and refusing.posts[0][1] == f"Bearer {token}"  # it was sent
    finally:
        refusing.close()


def _tls_server(
    folder: Path, box: Mailbox, logins: list[tuple[str, str]]
) -> tuple[Controller, Path]:
    cert, key = self_signed(folder, "smtp")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=True)

    controller = Controller(
        box, hostname="127.0.0.1", port=_free_port(), tls_context=context,
        require_starttls=True, authenticator=authenticator,
    )  # fmt: skip
    controller.start()
    return controller, cert


def test_email_over_starttls_checks_the_server_and_logs_in(tmp_path: Path) -> None:
    """With starttls, the certificate is checked against cafile before the password is sent."""
    box, logins = Mailbox(), []
    controller, cert = _tls_server(tmp_path, box, logins)
    try:
        auth = tmp_path / "smtp-auth"
        auth.write_text("alerts:tls-pw\n")
        cfg = EmailConfig(
            to=("lab@example.org",), from_="nbankd@rig3.example.org",
            smtp=("127.0.0.1", controller.port), starttls=True, auth_file=auth, cafile=cert,
        )  # fmt: skip
        send_email(cfg, MESSAGE, "rig3")
    finally:
        controller.stop()
    assert len(box.mails) == 1 and logins == [("alerts", "tls-pw")]


def test_email_refuses_a_server_it_cannot_trust(tmp_path: Path) -> None:
    """A server whose certificate no trusted CA signed gets no password: the send fails."""
    box, logins = Mailbox(), []
    controller, _cert = _tls_server(tmp_path, box, logins)
    try:
        auth = tmp_path / "smtp-auth"
        auth.write_text("alerts:tls-pw\n")
        cfg = EmailConfig(
            to=("lab@example.org",), from_="nbankd@rig3.example.org",
            smtp=("127.0.0.1", controller.port), starttls=True, auth_file=auth,
        )  # fmt: skip
        with pytest.raises(ssl.SSLError):
            send_email(cfg, MESSAGE, "rig3")
    finally:
        controller.stop()
    assert box.mails == [] and logins == []


def test_an_empty_token_file_sends_nothing(hook: Hook, tmp_path: Path) -> None:
    """An empty token_file is an error naming it; no request goes out without a token."""
    token = tmp_path / "hook-token"
    token.write_text("\n")
    with pytest.raises(OSError, match=r"token_file .* is empty"):
        send_webhook(WebhookConfig(url=hook.url, token_file=token), MESSAGE, "rig3")
    assert hook.posts == []


def test_a_missing_auth_file_is_named_and_sends_nothing(tmp_path: Path) -> None:
    """An auth_file that does not exist is an error naming it: no login, no mail."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        cfg = EmailConfig(
            to=("lab@example.org",), from_="nbankd@rig3.example.org",
            smtp=("127.0.0.1", controller.port), starttls=False,
            auth_file=tmp_path / "missing-smtp-auth",
        )  # fmt: skip
        with pytest.raises(errors.ConfigError, match="missing-smtp-auth"):
            send_email(cfg, MESSAGE, "rig3")
    finally:
        controller.stop()
    assert box.mails == []


def test_an_email_body_carries_any_file_name() -> None:
    """A name's bytes that are not UTF-8, and its control characters, are written as
    \\xNN in an email's body (an email cannot carry them)."""
    from nbankd.control.alerts import mail_text

    text = "- /in/odd \udcff.wav\r was rejected\n  more: nbankctl explain\n"
    assert mail_text(text) == "- /in/odd \\xff.wav\\x0d was rejected\n  more: nbankctl explain\n"
    mail_text(text).encode("utf-8")  # nothing left that UTF-8 cannot carry


def test_what_was_told_is_kept_across_a_restart(tmp_path: Path) -> None:
    """alerts.json keeps each notifier's problems told and resolutions pending, and
    reads them back (non-UTF-8 names included); a damaged file is ignored."""
    from nbankd.control import alert_memory
    from nbankd.control.alert_rules import Condition, State, step

    odd = Condition("rejected:/in/\udcff", "/in/\udcff was rejected", "c", kind="rejected")
    gone = Condition("silent:/in", "no deposit from /in", "c", kind="silent")
    state, _ = step(State(), [odd, gone], now=10.0, repeat_every=100.0)
    state, _ = step(state, [odd], now=20.0, repeat_every=100.0, group_wait=60.0)
    assert list(state.gone) == ["silent:/in"]  # its resolution waits group_wait
    alert_memory.save(tmp_path, {"webhook": state, "email": State()})
    back = alert_memory.load(tmp_path, ["webhook"])
    assert list(back) == ["webhook"]
    assert back["webhook"].tracked == state.tracked and back["webhook"].gone == state.gone
    assert alert_memory.fingerprint(back) == alert_memory.fingerprint({"webhook": state})
    (tmp_path / alert_memory.NAME).write_text("{not json")
    assert alert_memory.load(tmp_path, ["webhook"]) == {}


def test_a_send_that_hangs_is_given_up_and_not_stacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notifier's send that has not finished after the deadline is given up on
    (TimeoutError, a failed send); until it ends, that notifier is not tried again
    (one thread held, never one per check); its errors reach the alert thread."""
    from nbankd.control import alerts as alerts_mod

    monkeypatch.setattr(alerts_mod, "SEND_TIMEOUT", 0.1)
    monkeypatch.setattr(alerts_mod, "send_deadline", lambda: -4.8)  # +5 s margin: 0.2 s
    service = alerts_mod.AlertService.__new__(alerts_mod.AlertService)
    service._busy = {}
    release = threading.Event()
    calls: list[Message] = []

    def hangs(message: Message) -> None:
        calls.append(message)
        release.wait(30)

    with pytest.raises(TimeoutError, match="not finished"):
        service._send_within("webhook", hangs, MESSAGE)
    with pytest.raises(TimeoutError, match="not ended yet"):
        service._send_within("webhook", hangs, MESSAGE)
    assert len(calls) == 1
    release.set()
    service._busy["webhook"].join(10)

    def broken(message: Message) -> None:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    with pytest.raises(UnicodeEncodeError):
        service._send_within("webhook", broken, MESSAGE)
    assert alerts_mod._reason(UnicodeEncodeError("utf-8", "x", 0, 1, "bad")).startswith(
        "UnicodeEncodeError: "
    )
