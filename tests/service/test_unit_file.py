"""The shipped systemd unit and snippets: they parse, verify, and rate OK for exposure."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNIT = CONTRIB / "nbankd.service"
SYSUSERS = CONTRIB / "nbankd.sysusers"
TMPFILES = CONTRIB / "nbankd.tmpfiles"
SHIPPED_EXEC = "/usr/local/bin/nbankd -c /etc/nbankd/config.yaml"
# systemd-analyze security ratings, best first (src/analyze/analyze-security.c).
GOOD_RATINGS = ("PERFECT", "SAFE", "OK")


def _tool(name: str) -> str:
    """Returns the path of a systemd tool; these tests need it, so its absence fails."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package systemd); the unit cannot be checked")
    return path


def _installed_nbankd() -> str:
    """Returns the nbankd console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "nbankd"
    found = str(beside) if beside.exists() else shutil.which("nbankd")
    if found is None:
        pytest.fail("no installed nbankd script: run `pip install -e .` first")
    return found


def _settings(text: str) -> dict[str, list[str]]:
    """Returns every Key=value of a unit file, in order, repeated keys kept."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names the nbankd installed here (verify checks it)."""
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC}\n" in text
    text = text.replace(
        f"ExecStart={SHIPPED_EXEC}", f"ExecStart={_installed_nbankd()} -c /etc/nbankd/config.yaml"
    )
    copy = tmp_path / "nbankd.service"
    copy.write_text(text)
    return copy


def test_unit_parses_as_ini() -> None:
    """The unit has the three sections and each non-comment line is Key=value."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", SHIPPED_EXEC),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "60s"),
        ("User", "nbankd"),
        ("Group", "nbankd"),
        ("StateDirectory", "nbankd"),
        ("RuntimeDirectory", "nbankd"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("UMask", "0027"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("CapabilityBoundingSet", "CAP_LEASE"),
        ("AmbientCapabilities", "CAP_LEASE"),
        ("LoadCredential", "registry:/etc/nbankd/registry-credentials"),
        ("SetCredential", "registry:\\n"),
        ("SystemCallFilter", "@chown"),
    ],
)
def test_unit_setting(key: str, value: str) -> None:
    """The unit sets each required option to the documented value."""
    assert value in _settings(UNIT.read_text()).get(key, [])


def test_read_write_paths_are_optional_placeholders() -> None:
    """ReadWritePaths placeholders start with '-' so a missing path never blocks a start."""
    paths = _settings(UNIT.read_text())["ReadWritePaths"]
    assert paths
    assert all(p.startswith("-/") for p in paths)


def test_stop_timeout_leaves_room_to_park_items() -> None:
    """TimeoutStopSec is longer than the few seconds SIGTERM parking takes."""
    (value,) = _settings(UNIT.read_text())["TimeoutStopSec"]
    seconds = int(re.fullmatch(r"(\d+)s", value).group(1))  # type: ignore[union-attr]
    assert 10 <= seconds <= 120


def test_systemd_analyze_verify(installed_unit: Path) -> None:
    """`systemd-analyze verify` accepts the unit without any warning about it."""
    proc = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "nbankd.service" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """Verify really runs: the shipped path /usr/local/bin/nbankd is checked to exist."""
    if Path("/usr/local/bin/nbankd").exists():
        pytest.skip("/usr/local/bin/nbankd exists on this machine")
    copy = tmp_path / "nbankd.service"
    copy.write_text(UNIT.read_text())
    proc = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "/usr/local/bin/nbankd" in proc.stderr


def test_security_rating_ok_or_better(installed_unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit OK or better."""
    proc = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=true", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    match = re.search(
        r"Overall exposure level for nbankd\.service: (\d+\.\d+) ([A-Z]+)", proc.stdout
    )
    assert match, proc.stdout
    exposure, rating = float(match.group(1)), match.group(2)
    assert rating in GOOD_RATINGS, f"exposure {exposure} rated {rating}"
    assert exposure < 2.0, "hardening regressed; update README if this is intended"
    assert proc.stderr.strip() == "", proc.stderr


def test_sysusers_creates_the_nbankd_user(tmp_path: Path) -> None:
    """The sysusers snippet creates user and group nbankd with /var/lib/nbankd as home."""
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    (entry,) = [line for line in passwd if line.startswith("nbankd:")]
    _name, _, uid, gid, _, home, shell = entry.split(":")
    assert (home, shell) == ("/var/lib/nbankd", "/usr/sbin/nologin")
    assert int(uid) < 1000
    group = (tmp_path / "etc" / "group").read_text()
    assert f"nbankd:x:{gid}:" in group


def test_tmpfiles_creates_private_credentials_file(tmp_path: Path) -> None:
    """The tmpfiles snippet makes an empty root-only credentials file and the folders."""
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    proc = subprocess.run(
        [_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", "-"],
        input=TMPFILES.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    creds = tmp_path / "etc" / "nbankd" / "registry-credentials"
    assert creds.read_bytes() == b""
    assert creds.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "etc" / "nbankd").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "var" / "lib" / "nbankd").stat().st_mode & 0o777 == 0o750


def test_tmpfiles_never_truncates_credentials(tmp_path: Path) -> None:
    """Re-running tmpfiles keeps an existing credentials file's content."""
    (tmp_path / "etc" / "nbankd").mkdir(parents=True)
    creds = tmp_path / "etc" / "nbankd" / "registry-credentials"
    creds.write_text("dmeliza:hunter2\n")
    subprocess.run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    subprocess.run(
        [_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", "-"],
        input=TMPFILES.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert creds.read_text() == "dmeliza:hunter2\n"


NETWORK = CONTRIB / "nbankd-network.conf"
GUIDE = CONTRIB.parents[1] / "docs" / "deployment.md"


def _security(unit: Path, *dropins: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze security --offline` of ``unit`` installed in a scratch root,
    with ``dropins`` in its ``nbankd.service.d/`` (offline analysis reads drop-ins
    only from a root's unit folders)."""
    root = unit.parent / "root"
    folder = root / "etc" / "systemd" / "system"
    (folder / "nbankd.service.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(unit, folder / "nbankd.service")
    for n, dropin in enumerate(dropins):
        shutil.copy(dropin, folder / "nbankd.service.d" / f"{n:02d}-{dropin.name}")
    analyze = [_tool("systemd-analyze"), "security", "--offline=true", f"--root={root}"]
    return subprocess.run(
        [*analyze, "nbankd.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _open_exposures(report: str) -> list[str]:
    """The settings `systemd-analyze security` marks as open (✗), by name."""
    return [line.split()[1] for line in report.splitlines() if line.startswith("✗")]


def test_setpriority_is_allowed_back_for_audits() -> None:
    """@resources (denied) holds setpriority, which audits need to yield to deposits;
    the unit allows it back, so a scheduled audit never silently runs at full priority."""
    group = subprocess.run(
        [_tool("systemd-analyze"), "syscall-filter", "@resources"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert re.search(r"^\s+setpriority$", group, re.M)
    filters = _settings(UNIT.read_text())["SystemCallFilter"]
    denied = filters.index("~@privileged @resources")
    assert "setpriority" in filters[denied + 1 :]


def test_configuration_directory_mode_agrees_with_tmpfiles() -> None:
    """The unit applies the same mode to /etc/nbankd as the tmpfiles snippet creates."""
    settings = _settings(UNIT.read_text())
    [line] = [ln for ln in TMPFILES.read_text().splitlines() if ln.startswith("d /etc/nbankd ")]
    assert settings["ConfigurationDirectoryMode"] == [line.split()[2]]


def test_sysusers_never_creates_the_lab_group(tmp_path: Path) -> None:
    """The sysusers snippet creates only nbankd's own group: a lab group that does not
    exist is never made up locally (the guide adds nbankd to the real one)."""
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    groups = [line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()]
    assert groups == ["nbankd"]


def test_snippet_paths_agree_with_the_guide() -> None:
    """The unit's header installs the snippets where the guide does."""
    guide, header = GUIDE.read_text(), UNIT.read_text().split("[Unit]")[0]
    for path in ("/etc/sysusers.d/nbankd.conf", "/etc/tmpfiles.d/nbankd.conf"):
        assert path in header and path in guide


def test_network_dropin_lowers_the_exposure(installed_unit: Path) -> None:
    """The allow-list drop-in gives the unit an IP allow list and lowers its exposure."""
    plain = _security(installed_unit).stdout
    fenced = _security(installed_unit, NETWORK).stdout
    assert "does not define an IP address allow list" in plain
    assert "defines IP address allow list" in fenced

    def level(report: str) -> float:
        match = re.search(r"Overall exposure level for nbankd\.service: (\d+\.\d+)", report)
        assert match, report
        return float(match.group(1))

    assert level(fenced) < level(plain)


def test_guide_explains_every_remaining_exposure(installed_unit: Path) -> None:
    """Each setting `systemd-analyze security` still marks open, with the network
    drop-in installed, is named in the guide's list of what remains open and why."""
    fenced = _security(installed_unit, NETWORK).stdout
    section = GUIDE.read_text().split("What remains open, and why")[1].split("\n## ")[0]
    missing = [name for name in _open_exposures(fenced) if name.split("=")[0] not in section]
    assert missing == []


README = CONTRIB.parents[1] / "README.md"


def _level(report: str) -> str:
    """The overall exposure figure of a `systemd-analyze security` report, as printed."""
    match = re.search(r"Overall exposure level for nbankd\.service: (\d+\.\d+) OK", report)
    assert match, report
    return match.group(1)


def test_exposure_figures_are_the_documented_ones(installed_unit: Path) -> None:
    """The unit's exposure, alone and with the network drop-in, is the figure the guide
    and the README state (a change in either direction must update both)."""
    guide = re.search(
        r"rates the unit \*\*(\d\.\d) OK\*\* with the network drop-in\s+\((\d\.\d) without it\)",
        GUIDE.read_text(),
    )
    readme = re.search(
        r"rates it \*\*(\d\.\d) OK\*\*, \*\*(\d\.\d)\*\*\s+with the network allow-list drop-in",
        README.read_text(),
    )
    assert guide and readme
    plain = _level(_security(installed_unit).stdout)
    fenced = _level(_security(installed_unit, NETWORK).stdout)
    assert (fenced, plain) == (guide.group(1), guide.group(2))
    assert (plain, fenced) == (readme.group(1), readme.group(2))


def _expand(names: list[str], seen: dict[str, set[str]]) -> set[str]:
    """System calls named by ``names`` (calls and @groups), groups expanded by systemd."""
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name not in seen:
            listing = subprocess.run(
                [_tool("systemd-analyze"), "syscall-filter", name],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            members = [ln.strip() for ln in listing.splitlines()[1:]]
            seen[name] = set()
            seen[name] = _expand([m for m in members if m and not m.startswith("#")], seen)
        calls |= seen[name]
    return calls


def _allowed_calls(text: str) -> set[str]:
    """The unit's system-call allow list, its SystemCallFilter= lines applied in order."""
    allowed: set[str] = set()
    seen: dict[str, set[str]] = {}
    for value in _settings(text)["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= _expand(value[1:].split(), seen)
        else:
            allowed |= _expand(value.split(), seen)
    return allowed


def test_system_call_filter_allows_what_nbankd_calls_and_no_more_of_the_open_groups() -> None:
    """The filter keeps every call nbankd's code makes (chgrp via chown/lchown/fchown,
    audits' setpriority, the readers' prlimit64 limits, flock, renameat2, inotify,
    sockets, subprocesses) and, of @privileged and @resources, only those."""
    allowed = _allowed_calls(UNIT.read_text())
    needed = {
        *("chown", "lchown", "fchown", "fchownat", "setpriority", "prlimit64", "flock"),
        *("renameat2", "inotify_init1", "inotify_add_watch", "inotify_rm_watch"),
        *("socket", "bind", "listen", "accept4", "connect", "getsockopt", "sendmsg"),
        *("execve", "clone", "clone3", "wait4", "pipe2", "openat", "fsync", "linkat"),
        *("fchmod", "fchmodat", "mkdirat", "unlinkat", "getdents64", "statx", "kill"),
    }
    assert needed - allowed == set()
    seen: dict[str, set[str]] = {}
    assert allowed & _expand(["@privileged"], seen) == _expand(["@chown"], seen) & allowed
    assert allowed & _expand(["@resources"], seen) == {"setpriority"}
    assert not allowed & {"setuid", "setgroups", "capset", "setrlimit", "sched_setattr"}


def test_readers_can_confine_themselves() -> None:
    """The filter keeps what a metadata reader's process needs to confine itself and
    end what it started: Landlock's three calls, prctl (no_new_privs, subreaper) and
    pidfds; without them readers would run unconfined and inputs placed by rename wait."""
    allowed = _allowed_calls(UNIT.read_text())
    needed = {"landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"}
    assert needed | {"prctl", "pidfd_open", "pidfd_send_signal"} <= allowed
