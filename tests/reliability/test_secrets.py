"""Least privilege and secrets (guarantee 8): the control socket and registry credentials.

Part one runs ``nbankctl`` as unprivileged users against a real daemon: a reader
runs the read-only commands and is refused every command that changes state (exit
status 2, logged by the daemon, nothing changed); a user who is neither reader nor
admin gets nothing, even through a socket whose file permissions were opened up.

Part two gives the daemon the real django-neurobank password in each documented way
(``registry_auth`` file, ``~/.netrc``, ``$CREDENTIALS_DIRECTORY/registry``), logs as
JSON and as console text at debug level, and drives it through a failing-auth path
and a registry answer that raises a traceback. A loopback proxy in front of the real
server mangles the answer to ``POST resources/`` and echoes the credentials it saw
into that answer's body. The password (and its Basic-auth encodings) must then
appear nowhere: not in logs, ``nbankctl status`` (text or JSON), the daemon's
``/proc/PID/cmdline`` and ``environ``, error messages, or any file under the run's
folders (journal, receipts, reasons, archive).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fixtures.daemon import NBANKD, DaemonHarness, wait_for
from fixtures.tls import self_signed
from fixtures.users import TestUser
from nbankd import errors
from nbankd.control.client import call
from reliability import figures

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
READ_ONLY = [("status",), ("queue",), ("history",), ("explain", "INBOX/x.wav")]
STATE_CHANGING = [
    ("pause",),
    ("resume",),
    ("requeue", "--all-rejected"),
    ("rescan",),
    ("reload",),
    ("audit",),
]


# --- part one: the control socket -------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(lab_group: str) -> Iterator[DaemonHarness]:
    """A root daemon whose readers are the lab group, its socket in a folder users reach."""
    root = Path(tempfile.mkdtemp(prefix="nbankd-socket-", dir="/tmp"))
    root.chmod(0o755)
    h = DaemonHarness(root=root, extra_config={"control": {"readers": [lab_group]}})
    h.start()
    yield h
    if h.proc is not None and h.proc.poll() is None:
        h.stop()
    shutil.rmtree(root, ignore_errors=True)


def ctl_as(user: TestUser, h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [a.replace("INBOX", str(h.inbox)) for a in args]
    return user.run([NBANKCTL, *argv, "--socket", str(h.socket_path)], timeout=60)


def _log_events(h: DaemonHarness) -> list[dict[str, Any]]:
    out = []
    for line in h.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.mark.parametrize("args", READ_ONLY, ids=[a[0] for a in READ_ONLY])
def test_reader_runs_read_only_commands(
    lab: DaemonHarness, unpriv_user: TestUser, args: tuple[str, ...]
) -> None:
    """A member of the readers group gets an answer to status, queue, history and explain."""
    proc = ctl_as(unpriv_user, lab, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) is not None


@pytest.mark.parametrize("args", STATE_CHANGING, ids=[a[0] for a in STATE_CHANGING])
def test_reader_is_refused_every_state_changing_command(
    lab: DaemonHarness, unpriv_user: TestUser, args: tuple[str, ...]
) -> None:
    """A reader is denied pause/resume/requeue/rescan/reload/audit (exit 2); nothing changes."""
    cmd = args[0]
    proc = ctl_as(unpriv_user, lab, *args)
    assert proc.returncode == errors.PermissionDenied.exit_code == 2
    assert f"user {unpriv_user.name} may not run '{cmd}'" in proc.stderr
    wait_for(
        lambda: any(
            e.get("event") == "control request denied" and e.get("command") == cmd
            for e in _log_events(lab)
        ),
        20,
        f"the daemon to log the denied {cmd}",
    )
    events = _log_events(lab)
    assert not any(e.get("event") == "control command" and e.get("command") == cmd for e in events)
    assert not any(e.get("event") == "configuration reloaded" for e in events)
    status = call(lab.socket_path, "status")
    assert [i["paused"] for i in status["inboxes"]] == [False]


def test_user_neither_reader_nor_admin_cannot_connect(
    lab: DaemonHarness, other_user: TestUser
) -> None:
    """Outside the socket's group, even status fails: permission denied, exit 2."""
    proc = ctl_as(other_user, lab, "status")
    assert proc.returncode == 2
    assert "permission denied" in proc.stderr


@pytest.mark.parametrize("args", [("status",), ("pause",)], ids=["status", "pause"])
def test_open_socket_file_still_refuses_a_stranger(
    lab: DaemonHarness, other_user: TestUser, args: tuple[str, ...]
) -> None:
    """With the socket file opened to everyone by mistake, peer credentials still refuse."""
    lab.socket_path.chmod(0o666)
    try:
        proc = ctl_as(other_user, lab, *args)
    finally:
        lab.socket_path.chmod(0o660)
    assert proc.returncode == 2
    assert f"user {other_user.name} may not use the control socket" in proc.stderr


# --- part two: registry credentials ------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class _Mangler(http.server.BaseHTTPRequestHandler):
    """Forwards to the real server; answers POST resources/ with a body that breaks the client
    and echoes the credentials it was sent (a hostile or broken registry)."""

    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        skip = {"host", "connection", "content-length", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream: str = self.server.upstream  # type: ignore[attr-defined]
        r = requests.request(
            self.command, upstream + self.path, headers=headers, data=body, timeout=30
        )
        payload = r.content
        if self.command == "POST" and self.path.endswith("/resources/") and r.status_code == 201:
            auth = self.headers.get("Authorization", "")
            decoded = base64.b64decode(auth.split()[-1]).decode() if auth else ""
            payload = json.dumps({"echo": auth, "credentials": decoded}).encode()
        self.send_response(r.status_code)
        for key, value in r.headers.items():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def mangler(django_registry: Any) -> Iterator[str]:
    """The URL of the mangling proxy in front of the real django-neurobank."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mangler)
    server.daemon_threads = True
    server.upstream = django_registry.url.split("/neurobank/")[0]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/neurobank/"
    server.shutdown()
    server.server_close()


def secret_forms(user: str, password: str) -> list[bytes]:
    """The password and the encodings a Basic-auth header or a netrc line would carry."""
    pair = f"{user}:{password}".encode()
    return [password.encode(), pair, base64.b64encode(pair)]


def leaks(data: bytes | str, forms: list[bytes]) -> list[bytes]:
    blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return [f for f in forms if f in blob]


def _files_under(top: Path, skip: set[Path]) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath, name)
            if path not in skip and not path.is_symlink() and path.is_file():
                yield path


def _give_credentials(
    h: DaemonHarness, source: str, user: str, password: str
) -> tuple[dict[str, str], set[Path]]:
    """Puts the credentials where ``source`` says; returns the daemon's env and those files."""
    folder = h.root / "creds"
    folder.mkdir(mode=0o700)
    if source == "registry_auth":
        path = folder / "registry-auth"
        path.write_text(f"{user}:{password}\n")
        h.extra_config["registry_auth"] = str(path)
        env: dict[str, str] = {}
    elif source == "netrc":
        path = folder / ".netrc"
        path.write_text(f"machine 127.0.0.1\nlogin {user}\npassword {password}\n")
        env = {"HOME": str(folder)}
    else:
        path = folder / "registry"
        path.write_text(f"{user}:{password}\n")
        env = {"CREDENTIALS_DIRECTORY": str(folder)}
    path.chmod(0o600)
    return env, {path}


CASES = [
    # (credentials source, log format, password right?)
    ("registry_auth", "json", True),
    ("netrc", "console", True),
    ("credentials_directory", "json", True),
    ("credentials_directory", "console", True),
    ("registry_auth", "console", False),
    ("netrc", "json", False),
]


@pytest.mark.parametrize(
    ("source", "fmt", "right"),
    CASES,
    ids=[f"{s}-{f}-{'right' if r else 'wrong'}-password" for s, f, r in CASES],
)
def test_password_appears_nowhere(
    tmp_path: Path, django_registry: Any, mangler: str, source: str, fmt: str, right: bool
) -> None:
    """The registry password is in no log, status output, process view or file the daemon writes."""
    server = django_registry
    user = server.username
    password = server.password if right else "wrong-" + secrets.token_urlsafe(12)
    forms = secret_forms(user, password)
    h = DaemonHarness(
        root=tmp_path / "run",
        registry=mangler,
        dtype=server.add_datatype(),
        extra_config={"log": {"format": fmt, "level": "debug"}},
    )
    h.root.mkdir()
    env, cred_files = _give_credentials(h, source, user, password)
    h.write_config()
    h.start(env=env)
    pid = h.proc.pid  # type: ignore[union-attr]
    h.drop(f"sec{secrets.token_hex(4)}.wav", os.urandom(5000))
    log = h.log_path
    if right:  # the mangled answer (the credentials echoed) is refused as a malformed
        # record, told without its values; the retry finds the record made and succeeds
        wait_for(lambda: "malformed record" in log.read_text(), 60, "the malformed answer told")
        wait_for(lambda: len(h.receipts()) == 1, 60, "the deposit")
    else:  # refused: the daemon says so, in its log and its status
        wait_for(lambda: "invalid username/password" in log.read_text(), 60, "the auth failure")
        wait_for(lambda: call(h.socket_path, "status")["degraded"], 60, "a degraded status")
    outputs = {}
    for args in (["status"], ["status", "--json"], ["queue", "--json"], ["history"]):
        proc = subprocess.run(
            [NBANKCTL, "-c", str(h.config_path), *args], capture_output=True, text=True, timeout=60
        )
        outputs[" ".join(args)] = proc.stdout + proc.stderr
    if not right:
        assert "invalid username/password" in outputs["status"]
    views = {
        "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes(),
        "environ": Path(f"/proc/{pid}/environ").read_bytes(),
    }
    assert h.stop() == 0

    found = {k: leaks(v, forms) for k, v in {**outputs, **views}.items()}
    for path in _files_under(h.root, cred_files):
        found[str(path)] = leaks(path.read_bytes(), forms)
    assert {k: v for k, v in found.items() if v} == {}
    assert stat.S_IMODE(h.state_dir.stat().st_mode) & 0o007 == 0  # state is not world-readable
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in cred_files)  # left as given
    figures.record(
        "secrets",
        f"{source}-{fmt}-{'right' if right else 'wrong'}",
        {"places_searched": len(found), "secret_forms": len(forms), "leaks": 0},
    )


def test_credential_errors_never_quote_the_file(tmp_path: Path, django_registry: Any) -> None:
    """check-config names a malformed or refused credentials file, never its content."""
    server = django_registry
    password = "pw-" + secrets.token_urlsafe(12)
    bodies = {
        "no-colon": f"{password}\n",
        "bad-netrc": f"machine 127.0.0.1 login {server.username} password\n",
        "two-lines": f"{server.username}:{password}\nsecond:{password}\n",
        "refused": f"{server.username}:{password}\n",
    }
    bodies["bad-netrc"] += f"password {password} macdef\n"
    outputs = []
    for name, body in bodies.items():
        h = DaemonHarness(root=tmp_path / name, registry=server.url, dtype="x")
        h.root.mkdir()
        cred = h.root / "auth"
        cred.write_text(body)
        cred.chmod(0o600)
        h.extra_config["registry_auth"] = str(cred)
        h.write_config()
        proc = subprocess.run(
            [NBANKD, "check-config", "-c", str(h.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0, name
        assert str(cred) in proc.stdout + proc.stderr, name
        outputs.append(proc.stdout + proc.stderr)
    assert [leaks(o, secret_forms(server.username, password)) for o in outputs] == [[]] * 4


def test_nbankctl_auth_option_warns_and_never_echoes(django_registry: Any) -> None:
    """nbankctl -a user:pass warns that argv is visible, and its errors do not repeat it."""
    server = django_registry
    wrong = "wrong-" + secrets.token_urlsafe(12)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANK", "NETRC"))}
    env["HOME"] = tempfile.gettempdir()  # no ~/.netrc to fall back on
    runs = {
        "right": [NBANKCTL, "-r", server.url, "-a", f"{server.username}:{server.password}"],
        "wrong": [NBANKCTL, "-r", server.url, "-a", f"{server.username}:{wrong}"],
    }
    right = subprocess.run(
        [*runs["right"], "dtype", "list"], capture_output=True, text=True, timeout=60, env=env
    )
    refused = subprocess.run(
        [*runs["wrong"], "dtype", "add", "dt-" + secrets.token_hex(4), "text/plain"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert right.returncode == 0, right.stderr
    assert "visible" not in right.stdout
    for proc in (right, refused):
        assert "-a puts the password on the command line" in proc.stderr
    assert refused.returncode == errors.RegistryAuthError.exit_code == 3
    assert "invalid username/password" in refused.stderr
    assert leaks(right.stdout + right.stderr, [server.password.encode()]) == []
    assert leaks(refused.stdout + refused.stderr, secret_forms(server.username, wrong)) == []


# --- part three: the notifiers' secrets (SMTP password, webhook token) ------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    """A webhook receiver keeping each POST's body and Authorization header."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((json.loads(body), self.headers.get("Authorization")))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Mailbox:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.mails: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(envelope.content)
        return "250 OK"


def _smtp_server(folder: Path, accept: bool, logins: list[tuple[str, str]]) -> tuple[Any, Path]:
    """A local aiosmtpd server requiring STARTTLS (its own self-signed certificate, returned
    as the cafile) that records each login and accepts or refuses it."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = self_signed(folder, "smtp")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=accept, handled=False)  # refused: 535

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    box = _Mailbox()
    controller = Controller(
        box, hostname="127.0.0.1", port=port, tls_context=context,
        require_starttls=True, authenticator=authenticator,
    )  # fmt: skip
    controller.box = box  # type: ignore[attr-defined]
    controller.start()
    return controller, cert


NOTIFIER_CASES = [("accepted", "json"), ("refused", "console")]


@pytest.mark.parametrize(("login", "fmt"), NOTIFIER_CASES, ids=[c[0] for c in NOTIFIER_CASES])
def test_notifier_secrets_appear_nowhere(
    daemon_factory: Any, tmp_path: Path, login: str, fmt: str
) -> None:
    """SMTP password and webhook secrets stay out of logs, status, metrics and files."""
    user, password = "alerts", "smtp-" + secrets.token_urlsafe(12)
    token, secret_path = "tok-" + secrets.token_urlsafe(12), "path-" + secrets.token_hex(8)
    logins: list[tuple[str, str]] = []
    controller, cafile = _smtp_server(tmp_path, login == "accepted", logins)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    hook.posts = []  # type: ignore[attr-defined]
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    auth_file, token_file = creds / "smtp", creds / "hook-token"
    auth_file.write_text(f"{user}:{password}\n")
    token_file.write_text(token + "\n")
    for path in (auth_file, token_file):
        path.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    textfile = tmp_path / "nbankd.prom"
    alerts = {
        "email": {
            "to": ["lab@example.org"], "from": "nbankd@rig3.example.org",
            "smtp": f"127.0.0.1:{controller.port}", "starttls": True,
            "auth_file": str(auth_file), "cafile": str(cafile),
        },
        "webhook": {
            "url": f"http://127.0.0.1:{hook.server_address[1]}/hooks/{secret_path}",
            "token_file": str(token_file),
        },
        "check_every": "0.3s",
        "group_wait": "0s",
    }  # fmt: skip
    h = daemon_factory(
        extra_config={
            "alerts": alerts,
            "metrics": {
                "listen": f"127.0.0.1:{port}",
                "textfile": str(textfile),
                "textfile_every": "0.2s",
            },
            "log": {"format": fmt, "level": "debug"},
        }
    )
    try:
        h.start()
        h.drop("bad name.wav", b"rejected, so there is something to tell")
        wait_for(lambda: logins, 60, "the daemon to log in to the SMTP server")
        assert logins[0] == (user, password)  # the password was really sent
        if login == "accepted":
            wait_for(lambda: controller.box.mails, 60, "the alert email")  # type: ignore[attr-defined]
        else:
            wait_for(
                lambda: "email" in str(call(h.socket_path, "status")["alerts"]["problem"]),
                60,
                "status to name the refused login",
            )
        wait_for(lambda: hook.posts, 60, "the webhook")  # type: ignore[attr-defined]
        assert hook.posts[0][1] == f"Bearer {token}"  # type: ignore[attr-defined]
        wait_for(lambda: textfile.exists(), 30, "the textfile")
        outputs = {}
        for args in (["status"], ["status", "--json"]):
            proc = subprocess.run(
                [NBANKCTL, "-c", str(h.config_path), *args],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            outputs[" ".join(args)] = proc.stdout + proc.stderr
        if login == "refused":
            assert "alerts could not be sent (email:" in outputs["status"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            outputs["/metrics"] = resp.read().decode()
        outputs["textfile"] = textfile.read_text()
        assert h.stop() == 0
    finally:
        controller.stop()
        hook.shutdown()
        hook.server_close()
    pair = f"{user}:{password}".encode()
    forms = [
        password.encode(), pair, base64.b64encode(pair), base64.b64encode(password.encode()),
        base64.b64encode(f"\0{user}\0{password}".encode()),  # AUTH PLAIN
        token.encode(), secret_path.encode(),
    ]  # fmt: skip
    found = {k: leaks(v, forms) for k, v in outputs.items()}
    found["log"] = leaks(h.log_path.read_bytes(), forms)
    for mail in controller.box.mails:  # type: ignore[attr-defined]
        found["mail"] = leaks(mail, forms)
    for path in _files_under(h.root, {h.config_path}):  # the URL is configured there
        found[str(path)] = leaks(path.read_bytes(), forms)
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) > 5
    # each notifier keeps its own state: the email failing never re-sends the webhook
    assert len(hook.posts) == 1  # type: ignore[attr-defined]
