"""A django-neurobank 0.12 site served by gunicorn, for the benchmarks.

Same recipe as the test fixture (``tests/fixtures/django_server.py``): a minimal
Django project with SQLite, migrated, one superuser, served on a loopback port
by gunicorn. Two differences: the password hasher is chosen by the caller (the
fast MD5 hasher the tests use, or Django's default PBKDF2, which costs about a
second of server CPU for every authenticated request), and nothing is logged
per request (an access log would slow the server being measured).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

PKG = "benchsite"
FAST_HASHER = "django.contrib.auth.hashers.MD5PasswordHasher"
DEFAULT_HASHER = "django.contrib.auth.hashers.PBKDF2PasswordHasher"

_SETTINGS = """\
from pathlib import Path
BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = {secret!r}
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
    "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
    "rest_framework", "django_filters", "nbank_registry",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "{pkg}.urls"
TEMPLATES = [{{"BACKEND": "django.template.backends.django.DjangoTemplates",
              "APP_DIRS": True, "OPTIONS": {{"context_processors": [
                  "django.template.context_processors.request",
                  "django.contrib.auth.context_processors.auth",
                  "django.contrib.messages.context_processors.messages"]}}}}]
WSGI_APPLICATION = "{pkg}.wsgi.application"
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3",
                         "NAME": BASE_DIR / "db.sqlite3", "OPTIONS": {{"timeout": 20}}}}}}
PASSWORD_HASHERS = [{hasher!r}]
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
SENDFILE_BACKEND = "django_sendfile.backends.simple"
SENDFILE_ROOT = "/"
REST_FRAMEWORK = {{"PAGE_SIZE": 100}}
SILENCED_SYSTEM_CHECKS = ["rest_framework.W001"]
"""

_URLS = (
    "from django.urls import include, path\n"
    'urlpatterns = [path("neurobank/", include("nbank_registry.urls"))]\n'
)
_WSGI = (
    "import os\n"
    "from django.core.wsgi import get_wsgi_application\n"
    f'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{PKG}.settings")\n'
    "application = get_wsgi_application()\n"
)
_USERS = (
    "from django.contrib.auth.models import User\n"
    "User.objects.create_superuser({user!r}, 'bench@example.org', {pw!r})\n"
)


@dataclass
class Server:
    """A running django-neurobank site; stop() ends gunicorn."""

    url: str  # .../neurobank/
    username: str
    password: str
    site_dir: Path
    hasher: str
    workers: int
    proc: subprocess.Popen[bytes]

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def write_netrc(self, home: Path) -> Path:
        """Writes HOME/.netrc for this server (the way `nbank` users authenticate)."""
        path = home / ".netrc"
        path.write_text(f"machine {self.host}\nlogin {self.username}\npassword {self.password}\n")
        path.chmod(0o600)
        return path

    def post(self, endpoint: str, body: dict[str, object]) -> None:
        r = requests.post(self.url + endpoint, json=body, auth=self.auth, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"POST {endpoint} {body} -> {r.status_code} {r.text[:300]}")

    def add_datatype(self, name: str) -> str:
        self.post("datatypes/", {"name": name, "content_type": "application/octet-stream"})
        return name

    def add_archive(self, name: str, root: Path) -> str:
        self.post("archives/", {"name": name, "scheme": "neurobank", "root": str(root)})
        return name

    def resource_count(self) -> int:
        """How many resources the server holds (reads the Link header's last page)."""
        r = requests.get(self.url + "resources/", timeout=60)
        r.raise_for_status()
        last = r.links.get("last", {}).get("url")
        if last is None:
            return len(r.json())
        page = int(last.rsplit("page=", 1)[1].split("&")[0])
        tail = requests.get(last, timeout=60).json()
        return (page - 1) * 100 + len(tail)

    def server_cpu_seconds(self) -> float:
        """CPU time (user+system) used so far by gunicorn and its workers."""
        return sum(_cpu_seconds(pid) for pid in process_tree(self.proc.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants."""
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for kid in kids:
        out += process_tree(int(kid))
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["DJANGO_SETTINGS_MODULE"] = f"{PKG}.settings"
    return env


def _manage(site: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(site / "manage.py"), *args],
        cwd=site,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")


def start_server(site: Path, *, hasher: str = FAST_HASHER, workers: int = 2) -> Server:
    """Writes, migrates and serves a fresh site under ``site``; returns once it answers."""
    pkg = site / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "settings.py").write_text(
        _SETTINGS.format(secret=secrets.token_urlsafe(40), pkg=PKG, hasher=hasher)
    )
    (pkg / "urls.py").write_text(_URLS)
    (pkg / "wsgi.py").write_text(_WSGI)
    (site / "manage.py").write_text(
        "import sys\nfrom django.core.management import execute_from_command_line\n"
        "execute_from_command_line(sys.argv)\n"
    )
    _manage(site, "migrate", "--noinput")
    user, pw = "bench-admin", secrets.token_urlsafe(16)
    _manage(site, "shell", "-c", _USERS.format(user=user, pw=pw))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    log = (site / "gunicorn.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"fd://{sock.fileno()}",
            "--workers",
            str(workers),
            "--backlog",
            "1024",
            "--no-control-socket",
            "--timeout",
            "300",
            "--error-logfile",
            "-",
            f"{PKG}.wsgi:application",
        ],
        cwd=site,
        env=_env(site),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        pass_fds=(sock.fileno(),),
    )
    log.close()
    sock.close()
    url = f"http://127.0.0.1:{port}/neurobank/"
    server = Server(url, user, pw, site, hasher, workers, proc)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited ({proc.returncode}); see {site}/gunicorn.log")
        try:
            if requests.get(url + "info/", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"django-neurobank not ready after 60 s; see {site}/gunicorn.log")
        time.sleep(0.1)  # readiness probe interval
