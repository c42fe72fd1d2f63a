"""docs/lab-deployment.md checked against the code and a real django-neurobank server.

Nothing here needs root or changes the host: the guide's blocks are read, not run,
except the rig-account script, which runs on the session's django-neurobank site.

- Every ```yaml block loads with nbankd's configuration loader without errors, and
  ``check_paths`` finds only the archive that does not exist on this machine.
- Every ``nbankd`` and ``nbankctl`` command line in a ```sh block (after ``sudo -u
  USER`` or ``systemd-run ... -p ...``) parses with the real argument parsers;
  gunicorn's ExecStart= in the ```ini block parses with gunicorn's own parser.
- Sections 2 to 4 on the session's private PostgreSQL: ``django-admin startproject``,
  the guide's settings.py (its DATABASES entry replaced by the test database's, the
  secret key's path by a scratch file) and urls.py, ``migrate``, ``check --deploy``
  (only the two warnings the guide names), and gunicorn run with the unit's
  ExecStart= (bound to a loopback socket of the test) answering ``info/`` for the
  guide's host name and refusing another (ALLOWED_HOSTS).
- Every ```python block compiles; the rig-account script (the block defining
  ``RIG_PERMISSIONS``) is run as the guide runs it, on the test site, and its
  account must deposit (``nbankctl deposit`` with the credential handed over as
  LoadCredential= hands it, and nbankd's HttpRegistry) while being refused what
  the guide says it cannot do; each permission it grants is shown to be needed.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from gunicorn.config import Config as GunicornConfig

from fixtures.cli_backends import base_env
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.django_server import SITE_PACKAGE, DjangoServer, unique_name
from fixtures.postgres import PostgresDatabase
from nbankctl.cli import build_parser, topics_for
from nbankd import errors
from nbankd.cli import build_parser as nbankd_parser
from nbankd.config import check_paths, parse_config_text
from nbankd.registry.http import HttpRegistry

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "lab-deployment.md"
BIN = Path(sys.executable).parent
NBANKCTL = str(BIN / "nbankctl")
FENCE = re.compile(r"^```(\w*)\s*$")
OPERATORS = ("&&", "||", ";", "|")
GUIDE_SETTINGS = "labsite.settings"
GUIDE_ARCHIVE = "/home/data/birdsong"
GUIDE_HOST = "neurobank.example.org"
GUIDE_SECRET = "/etc/neurobank/secret_key"
READY_DEADLINE = 60.0
# nbankctl commands the guide must show (a test that found none would prove nothing)
EXPECTED_CTL = {"registry switch", "dtype add", "init", "archive check", "status"}


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # of the block's first line in the guide
    text: str


def guide_blocks(lang: str) -> list[Block]:
    """The fenced blocks of the guide in the language ``lang``, in order."""
    found, lines, i = [], GUIDE.read_text().splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        i += 1
        if fence is None:
            continue
        start, body = i + 1, []
        while lines[i] != "```":
            body.append(lines[i])
            i += 1
        i += 1
        if fence.group(1) == lang:
            found.append(Block(lang, start, "\n".join(body) + "\n"))
    return found


def command_lines(block: Block) -> list[tuple[str, list[str]]]:
    """Each simple command of a sh block as (where, words), continuations joined."""
    text = block.text.replace("\\\n", " ")
    out = []
    for n, line in enumerate(text.splitlines()):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token in OPERATORS or token in (">", "<"):
                out.append((f"{GUIDE.name}:{block.line + n}", words))
                words = []
            else:
                words.append(token)
        out.append((f"{GUIDE.name}:{block.line + n}", words))
    return [(where, words) for where, words in out if words]


def unwrap(words: list[str]) -> list[str]:
    """The command run by ``sudo -u USER CMD`` or ``systemd-run [options] CMD``."""
    if words[:2] == ["sudo", "-u"]:
        return unwrap(words[3:])
    if words[:1] == ["systemd-run"]:
        i = 1
        while i < len(words) and words[i].startswith("-"):
            i += 2 if words[i] == "-p" else 1
        return unwrap(words[i:])
    return words


def program_lines(name: str) -> list[tuple[str, list[str]]]:
    """Every (where, argv after the program) of ``name`` in the guide's sh blocks."""
    found = []
    for block in guide_blocks("sh"):
        for where, words in command_lines(block):
            argv = unwrap(words)
            if argv and os.path.basename(argv[0]) == name:
                found.append((where, argv[1:]))
    return found


def parse_nbankctl(argv: list[str]) -> object:
    """argv parsed as nbankctl's main() parses it; a usage error raises SystemExit."""
    parser = build_parser(topics_for(argv))
    args, extra = parser.parse_known_args(argv)
    more = getattr(args, "more_positionals", None)
    if extra and (more is None or any(w.startswith("-") for w in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# --- the configuration and the command lines --------------------------------------


def test_yaml_blocks_load_with_only_the_missing_archive(tmp_path: Path) -> None:
    """Every yaml block loads without errors; paths report only the absent archive."""
    blocks = guide_blocks("yaml")
    assert len(blocks) >= 2
    for block in blocks:
        config, problems = parse_config_text(block.text, tmp_path / "config.yaml")
        assert config is not None, [str(p) for p in problems]
        assert [str(p) for p in problems if p.severity == "error"] == [], block.line
        for problem in check_paths(config):
            assert problem.severity == "warning", (block.line, str(problem))
            assert problem.key.startswith("archives[") and problem.key.endswith("].path")
            assert f"{GUIDE_ARCHIVE}/nbank.json does not exist" in problem.message


def test_rig_configuration_uses_the_lab_registry_with_no_auth_file(tmp_path: Path) -> None:
    """The rig's configuration names the lab's registry and leaves credentials to systemd."""
    config, _ = parse_config_text(guide_blocks("yaml")[0].text, tmp_path / "config.yaml")
    assert config is not None and not config.embedded
    assert config.registry == "https://neurobank.example.org/neurobank/"
    assert config.registry_auth is None  # LoadCredential= of the shipped unit
    assert [a.create for a in config.archives] == [False]


def test_nbankctl_command_lines_parse() -> None:
    """Every nbankctl line of the guide parses with nbankctl's own parser."""
    lines = program_lines("nbankctl")
    shown = set()
    for where, argv in lines:
        try:
            args = parse_nbankctl(argv)
        except SystemExit as stop:
            pytest.fail(f"{where}: nbankctl {shlex.join(argv)}: usage error ({stop.code})")
        assert getattr(args, "func", None) is not None, where
        words = [w for w in argv if not w.startswith("-") and "://" not in w]
        shown.update({words[0], " ".join(words[:2])})
    assert shown >= EXPECTED_CTL, EXPECTED_CTL - shown


def test_nbankd_command_lines_parse() -> None:
    """Every nbankd line of the guide parses with nbankd's own parser."""
    lines = program_lines("nbankd")
    assert len(lines) >= 2
    for where, argv in lines:
        try:
            args = nbankd_parser().parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"{where}: nbankd {shlex.join(argv)}: usage error ({stop.code})")
        assert args.command == "check-config", where


def test_gunicorn_exec_start_parses() -> None:
    """The registry unit's ExecStart= parses with gunicorn's parser and serves the site."""
    settings = gunicorn_unit()
    argv = shlex.split(settings["ExecStart"])
    assert argv[0] == "/opt/neurobank/bin/gunicorn"
    args = GunicornConfig().parser().parse_args(argv[1:])
    assert args.args == ["labsite.wsgi:application"]
    assert args.bind == ["127.0.0.1:8000"]  # loopback: TLS is nginx's
    assert settings["Environment"] == f"DJANGO_SETTINGS_MODULE={GUIDE_SETTINGS}"


def test_python_blocks_compile() -> None:
    """Every python block of the guide is valid Python."""
    blocks = guide_blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        compile(block.text, f"{GUIDE.name}:{block.line}", "exec")


def gunicorn_unit() -> dict[str, str]:
    """Key=value of the registry's unit (the guide's one ini block)."""
    (unit,) = guide_blocks("ini")
    lines = unit.text.splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^\w+=", line))


def guide_python(marker: str) -> str:
    """The python block of the guide holding ``marker``."""
    (block,) = [b for b in guide_blocks("python") if marker in b.text]
    return block.text


def run_checked(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def test_guide_site_migrates_and_serves_on_postgresql(
    tmp_path: Path, postgres_database: PostgresDatabase
) -> None:
    """Sections 2-4: startproject, the guide's settings and urls, migrate, gunicorn serve."""
    site, secret = tmp_path / "site", tmp_path / "secret_key"
    site.mkdir()
    secret.write_text("a-secret-key-for-this-test-only-" + os.urandom(16).hex() + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    run_checked([str(BIN / "django-admin"), "startproject", "labsite", str(site)], site, env)
    settings = guide_python("ROOT_URLCONF")
    assert GUIDE_SECRET in settings and "django.db.backends.postgresql" in settings
    database = postgres_database.django_settings()
    settings = settings.replace(repr(GUIDE_SECRET).replace("'", '"'), repr(str(secret)))
    (site / "labsite" / "settings.py").write_text(
        f"{settings}\nDATABASES = {{'default': {database!r}}}\n"
    )
    (site / "labsite" / "urls.py").write_text(guide_python("urlpatterns"))
    unit = gunicorn_unit()
    key, _, module = unit["Environment"].partition("=")
    env[key] = module
    manage = [sys.executable, "manage.py"]
    run_checked([*manage, "migrate", "--noinput"], site, env)
    deploy = run_checked([*manage, "check", "--deploy"], site, env)
    # the two the guide names: HSTS and the HTTPS redirect, left to nginx
    assert set(re.findall(r"\((\w+\.[WE]\d+)\)", deploy)) == {"security.W004", "security.W008"}
    argv = shlex.split(unit["ExecStart"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    bind = argv.index("--bind")
    argv[bind + 1] = f"fd://{sock.fileno()}"
    argv[0] = str(BIN / "gunicorn")
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            argv, cwd=site, env=env, stdout=out, stderr=out, pass_fds=(sock.fileno(),)
        )
    sock.close()
    try:
        url = f"http://127.0.0.1:{port}/neurobank/info/"
        deadline, answer = time.monotonic() + READY_DEADLINE, None
        while answer is None and time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            try:
                answer = requests.get(url, headers={"Host": GUIDE_HOST}, timeout=5)
            except requests.ConnectionError:
                time.sleep(0.1)  # polling interval of a bounded readiness probe
        assert answer is not None, log.read_text()
        assert answer.status_code == 200 and answer.json()["name"] == "django-neurobank"
        other = requests.get(url, headers={"Host": "elsewhere.example.org"}, timeout=5)
        assert other.status_code == 400  # ALLOWED_HOSTS
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- the rig account, on the real server ---------------------------------------------


def rig_script() -> str:
    """The guide's add-rig-account.py."""
    return guide_python("RIG_PERMISSIONS")


def prescribed_permissions() -> tuple[str, ...]:
    """RIG_PERMISSIONS as the guide's script defines it."""
    for node in ast.parse(rig_script()).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "RIG_PERMISSIONS":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("the rig-account script defines no RIG_PERMISSIONS")


def make_rig_account(server: DjangoServer, username: str) -> tuple[str, str]:
    """Runs the guide's script on the test site as the guide runs it; its credentials."""
    script = server.site_dir / f"add-rig-account-{username}.py"
    assert GUIDE_SETTINGS in rig_script()
    script.write_text(rig_script().replace(GUIDE_SETTINGS, f"{SITE_PACKAGE}.settings"))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    proc = subprocess.run(
        [server.python, str(script), username],
        cwd=server.site_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    user, _, password = proc.stdout.strip().partition(":")
    assert user == username and password
    return user, password


def revoke(server: DjangoServer, username: str, codename: str) -> None:
    server.shell(
        "from django.contrib.auth.models import Permission, User; "
        f"User.objects.get(username={username!r}).user_permissions.remove("
        f"Permission.objects.get(content_type__app_label='nbank_registry', codename={codename!r}))"
    )


@pytest.fixture
def rig_creds(django_registry: DjangoServer) -> tuple[str, str]:
    """A fresh rig account made by the guide's script: (username, password)."""
    return make_rig_account(django_registry, unique_name("nbankd-rig"))


@pytest.fixture
def rig(django_registry: DjangoServer, rig_creds: tuple[str, str]) -> HttpRegistry:
    """nbankd's client with the rig account's credentials."""
    return HttpRegistry(django_registry.url, rig_creds)


def test_prescribed_permissions_are_add_resource_and_add_location() -> None:
    """The guide grants the rig account exactly the two add permissions it names."""
    assert sorted(prescribed_permissions()) == ["add_location", "add_resource"]
    text = GUIDE.read_text()
    for codename in prescribed_permissions():
        assert f"`nbank_registry.{codename}`" in text


def test_rig_account_deposits_with_nbankctl(
    django_registry: DjangoServer, django_datatype: str, tmp_path: Path
) -> None:
    """A rig account deposits through nbankctl with its credential given as systemd gives it."""
    admin_home, rig_home, creds = tmp_path / "admin", tmp_path / "rig", tmp_path / "creds"
    for folder in (admin_home, rig_home, creds):
        folder.mkdir()
    django_registry.write_netrc(admin_home / ".netrc")
    user, password = make_rig_account(django_registry, unique_name("nbankd-rig"))
    (creds / "registry").write_text(f"{user}:{password}\n")  # the script's output line
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NBANK", "CREDENTIALS"))}
    base["NBANKD_CONFIG"] = str(tmp_path / "no-config.yaml")
    archive = tmp_path / unique_name("ar")
    url = django_registry.url
    made = subprocess.run(
        [NBANKCTL, "-r", url, "init", str(archive)],
        env={**base, "HOME": str(admin_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    data = os.urandom(64)
    ident = unique_name("zb")
    source = tmp_path / f"{ident}.bin"
    source.write_bytes(data)
    rig_env = {**base, "HOME": str(rig_home), "CREDENTIALS_DIRECTORY": str(creds)}
    done = subprocess.run(
        [NBANKCTL, "-r", url, "deposit", "-d", django_datatype, str(archive), str(source)],
        env=rig_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = HttpRegistry(url).get_resource(ident)
    assert record is not None and record.created_by == user
    assert record.sha1 == hashlib.sha1(data).hexdigest()
    assert [p.read_bytes() for p in (archive / "resources").rglob(f"{ident}*")] == [data]


def test_rig_account_passes_the_credential_check(rig: HttpRegistry) -> None:
    """check-config's and registry switch's credential check accepts the rig account."""
    rig.check_credentials()


def test_rig_account_adds_a_location(
    rig: HttpRegistry, django_registry: DjangoServer, django_datatype: str, tmp_path: Path
) -> None:
    """The rig account adds a second archive to a resource it registered."""
    first, second = (django_registry.add_archive(str(tmp_path / n)) for n in ("a", "b"))
    name = unique_name("zb")
    rig.add_resource(dtype=django_datatype, archive=first, name=name, sha1=os.urandom(20).hex())
    rig.add_location(name, second)
    record = rig.get_resource(name)
    assert record is not None and sorted(record.locations) == sorted([first, second])


def test_rig_account_cannot_delete_resources(
    rig: HttpRegistry,
    rig_creds: tuple[str, str],
    django_registry: DjangoServer,
    django_archive: str,
    django_datatype: str,
) -> None:
    """DELETE of a resource by the rig account is refused and the record stays."""
    name = unique_name("zb")
    rig.add_resource(dtype=django_datatype, archive=django_archive, name=name)
    gone = requests.delete(f"{django_registry.url}resources/{name}/", auth=rig_creds, timeout=30)
    assert gone.status_code == 403
    assert rig.get_resource(name) is not None


def test_rig_account_cannot_change_or_unlocate_resources(
    rig: HttpRegistry, django_archive: str, django_datatype: str
) -> None:
    """Changing metadata and removing a location are refused for the rig account."""
    name = unique_name("zb")
    rig.add_resource(dtype=django_datatype, archive=django_archive, name=name)
    with pytest.raises(errors.RegistryAuthError):
        rig.update_metadata(name, {"bird": "b1"})
    with pytest.raises(errors.RegistryAuthError):
        rig.remove_location(name, django_archive)
    record = rig.get_resource(name)
    assert record is not None and list(record.locations) == [django_archive]
    assert "bird" not in (record.metadata or {})


def test_rig_account_cannot_add_archives_or_datatypes(rig: HttpRegistry, tmp_path: Path) -> None:
    """Registering an archive or a datatype is refused for the rig account."""
    with pytest.raises(errors.RegistryAuthError):
        rig.add_archive(unique_name("ar"), "neurobank", str(tmp_path))
    with pytest.raises(errors.RegistryAuthError):
        rig.add_datatype(unique_name("dt"), "application/octet-stream")


def test_without_add_resource_the_rig_cannot_deposit(
    django_registry: DjangoServer, django_archive: str, django_datatype: str
) -> None:
    """add_resource is needed: without it the credential check and registering fail."""
    user, password = make_rig_account(django_registry, unique_name("nbankd-rig"))
    revoke(django_registry, user, "add_resource")
    reg = HttpRegistry(django_registry.url, (user, password))
    with pytest.raises(errors.RegistryAuthError):
        reg.check_credentials()
    with pytest.raises(errors.RegistryAuthError):
        reg.add_resource(dtype=django_datatype, archive=django_archive, name=unique_name("zb"))


def test_without_add_location_the_rig_cannot_add_a_location(
    django_registry: DjangoServer, django_datatype: str, tmp_path: Path
) -> None:
    """add_location is needed: without it adding an archive to a resource fails."""
    user, password = make_rig_account(django_registry, unique_name("nbankd-rig"))
    revoke(django_registry, user, "add_location")
    reg = HttpRegistry(django_registry.url, (user, password))
    first, second = (django_registry.add_archive(str(tmp_path / n)) for n in ("a", "b"))
    name = unique_name("zb")
    reg.add_resource(dtype=django_datatype, archive=first, name=name)
    with pytest.raises(errors.RegistryAuthError):
        reg.add_location(name, second)


def test_switch_imports_as_the_admin_and_the_daemon_deposits_as_the_rig(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """Section 8: root's netrc (the admin) imports, LoadCredential= (the rig) deposits."""
    user, password = make_rig_account(django_registry, unique_name("nbankd-rig"))
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "registry").write_text(f"{user}:{password}\n")
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    before = unique_name("one")
    h.drop(f"{before}.wav", os.urandom(500))
    h.wait_settled(1)
    env = base_env(tmp_path / "home")
    django_registry.write_netrc(tmp_path / "home" / ".netrc")  # the lab administrator
    switch = [NBANKCTL, "-c", str(h.config_path), "registry", "switch"]
    switch += ["--to", django_registry.url]
    for argv in ([*switch, "--dry-run"], switch):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
    reg = HttpRegistry(django_registry.url)
    imported = reg.get_resource(before)
    assert imported is not None and imported.created_by == django_registry.username
    after = unique_name("two")
    h.drop(f"{after}.wav", os.urandom(600))
    wait_for(lambda: any(r["id"] == after for r in h.receipts()), 60, "a deposit after it")
    deposited = reg.get_resource(after)
    assert deposited is not None and deposited.created_by == user
    h.stop()
