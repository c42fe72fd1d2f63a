"""The deployment guide's install path, pasted top to bottom into a scratch root.

docs/deployment.md is the source: the ```sh blocks of its sections 1 to 6 run in
document order, each with ``bash -xeu -o pipefail`` in the folder the one before left
(as pasted into one terminal). A block right after ``<!-- guide-test: alternative -->``
is an alternative and is left out (the by-hand ``useradd``; the embedded registry's
``sudo -u nbankd nbankctl init``). Each logical line (``\\`` continuations joined,
``#`` comments dropped; only simple commands joined by ``&&``, ``||``, ``;`` or ``|``)
is translated just before its block runs, so a step that needs a user before the guide
made it fails. The translation table:

Left out (run as ``: skipped: ...``):
    apt-get                            the machine has its packages
    python3 -m venv /opt/nbankd,
    /opt/nbankd/bin/pip                /opt/nbankd is the virtualenv running the tests
    systemctl, systemd-analyze         no systemd as PID 1 here (test_unit_file.py
                                       verifies and rates the unit offline)
Rewritten:
    $EDITOR FILE                       ``cp`` of FILE's new content into FILE (owner and
                                       mode kept): /etc/nbankd/config.yaml gets the
                                       ```yaml block of "Configuration", translated as
                                       below; /etc/nbankd/registry-credentials the test
                                       server's credentials (netrc format); any other
                                       FILE fails
    https://neurobank.example.org/neurobank/
                                       the ``django_registry`` server's URL
    birdsong, vocalization-wav, spikes-pprox
                                       the same with a unique suffix (the server is
                                       shared by the session)
    /etc, /srv, /home/data, /var/lib/nbankd, /run/nbankd, /usr/local/bin
                                       ROOT/etc, ... (ROOT: the scratch root)
    /opt/nbankd                        the virtualenv running the tests
    /path/to/nbankd                    this source tree
    /dev/null                          itself
    any other absolute path, any URL   the test fails, naming the guide's line
    systemd-sysusers, systemd-tmpfiles ``--root=ROOT`` added (a tmpfiles.d file named
                                       on the command line is read from the host, so
                                       it is mapped too)
    useradd, usermod, groupadd         ``--root ROOT`` added (their arguments are names
                                       and paths inside ROOT: not mapped)
    install -o USER -g GROUP           numeric ids from ROOT/etc/passwd, ROOT/etc/group
    sudo -u USER CMD                   CMD as USER (below)
    systemd-run --pipe --wait --quiet -p User=USER -p LoadCredential=ID:FILE CMD
                                       CMD as USER with ``$CREDENTIALS_DIRECTORY`` a new
                                       folder of USER's (0500) holding a copy of FILE
                                       named ID (0400), as LoadCredential= makes it;
                                       other options and properties fail

"As USER": ``setpriv`` with USER's uid, gid and groups (its own and every group that
lists it, as initgroups) from ROOT/etc/passwd and ROOT/etc/group, an environment of
HOME (USER's home, mapped), USER, LOGNAME, PATH, LANG and NBANKD_CONFIG only, in a
private mount namespace where ROOT/etc/passwd and ROOT/etc/group are bind-mounted over
the host's: nbankctl and nbankd look ``nbankd`` and ``lab`` up by name, and the host
has neither. Every command has PATH=ROOT/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
(the guide's symlinks, not the virtualenv's bin) and NBANKD_CONFIG=
ROOT/etc/nbankd/config.yaml (nbankd's built-in /etc/nbankd/config.yaml, mapped); root's
HOME is ROOT/root, whose .netrc is the admin account the guide adds datatypes with, and
its umask 022 (Debian's).

Before the guide, ROOT is a fresh Debian 12 host: its folders (no /etc/sysusers.d),
root, the lab group and a rig user ``rig3`` in it; the server knows the configuration's
experimenter. After the guide, nbankd starts as the installed unit starts it: its
ExecStart= translated as a systemd-run with the unit's User= and LoadCredential=, its
UMask=, its RuntimeDirectory= made (ROOT/run/nbankd). rig3 drops a file into the
configured inbox (umask 002); its receipt in state_dir and its copy in the archive must
appear, and nbankd must exit 0 on SIGTERM.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fixtures.django_server import DjangoServer, unique_name

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "deployment.md"
GUIDE_NAME = "docs/deployment.md"
VENV = Path(sys.prefix)
INSTALL_SECTIONS = range(1, 7)
CONFIG_SECTION = "Configuration"
ALTERNATIVE = "<!-- guide-test: alternative -->"
GUIDE_URL = "https://neurobank.example.org/neurobank/"
REGISTRY_NAMES = ("birdsong", "vocalization-wav", "spikes-pprox")
IN_ROOT = ("/etc", "/srv", "/home/data", "/var/lib/nbankd", "/run/nbankd", "/usr/local/bin")
# a Debian 12 host with systemd has these (and no /etc/sysusers.d)
HOST_FOLDERS = ("etc/systemd/system", "etc/tmpfiles.d", "usr/local/bin", "var/lib", "run")
HOST_FOLDERS += ("srv", "home")
ROOT_UMASK = 0o022  # root's umask on Debian
LAB, RIG = "lab", "rig3"  # the guide's lab group must exist before it; rig3 is a lab member
SKIPPED = ("apt-get", "systemctl", "systemd-analyze")
WITH_ROOT_OPTION = ("useradd", "usermod", "groupadd")
OPERATORS = ("&&", "||", ";", "|")
UNSAFE = re.compile(r"[$`*?{}]|^~")
TOOLS = ("bash", "unshare", "mount", "setpriv", "systemd-sysusers", "systemd-tmpfiles")
TOOLS += WITH_ROOT_OPTION
BIND_USER_DB = (
    'mount --bind "$1/etc/passwd" /etc/passwd && mount --bind "$1/etc/group" /etc/group'
    ' && shift && exec "$@"'
)
DEPOSIT_DEADLINE = 40.0
STOP_DEADLINE = 30.0
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
SECTION = re.compile(r"^## (\d+)\. (.*)$")


@dataclass(frozen=True)
class Line:
    """A logical line (continuations joined); ``where`` names it for error messages."""

    where: str
    text: str


@dataclass(frozen=True)
class Block:
    """A fenced block of the guide, with its section's number and title."""

    lang: str
    section: int
    title: str
    lines: tuple[Line, ...]
    alternative: bool


@dataclass(frozen=True)
class Account:
    """A user of the scratch root."""

    uid: int
    gid: int
    home: str


class Untranslatable(Exception):
    """A guide line the translation table does not cover."""

    def __init__(self, line: Line, why: str) -> None:
        super().__init__(f"{line.where}: {line.text!r}: {why}")


def _tool(name: str) -> str:
    """Returns the path of a tool this test needs; its absence fails the test."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed (util-linux, mount, passwd, systemd)")
    return path


def _logical_lines(body: list[tuple[int, str]]) -> Iterator[Line]:
    """Joins ``\\`` continuations; blank lines are dropped, indentation is kept."""
    number, parts = 0, []
    for n, text in body:
        if not parts:
            number = n
        if text.endswith("\\"):
            parts.append(text[:-1])
            continue
        joined = " ".join([*(p.strip() for p in parts), text.strip()]) if parts else text
        parts = []
        if joined.strip():
            yield Line(f"{GUIDE_NAME}:{number}", joined.rstrip())


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a markdown text, in order."""
    blocks: list[Block] = []
    section, title, previous = 0, "", ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if heading := SECTION.match(lines[i]):
            section, title = int(heading.group(1)), heading.group(2).strip()
        fence = FENCE.match(lines[i])
        if fence is None:
            previous = lines[i].strip() or previous
            i += 1
            continue
        indent, lang, body = fence.group(1), fence.group(2), []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append((i + 1, lines[i].removeprefix(indent)))
            i += 1
        logical = tuple(_logical_lines(body))
        blocks.append(Block(lang, section, title, logical, previous == ALTERNATIVE))
        previous = ""
        i += 1
    return blocks


def install_blocks(text: str) -> list[Block]:
    """The ```sh blocks of the install sections, in order, alternatives left out."""
    return [
        b
        for b in parse_blocks(text)
        if b.lang == "sh" and b.section in INSTALL_SECTIONS and not b.alternative
    ]


def config_block(text: str) -> Block:
    """The ```yaml block of the configuration section."""
    found = [b for b in parse_blocks(text) if b.lang == "yaml" and b.title == CONFIG_SECTION]
    assert len(found) == 1, f"expected one ```yaml block in {CONFIG_SECTION!r}, found {found}"
    return found[0]


@dataclass
class Scratch:
    """The scratch root, and the translation of guide lines into it."""

    root: Path
    registry_url: str
    names: dict[str, str] = field(default_factory=dict)
    edits: dict[str, Path] = field(default_factory=dict)  # $EDITOR FILE -> its new content
    _folders: Iterator[int] = field(default_factory=itertools.count)

    # --- names, URLs and paths -----------------------------------------------------

    def rename(self, text: str) -> str:
        """The registry URL and registry names replaced by the test's."""
        text = text.replace(GUIDE_URL, self.registry_url)
        if not self.names:
            return text
        names = "|".join(re.escape(n) for n in self.names)
        return re.sub(rf"(?<![\w-])({names})(?![\w-])", lambda m: self.names[m[1]], text)

    def map_path(self, path: str, line: Line) -> str:
        """Where an absolute path of the guide is for this test."""
        table = [("/path/to/nbankd", str(REPO)), ("/opt/nbankd", str(VENV))]
        table += [("/dev/null", "/dev/null")] + [(p, f"{self.root}{p}") for p in IN_ROOT]
        for prefix, target in table:
            if path == prefix or path.startswith(prefix + "/"):
                return target + path[len(prefix) :]
        raise Untranslatable(line, f"unknown absolute path {path} (not in the translation table)")

    def map_word(self, word: str, line: Line) -> str:
        """A word with its absolute paths (whole, or after ``=`` or ``:``) mapped."""
        if "://" in word:
            if word.startswith(self.registry_url):
                return word
            raise Untranslatable(line, f"unknown URL in {word!r}")
        return re.sub(r"(?<![^=:])/\S*", lambda m: self.map_path(m[0], line), word)

    def map_words(self, words: list[str], line: Line) -> list[str]:
        """Every word mapped."""
        return [self.map_word(w, line) for w in words]

    def translate_text(self, line: Line) -> str:
        """A line of a file the guide gives (not a command), mapped like a command's words."""
        text = self.rename(line.text)
        for url in re.findall(r"\w+://\S+", text):
            if not url.startswith(self.registry_url):
                raise Untranslatable(line, f"unknown URL {url}")
        return re.sub(r"(?<![\w/.:~-])/[\w./-]+", lambda m: self.map_path(m[0], line), text)

    # --- users of the scratch root ---------------------------------------------------

    def _entries(self, name: str) -> list[list[str]]:
        path = self.root / "etc" / name
        text = path.read_text() if path.exists() else ""
        return [entry.split(":") for entry in text.splitlines() if entry]

    def account(self, user: str, line: Line) -> Account:
        """The user's entry in ROOT/etc/passwd, as it is now."""
        for entry in self._entries("passwd"):
            if entry[0] == user:
                return Account(int(entry[2]), int(entry[3]), entry[5])
        raise Untranslatable(line, f"user {user} is not in {self.root}/etc/passwd (yet)")

    def group_id(self, group: str, line: Line) -> int:
        """The group's id in ROOT/etc/group, as it is now."""
        for entry in self._entries("group"):
            if entry[0] == group:
                return int(entry[2])
        raise Untranslatable(line, f"group {group} is not in {self.root}/etc/group (yet)")

    def groups(self, user: str, gid: int) -> list[int]:
        """The user's groups as initgroups gives them: its own and every listing it."""
        members = [int(e[2]) for e in self._entries("group") if user in e[3].split(",")]
        return sorted({gid, *members})

    def environment(self, home: str | None = None) -> dict[str, str]:
        """The environment of every command (root's unless ``home`` is given)."""
        env = {
            "PATH": f"{self.root}/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "NBANKD_CONFIG": f"{self.root}/etc/nbankd/config.yaml",
            "HOME": home or f"{self.root}/root",
        }
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def as_user(self, user: str, line: Line, extra: dict[str, str] | None = None) -> list[str]:
        """The argv prefix that runs a command as ``user`` of the scratch root."""
        account = self.account(user, line)
        env = self.environment(self.map_path(account.home, line))
        env |= {"USER": user, "LOGNAME": user, **(extra or {})}
        groups = ",".join(str(g) for g in self.groups(user, account.gid))
        # setpriv comes last and execs the command itself, as tests/fixtures/users.py does
        return [
            *("unshare", "--mount", "--", "sh", "-c", BIND_USER_DB, "sh", str(self.root)),
            *("env", "-i", *(f"{key}={value}" for key, value in env.items())),
            *("setpriv", f"--reuid={account.uid}", f"--regid={account.gid}"),
            *(f"--groups={groups}", "--inh-caps=-all", "--"),
        ]

    # --- commands ------------------------------------------------------------------------

    def translate(self, line: Line) -> list[str]:
        """The shell lines that do in the scratch root what ``line`` does on a host."""
        lexer = shlex.shlex(self.rename(line.text), posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        tokens = list(lexer)
        comment = next((i for i, t in enumerate(tokens) if t.startswith("#")), len(tokens))
        commands: list[list[str]] = [[]]
        operators: list[str] = []
        for token in tokens[:comment]:
            if token in OPERATORS:
                operators.append(token)
                commands.append([])
            elif set(token) <= set("();<>|&"):
                raise Untranslatable(line, f"{token!r}: only simple commands are translated")
            else:
                commands[-1].append(token)
        if commands == [[]]:
            return []
        prelude, parts = [], []
        for words in commands:
            if not words:
                raise Untranslatable(line, "an empty command")
            before, argv = self.command(words, line)
            prelude += before
            parts.append(shlex.join(argv))
        pairs = zip(operators, parts[1:], strict=True)
        joined = parts[0] + "".join(f" {op} {part}" for op, part in pairs)
        return [*prelude, joined]

    def command(self, words: list[str], line: Line) -> tuple[list[str], list[str]]:
        """One simple command: shell lines to run first, and its argv."""
        name = words[0]
        venv = words[:3] == ["python3", "-m", "venv"]
        if name in SKIPPED or venv or name == "/opt/nbankd/bin/pip":
            return [], [":", "skipped:", *words]
        if name == "$EDITOR":
            if len(words) != 2 or words[1] not in self.edits:
                raise Untranslatable(line, "no content to write for this $EDITOR")
            return [], ["cp", str(self.edits[words[1]]), self.map_path(words[1], line)]
        if unsafe := [w for w in words if UNSAFE.search(w)]:
            raise Untranslatable(line, f"expansions are not translated: {unsafe}")
        if name in ("systemd-sysusers", "systemd-tmpfiles"):
            return [], [name, f"--root={self.root}", *self.map_words(words[1:], line)]
        if name in WITH_ROOT_OPTION:
            return [], [name, "--root", str(self.root), *words[1:]]
        if name == "install":
            return [], self.install(words, line)
        if name == "sudo":
            if words[1:2] != ["-u"] or len(words) < 4:
                raise Untranslatable(line, "only `sudo -u USER CMD` is translated")
            return [], self.as_user(words[2], line) + self.map_words(words[3:], line)
        if name == "systemd-run":
            return self.systemd_run(words, line)
        return [], self.map_words(words, line)

    def install(self, words: list[str], line: Line) -> list[str]:
        """``install`` with -o/-g as numeric ids of the scratch root, paths mapped."""
        argv, i = ["install"], 1
        while i < len(words):
            if words[i] == "-o" and i + 1 < len(words):
                argv += ["-o", str(self.account(words[i + 1], line).uid)]
                i += 2
            elif words[i] == "-g" and i + 1 < len(words):
                argv += ["-g", str(self.group_id(words[i + 1], line))]
                i += 2
            else:
                argv.append(self.map_word(words[i], line))
                i += 1
        return argv

    def systemd_run(self, words: list[str], line: Line) -> tuple[list[str], list[str]]:
        """``systemd-run -p User= -p LoadCredential=``: as the user, credentials copied."""
        user, i = None, 1
        credentials: list[tuple[str, str]] = []
        while i < len(words) and words[i].startswith("-"):
            if words[i] in ("--pipe", "--wait", "--quiet"):
                i += 1
                continue
            if words[i] != "-p" or i + 1 == len(words):
                raise Untranslatable(line, f"systemd-run option {words[i]} is not imitated")
            key, _, value = words[i + 1].partition("=")
            if key == "User":
                user = value
            elif key == "LoadCredential" and ":" in value:
                ident, _, path = value.partition(":")
                credentials.append((ident, path))
            else:
                raise Untranslatable(line, f"systemd-run property {key}= is not imitated")
            i += 2
        if user is None or i == len(words):
            raise Untranslatable(line, "systemd-run without -p User= or without a command")
        account = self.account(user, line)
        owner = ["-o", str(account.uid), "-g", str(account.gid)]
        folder = self.root / "run" / "credentials" / f"guide-{next(self._folders)}.service"
        prelude = [shlex.join(["install", "-d", "-m", "0500", *owner, str(folder)])]
        for ident, path in credentials:
            copy = ["install", "-m", "0400", *owner, self.map_path(path, line), str(folder / ident)]
            prelude.append(shlex.join(copy))
        extra = {"CREDENTIALS_DIRECTORY": str(folder)} if credentials else {}
        return prelude, self.as_user(user, line, extra) + self.map_words(words[i:], line)

    def script(self, lines: tuple[Line, ...]) -> str:
        """A bash script of translated lines, each after a no-op naming its guide line."""
        out = []
        for line in lines:
            out.append(shlex.join([":", line.where]))
            out += self.translate(line)
        return "\n".join(out)


# --- the scratch host ----------------------------------------------------------------


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, repeated keys kept in order."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def make_fresh_host(root: Path, admin_netrc: str) -> None:
    """A Debian 12 host's folders, root, the lab group and a rig user in it."""
    root.mkdir()
    root.chmod(0o755)
    for folder in HOST_FOLDERS:
        path = root
        for part in Path(folder).parts:
            path /= part
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
    (root / "root").mkdir(mode=0o700)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for argv in (["groupadd", LAB], ["useradd", "--gid", LAB, "--no-create-home", RIG]):
        subprocess.run(
            [_tool(argv[0]), "--root", str(root), *argv[1:]],
            check=True,
            capture_output=True,
            timeout=60,
        )
    netrc = root / "root" / ".netrc"
    netrc.write_text(admin_netrc)
    netrc.chmod(0o600)


@pytest.fixture
def scratch_base() -> Iterator[Path]:
    """A fresh folder under /tmp that every user may traverse (pytest's tmp is 0700)."""
    if os.geteuid() != 0:
        pytest.fail("the guide's install path needs root (users, chown, mount namespaces)")
    for tool in TOOLS:
        _tool(tool)
    base = Path(tempfile.mkdtemp(prefix="nbankd-guide-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def scratch(scratch_base: Path, django_registry: DjangoServer) -> Scratch:
    """A fresh host in a scratch root, and what the guide's $EDITOR lines write."""
    names = {name: unique_name(name) for name in REGISTRY_NAMES}
    scratch = Scratch(scratch_base / "root", django_registry.url, names)
    make_fresh_host(scratch.root, django_registry.netrc_text())
    edits = scratch_base / "edits"
    edits.mkdir(mode=0o700)
    config = "\n".join(
        scratch.translate_text(line) for line in config_block(GUIDE.read_text()).lines
    )
    (edits / "config.yaml").write_text(config + "\n")
    (edits / "registry-credentials").write_text(django_registry.netrc_text())
    scratch.edits = {
        "/etc/nbankd/config.yaml": edits / "config.yaml",
        "/etc/nbankd/registry-credentials": edits / "registry-credentials",
    }
    experimenter = yaml.safe_load(config)["inboxes"][0]["metadata"]["experimenter"]
    django_registry.shell(
        "from django.contrib.auth.models import User; "
        f"User.objects.get_or_create(username={experimenter!r})"
    )
    return scratch


def run_guide(scratch: Scratch, blocks: list[Block]) -> None:
    """Runs the blocks in order, each in the folder the one before left."""
    cwd, cwd_file = scratch.root / "root", scratch.root.parent / "cwd"
    for block in blocks:
        script = f"{scratch.script(block.lines)}\npwd > {shlex.quote(str(cwd_file))}"
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-xeuo", "pipefail", "-c", script],
            cwd=cwd,
            env=scratch.environment(),
            capture_output=True,
            text=True,
            timeout=120,
            umask=ROOT_UMASK,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"the guide's block at {block.lines[0].where} failed (exit {proc.returncode})"
                f"\n--- translated:\n{script}\n--- output:\n{proc.stdout}{proc.stderr}"
            )
        cwd = Path(cwd_file.read_text().strip())


def start_service(scratch: Scratch, log: Path) -> subprocess.Popen[bytes]:
    """nbankd as the installed unit starts it (User=, LoadCredential=, UMask=, ...)."""
    unit_path = scratch.root / "etc" / "systemd" / "system" / "nbankd.service"
    unit = _unit_settings(unit_path)
    where = Line(f"{unit_path.name} ExecStart=", unit["ExecStart"][0])
    (user,) = unit["User"]
    account = scratch.account(user, where)
    for name in unit.get("RuntimeDirectory", []):
        folder = scratch.root / "run" / name
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(int(unit["RuntimeDirectoryMode"][0], 8))
        os.chown(folder, account.uid, account.gid)
    properties = [f"User={user}", *(f"LoadCredential={c}" for c in unit["LoadCredential"])]
    run = ["systemd-run", *itertools.chain.from_iterable(("-p", p) for p in properties)]
    lines = scratch.translate(Line(where.where, f"{shlex.join(run)} {where.text}"))
    script = "\n".join([*lines[:-1], f"exec {lines[-1]}"])
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", script],
            env=scratch.environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            umask=int(unit["UMask"][0], 8),
        )


def drop_as_rig(scratch: Scratch, path: Path, data: bytes) -> None:
    """Writes a file as the rig user, a member of the lab group, with umask 002."""
    rig = scratch.account(RIG, Line("the rig", ""))
    groups = ",".join(str(g) for g in scratch.groups(RIG, rig.gid))
    ids = [f"--reuid={rig.uid}", f"--regid={rig.gid}", f"--groups={groups}", "--inh-caps=-all"]
    subprocess.run(
        [_tool("setpriv"), *ids, "--", "sh", "-c", 'umask 002 && cat > "$1"', "sh", str(path)],
        input=data,
        check=True,
        timeout=30,
    )


def wait_for_receipt(
    daemon: subprocess.Popen[bytes], state_dir: Path, ident: str, log: Path
) -> dict[str, object]:
    """The receipt of ``ident`` once its archive copy exists; fails at the deadline."""
    deadline = time.monotonic() + DEPOSIT_DEADLINE
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            pytest.fail(f"nbankd exited with {daemon.returncode}:\n{_tail(log)}")
        for path in sorted((state_dir / "receipts").glob("*.jsonl")):
            for text in path.read_text().splitlines():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:  # a line being appended
                    continue
                if record.get("id") == ident and Path(record["archive_path"]).exists():
                    return record  # type: ignore[no-any-return]
        time.sleep(0.2)  # polling interval under the deadline
    pytest.fail(f"no receipt for {ident} after {DEPOSIT_DEADLINE:.0f} s:\n{_tail(log)}")


# --- tests -------------------------------------------------------------------------------


def test_guide_install_path_makes_a_service_that_deposits(scratch: Scratch) -> None:
    """Sections 1-6 pasted in order leave a service that deposits and stops cleanly."""
    run_guide(scratch, install_blocks(GUIDE.read_text()))
    config = yaml.safe_load((scratch.root / "etc" / "nbankd" / "config.yaml").read_text())
    inbox, archive = Path(config["inboxes"][0]["path"]), Path(config["archives"][0]["path"])
    log = scratch.root.parent / "nbankd.log"
    daemon = start_service(scratch, log)
    try:
        ident, data = unique_name("zb"), os.urandom(4096)
        drop_as_rig(scratch, inbox / f"{ident}.wav", data)
        receipt = wait_for_receipt(daemon, Path(config["state_dir"]), ident, log)
        stored = Path(str(receipt["archive_path"]))
        assert stored.is_relative_to(archive / "resources")
        assert stored.read_bytes() == data
        assert str(receipt["url"]).startswith(scratch.registry_url)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=STOP_DEADLINE) == 0, _tail(log)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=STOP_DEADLINE)


def test_unknown_absolute_path_fails_naming_the_line(tmp_path: Path) -> None:
    """A path outside the translation table stops the test, naming the guide's line."""
    scratch = Scratch(tmp_path, "http://127.0.0.1:9/neurobank/")
    line = Line(f"{GUIDE_NAME}:42", "install -d -m 0755 /opt/elsewhere/data")
    with pytest.raises(Untranslatable, match=f"^{GUIDE_NAME}:42: .*/opt/elsewhere/data"):
        scratch.translate(line)


def test_service_user_needed_before_it_exists_fails(tmp_path: Path) -> None:
    """A step that needs the service user before the guide made it fails, naming it."""
    scratch = Scratch(tmp_path, "http://127.0.0.1:9/neurobank/")
    line = Line(f"{GUIDE_NAME}:7", "install -d -o nbankd -g lab -m 2775 /srv/inbox/rig3")
    with pytest.raises(Untranslatable, match=f"^{GUIDE_NAME}:7: .*user nbankd is not in"):
        scratch.translate(line)


def test_unimitated_systemd_run_property_fails(tmp_path: Path) -> None:
    """systemd-run properties other than User= and LoadCredential= are not ignored."""
    scratch = Scratch(tmp_path, "http://127.0.0.1:9/neurobank/")
    line = Line(f"{GUIDE_NAME}:9", "systemd-run -p DynamicUser=yes /usr/local/bin/nbankd")
    with pytest.raises(Untranslatable, match="DynamicUser= is not imitated"):
        scratch.translate(line)


def test_alternative_blocks_are_left_out() -> None:
    """A block after the alternative marker, or outside sections 1-6, does not run."""
    text = (
        "## 1. Install\n\n```sh\necho first\n```\n\nor:\n\n"
        f"{ALTERNATIVE}\n```sh\necho alternative\n```\n\n"
        "## 7. Status\n\n```sh\necho status\n```\n"
    )
    assert [[ln.text for ln in b.lines] for b in install_blocks(text)] == [["echo first"]]
