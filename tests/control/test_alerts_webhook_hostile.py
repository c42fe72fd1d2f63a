"""Hostile review of the webhook's transport (send_webhook) and of fetching's shared
NO_AUTH, against real loopback servers: ~/.netrc's credentials never sent, no redirect
followed, the environment's proxies (and NO_PROXY) and CA bundle honoured, and no
error text naming the URL's path, query or token."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from fixtures.tls import self_signed
from nbankd import errors
from nbankd.config.loader import load_config
from nbankd.config.model import WebhookConfig
from nbankd.control import alerts
from nbankd.control.alert_rules import Message, Tracked
from nbankd.control.alerts import send_webhook
from nbankd.transfer import fetching
from nbankd.transfer.placing import NewFile

MESSAGE = Message(
    problems=(Tracked(0.0, "1 rejected input", "nbankctl explain", kind="rejected"),),
    resolved=(),
)
PATH_SECRET = "P4TH-SECRET"
QUERY_SECRET = "QU3RY-SECRET"
TOKEN = "B3ARER-SECRET"
NETRC_SECRET = "N3TRC-SECRET"
SECRETS = (PATH_SECRET, QUERY_SECRET, TOKEN, NETRC_SECRET)
#: what AlertService.check catches from a notifier (anything else aborts the check)
NOTIFIER_ERRORS = (OSError, requests.RequestException)


@dataclass
class Seen:
    method: str
    path: str
    auth: str | None
    proxy_auth: str | None


Reply = tuple[int, dict[str, str], bytes]


class Server:
    """A loopback HTTP server recording each request (``seen``); ``reply`` gives the
    status, headers and body for each (an int: that status, no body)."""

    def __init__(self, reply: int | Callable[[Seen], Reply] = 200) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()  # a reply that waits is let go at close
        server = self

        def answer(seen: Seen) -> Reply:
            return reply(seen) if callable(reply) else (reply, {}, b"")

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                seen = Seen(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Proxy-Authorization"),
                )
                server.seen.append(seen)
                status, headers, body = answer(seen)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_CONNECT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.hook_url = f"{self.base}/hooks/{PATH_SECRET}?token={QUERY_SECRET}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(reply: int | Callable[[Seen], Reply] = 200) -> Server:
        made.append(Server(reply))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA bundle from the runner's environment; a ~/.netrc whose default
    entry (any host) holds a password, as a registry user's often does."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(
        f"machine 127.0.0.1 login lab password {NETRC_SECRET}\n"
        f"default login lab password {NETRC_SECRET}\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))


def _token(tmp_path: Path, text: str = TOKEN) -> Path:
    path = tmp_path / "hook-token"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _no_secret_in(err: BaseException) -> None:
    """Neither the error's text nor its traceback as log.exception prints it (causes
    included) names the URL's path or query, the token or netrc's password."""
    shown = str(err) + "".join(traceback.format_exception(err))
    for secret in SECRETS:
        assert secret not in shown, (secret, shown[-400:])


def _no_credentials(seen: list[Seen], token: str | None = None) -> None:
    for s in seen:
        assert s.auth == (f"Bearer {token}" if token else None), s
        assert s.proxy_auth is None, s


# -- credentials -------------------------------------------------------------------


@pytest.mark.parametrize("with_token", [False, True])
def test_netrc_entries_for_the_hooks_host_are_never_sent(
    servers: Callable[..., Server], tmp_path: Path, with_token: bool
) -> None:
    """~/.netrc names the webhook's host itself (and has a default): the POST carries
    the token's Bearer header or nothing, never netrc's Basic credentials."""
    hook = servers()
    token = _token(tmp_path) if with_token else None
    send_webhook(WebhookConfig(url=hook.hook_url, token_file=token), MESSAGE, "rig3")
    assert [s.method for s in hook.seen] == ["POST"]
    _no_credentials(hook.seen, TOKEN if with_token else None)


def test_through_a_proxy_neither_hook_nor_proxy_gets_netrc_credentials(
    servers: Callable[..., Server], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HTTP_PROXY set: the proxy gets the POST for the webhook's URL with the token
    only: no netrc credentials, as Authorization nor Proxy-Authorization."""
    proxy = servers()
    monkeypatch.setenv("HTTP_PROXY", proxy.base)
    url = f"http://hooks.invalid/hooks/{PATH_SECRET}"
    send_webhook(WebhookConfig(url=url, token_file=_token(tmp_path)), MESSAGE, "rig3")
    assert [(s.method, s.path) for s in proxy.seen] == [("POST", url)]
    _no_credentials(proxy.seen, TOKEN)


# -- redirects ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_no_redirect_is_followed_and_its_error_names_no_secret(
    servers: Callable[..., Server], tmp_path: Path, status: int
) -> None:
    """A redirect (any of 301-308) is a failed send naming the status; nothing goes
    where it points, and the error names neither URL's path or query nor the token."""
    target = servers()
    elsewhere = f"{target.base}/moved/{PATH_SECRET}?token={QUERY_SECRET}"
    hook = servers(lambda _: (status, {"Location": elsewhere}, b""))
    with pytest.raises(OSError, match=f"answered {status}") as info:
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=_token(tmp_path)), MESSAGE, "rig3")
    assert len(hook.seen) == 1 and target.seen == []
    _no_secret_in(info.value)


# -- the environment's proxies and CA bundle ---------------------------------------


@pytest.mark.parametrize("upper", [True, False])
def test_no_proxy_sends_the_webhook_directly(
    servers: Callable[..., Server], monkeypatch: pytest.MonkeyPatch, upper: bool
) -> None:
    """HTTP_PROXY and NO_PROXY naming the webhook's host (either spelling): the POST
    goes to the webhook directly, the proxy sees nothing."""
    proxy, hook = servers(), servers()
    name = (lambda v: v) if upper else str.lower
    monkeypatch.setenv(name("HTTP_PROXY"), proxy.base)
    monkeypatch.setenv(name("NO_PROXY"), "localhost,127.0.0.1")
    send_webhook(WebhookConfig(url=hook.hook_url), MESSAGE, "rig3")
    assert proxy.seen == []
    assert [s.method for s in hook.seen] == ["POST"]


def test_an_https_webhook_goes_through_https_proxy(
    servers: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY set: an https webhook is reached by CONNECT through it (here
    refused: a failed send whose text names no secret), without credentials."""
    proxy = servers(403)
    monkeypatch.setenv("HTTPS_PROXY", proxy.base)
    url = f"https://hooks.invalid/hooks/{PATH_SECRET}?token={QUERY_SECRET}"
    with pytest.raises(OSError, match="unreachable") as info:
        send_webhook(WebhookConfig(url=url), MESSAGE, "rig3")
    assert [(s.method, s.path) for s in proxy.seen] == [("CONNECT", "hooks.invalid:443")]
    _no_credentials(proxy.seen)
    _no_secret_in(info.value)


@pytest.fixture
def tls_hook(tmp_path: Path, servers: Callable[..., Server]) -> tuple[Server, Path]:
    """An HTTPS webhook on loopback with a self-signed certificate, and that cert."""
    import ssl

    cert, key = self_signed(tmp_path, "hook")
    hook = servers()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hook.httpd.socket = context.wrap_socket(hook.httpd.socket, server_side=True)
    hook.hook_url = hook.hook_url.replace("http://", "https://")
    return hook, cert


def test_requests_ca_bundle_lets_an_https_webhook_be_trusted(
    tls_hook: tuple[Server, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """REQUESTS_CA_BUNDLE naming the lab's CA: the https webhook is reached (token
    only, no netrc credentials)."""
    hook, cert = tls_hook
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    send_webhook(WebhookConfig(url=hook.hook_url, token_file=_token(tmp_path)), MESSAGE, "x")
    assert [s.method for s in hook.seen] == ["POST"]
    _no_credentials(hook.seen, TOKEN)


def test_an_untrusted_certificate_fails_naming_no_secret(
    tls_hook: tuple[Server, Path], tmp_path: Path
) -> None:
    """Without the CA bundle the self-signed webhook is refused (nothing POSTed): an
    OSError naming no secret."""
    hook, _ = tls_hook
    with pytest.raises(OSError, match="unreachable") as info:
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=_token(tmp_path)), MESSAGE, "x")
    assert hook.seen == []
    _no_secret_in(info.value)


# -- error texts -------------------------------------------------------------------


def test_a_refused_connection_names_no_secret(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """Nothing listening at the webhook's port: an OSError naming scheme and host
    only, its traceback (causes included) naming no secret."""
    gone = servers()
    url = gone.hook_url
    gone.close()
    with pytest.raises(OSError, match=r"webhook http://127\.0\.0\.1/\.\.\. unreachable") as info:
        send_webhook(WebhookConfig(url=url, token_file=_token(tmp_path)), MESSAGE, "x")
    _no_secret_in(info.value)


def test_a_webhook_that_never_answers_times_out_naming_no_secret(
    servers: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook that takes the POST and never answers: a timeout, an OSError naming
    no secret."""
    holder: list[Server] = []

    def wait(_: Seen) -> Reply:
        holder[0].release.wait()
        return 200, {}, b""

    hook = servers(wait)
    holder.append(hook)
    monkeypatch.setattr(alerts, "SEND_TIMEOUT", 0.3)
    with pytest.raises(OSError, match="unreachable") as info:
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=_token(tmp_path)), MESSAGE, "x")
    assert len(hook.seen) == 1
    _no_secret_in(info.value)


@pytest.mark.parametrize("status", [400, 401, 404, 500])
def test_an_error_answer_names_no_secret(
    servers: Callable[..., Server], tmp_path: Path, status: int
) -> None:
    """A webhook answering an error: an OSError naming the status, no secret."""
    hook = servers(lambda _: (status, {}, f"bad {PATH_SECRET} {TOKEN}".encode()))
    with pytest.raises(OSError, match=f"answered {status}") as info:
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=_token(tmp_path)), MESSAGE, "x")
    _no_secret_in(info.value)


def test_a_port_out_of_range_with_no_proxy_set_is_a_notifier_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A webhook URL the configuration accepts with a port out of range (a typo), with
    NO_PROXY set: the send fails as a notifier failure (OSError), never an error that
    escapes AlertService.check (skipping the email notifier, no backoff, no status)."""
    monkeypatch.setenv("NO_PROXY", "example.org")
    url = f"http://localhost:80800/hooks/{PATH_SECRET}?token={QUERY_SECRET}"
    with pytest.raises(NOTIFIER_ERRORS) as info:
        send_webhook(WebhookConfig(url=url), MESSAGE, "x")
    _no_secret_in(info.value)


def test_a_token_outside_latin1_is_a_notifier_failure(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """A token file whose token holds a character HTTP headers cannot carry (€): the
    send fails as a notifier failure (OSError) naming no secret, never an error that
    escapes AlertService.check."""
    hook = servers()
    token = _token(tmp_path, f"{TOKEN}€")
    with pytest.raises(NOTIFIER_ERRORS) as info:
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=token), MESSAGE, "x")
    _no_secret_in(info.value)


def test_a_token_file_that_is_a_fifo_fails_the_send_at_once(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """A FIFO named as token_file (nothing ever writes it) fails the send at once,
    naming the file as a FIFO, instead of holding the alert thread on its open."""
    hook = servers()
    fifo = tmp_path / "token-fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"token-fifo is a FIFO, not a regular file"):
        send_webhook(WebhookConfig(url=hook.hook_url, token_file=fifo), MESSAGE, "x")
    assert hook.seen == []


# -- fetching's downloads ----------------------------------------------------------


def _download(url: str, tmp_path: Path, auth_for: fetching.AuthFor | None = None) -> str:
    new = NewFile(tmp_path / "fetched")
    try:
        return fetching._download(url, new, auth_for)
    finally:
        new.discard()


def test_a_download_sends_no_netrc_credentials(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """A download from a host ~/.netrc names: one GET without credentials."""
    server = servers(lambda _: (200, {}, b"bytes"))
    _download(f"{server.base}/res/x/", tmp_path)
    assert [s.method for s in server.seen] == ["GET"]
    _no_credentials(server.seen)


def test_a_download_asked_for_credentials_gets_none_from_netrc(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """A 401 answer and no credentials of the caller's: no second request with
    netrc's; the download fails."""
    server = servers(401)
    with pytest.raises(fetching.NotFetchable, match="401"):
        _download(f"{server.base}/res/x/", tmp_path)
    assert len(server.seen) == 1
    _no_credentials(server.seen)


def test_a_redirected_download_takes_no_credentials_to_the_new_host(
    servers: Callable[..., Server], tmp_path: Path
) -> None:
    """The caller's credentials (asked for by a 401) go to the download's host only: its
    redirect to another host gets neither them nor netrc's."""
    other = servers(lambda _: (200, {}, b"bytes"))

    def first(seen: Seen) -> Reply:
        if seen.auth is None:
            return 401, {}, b""
        return 302, {"Location": f"{other.base}/elsewhere/"}, b""

    server = servers(first)
    _download(f"{server.base}/res/x/", tmp_path, lambda url: ("me", "mine"))
    assert [s.auth is not None for s in server.seen] == [False, True]
    assert [s.method for s in other.seen] == ["GET"]
    _no_credentials(other.seen)


# -- the configuration ---------------------------------------------------------------


def _config_error(tmp_path: Path, url: str) -> str:
    """The message of the configuration error for an alerts webhook at ``url``."""
    cfg = tmp_path / "nbankd.yaml"
    cfg.write_text(
        f"registry: embedded\nstate_dir: {tmp_path / 'state'}\n"
        f"archives: [{{name: a, path: {tmp_path / 'arch'}}}]\n"
        f"inboxes: [{{path: {tmp_path / 'inbox'}, archive: a, dtype: d}}]\n"
        f"alerts: {{webhook: {{url: '{url}'}}}}\n"
    )
    with pytest.raises(errors.ConfigError) as caught:
        load_config(cfg)
    return str(caught.value) + " " + (caught.value.hint or "")


def test_a_webhook_port_out_of_range_is_a_configuration_error(tmp_path: Path) -> None:
    """A port past 65535 in the webhook URL is refused when the configuration is read,
    naming the key and the port's rule, never the URL's path or query."""
    text = _config_error(tmp_path, f"http://localhost:80800/hooks/{PATH_SECRET}?t={QUERY_SECRET}")
    assert "alerts.webhook.url" in text and "65535" in text
    assert PATH_SECRET not in text and QUERY_SECRET not in text


def test_a_webhook_url_of_another_scheme_is_refused_without_its_path(tmp_path: Path) -> None:
    """An ftp:// webhook URL is refused naming its scheme and host, never its path."""
    text = _config_error(tmp_path, f"ftp://chat.example.org/hooks/{PATH_SECRET}")
    assert "ftp://chat.example.org" in text and "http(s)" in text
    assert PATH_SECRET not in text
