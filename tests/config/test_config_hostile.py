"""Hostile review of the configuration: odd files, hostile YAML, overlapping folders
reached by another path, and reloads that fail or change what needs a restart.

Every test here failed on the code it was written against (see each docstring for the
behaviour expected); the few guard tests that pass are marked "guard".
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import NBANKD, DaemonHarness, nbankctl, status_json, wait_for
from nbankd.config import Problem, parse_config

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))

MINIMAL = """\
state_dir: state
control_socket: control.sock
archives:
  - path: archive
    create: true
inboxes:
  - path: inbox
    dtype: wav
"""


def write(folder: Path, text: str, name: str = "nbankd.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}


def run_bounded(
    argv: list[str], *, timeout: float, memory: int = 2 << 30
) -> subprocess.CompletedProcess[str]:
    """Runs ``argv`` with an address-space cap; a hang or a blow-up fails the test."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
            preexec_fn=cap,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout}s (hangs)")


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


# --- files that are not plain files -------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_configuration_that_is_not_a_regular_file_is_refused_promptly(
    tmp_path: Path, kind: str
) -> None:
    """A FIFO or a device given as the configuration is refused at once (exit 2 naming
    it) by check-config and nbankctl, never read until a writer comes or memory ends."""
    if kind == "fifo":
        path = tmp_path / "config.yaml"
        os.mkfifo(path)
    else:
        path = tmp_path / "config.yaml"
        path.symlink_to("/dev/zero")
    for argv in (
        [NBANKD, "check-config", "--offline", "-c", str(path)],
        [NBANKCTL, "-c", str(path), "status"],
    ):
        proc = run_bounded(argv, timeout=60, memory=1 << 30)  # the fault hangs
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr[-800:])
        assert str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_a_credentials_file_that_is_a_fifo_never_hangs_check_config(tmp_path: Path) -> None:
    """registry_auth naming a FIFO is reported (naming registry_auth), not read forever:
    check-config finishes."""
    os.mkfifo(tmp_path / "auth")
    config = write(
        tmp_path,
        "registry: https://127.0.0.1:9/neurobank/\nregistry_auth: auth\n" + MINIMAL,
    )
    proc = run_bounded([NBANKD, "check-config", "-c", str(config)], timeout=60)
    assert proc.returncode in (2, 3), proc.stderr[-800:]
    assert "registry_auth" in proc.stderr


def test_a_configuration_writable_by_other_users_is_reported(tmp_path: Path) -> None:
    """A configuration any local user may rewrite (mode 0666) is reported by check-config:
    whoever edits it chooses where recordings go and where the registry credentials are
    sent."""
    config = write(tmp_path, MINIMAL)
    config.chmod(0o666)
    proc = run_bounded([NBANKD, "check-config", "--offline", "-c", str(config)], timeout=60)
    said = proc.stderr.lower()
    assert str(config) in proc.stderr and ("writable" in said or "0666" in said), proc.stderr


# --- hostile YAML ----------------------------------------------------------------------


def _bomb(levels: int) -> str:
    """An inbox whose metadata is a "billion laughs" alias bomb: a 1 KB file, 10**levels
    values once expanded."""
    lines = ["      l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return MINIMAL + "    metadata:\n" + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    """A YAML alias bomb (9 levels of 10: a billion values from a 1 KB file) is refused
    with an error naming the file, within seconds and without exhausting memory."""
    config = write(tmp_path, _bomb(9))
    assert config.stat().st_size < 2000
    proc = run_bounded([NBANKD, "check-config", "--offline", "-c", str(config)], timeout=30)
    assert proc.returncode == 2, proc.stderr[-800:]
    assert str(config) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("impossible date in metadata", MINIMAL + "    metadata: {recorded: 2024-02-30}\n"),
        ("explicit int tag on text", MINIMAL + "    metadata: {rig: !!int three}\n"),
        ("explicit float tag on text", MINIMAL + "    metadata: {gain: !!float high}\n"),
        ("a number of 5000 digits", MINIMAL + "    settle_seconds: " + "1" * 5000 + "\n"),
        ("self-referencing alias", MINIMAL + "    metadata: {loop: &a [*a]}\n"),
        ("nesting 5000 deep", MINIMAL + "    metadata: {deep: " + "[" * 5000 + "]" * 5000 + "}\n"),
    ],
)
def test_every_malformed_value_is_a_problem_naming_the_file_never_an_exception(
    tmp_path: Path, case: str, text: str
) -> None:
    """Values PyYAML cannot construct (an impossible date, a tag on the wrong text, a
    number past Python's digit limit) or cannot walk (a recursive alias, deep nesting)
    come back as configuration problems naming the file, never as an exception: the
    daemon, its reload, check-config and every nbankctl command read this file."""
    config = write(tmp_path, text)
    try:
        parsed, problems = parse_config(config)
    except Exception as err:
        pytest.fail(f"{case}: parse_config raised {type(err).__name__}: {err}")
    assert parsed is None
    assert errors_of(problems) and all(p.source == config for p in problems)


def test_yaml_merge_keys_override_without_a_duplicate_error(tmp_path: Path) -> None:
    """The usual YAML idiom for several inboxes sharing settings (an anchored first
    inbox, then ``<<: *rig`` with its own path) loads: a key given once and overriding
    a merged one is not "given twice"."""
    config = write(
        tmp_path,
        """\
        state_dir: state
        archives: [{path: archive, create: true}]
        inboxes:
          - &rig
            path: rig1
            dtype: wav
            settle_seconds: 5
          - <<: *rig
            path: rig2
        """,
    )
    parsed, problems = parse_config(config)
    assert errors_of(problems) == [], [str(p) for p in problems]
    assert parsed is not None
    assert [i.path.name for i in parsed.inboxes] == ["rig1", "rig2"]
    assert [i.settle_seconds for i in parsed.inboxes] == [5.0, 5.0]


def test_guard_a_key_really_given_twice_is_an_error(tmp_path: Path) -> None:
    """Guard: an inbox's archive given twice is an error naming both lines (YAML's
    last-wins never silently re-points it)."""
    config = write(
        tmp_path,
        """\
        archives: [{path: a}, {path: b}]
        inboxes:
          - path: inbox
            dtype: wav
            archive: a
            archive: b
        """,
    )
    parsed, problems = parse_config(config)
    assert parsed is None
    [err] = errors_of(problems)
    assert err.key == "inboxes[0].archive" and err.line == 6 and "5 and 6" in err.message


@pytest.mark.parametrize(
    ("written", "yaml_reads"),
    [("0417", 271), ("1:30", 90), ("12_34", 1234)],
)
def test_metadata_written_as_digits_is_never_silently_another_number(
    tmp_path: Path, written: str, yaml_reads: int
) -> None:
    """Inbox metadata such as ``animal: 0417`` (a band number) is either kept as written
    or refused with a hint to quote it, never registered as YAML 1.1's octal or
    base-60 reading (271, 90) on every resource, as dates already are refused."""
    config = write(tmp_path, MINIMAL + f"    metadata: {{animal: {written}}}\n")
    parsed, problems = parse_config(config)
    if parsed is None:
        assert any(p.key == "inboxes[0].metadata.animal" for p in errors_of(problems))
        return
    value = parsed.inboxes[0].metadata["animal"]
    assert value != yaml_reads, f"{written} was registered as {value!r}"


# --- folders that overlap through another path ----------------------------------------


def _started(h: DaemonHarness) -> bool:
    """Starts the daemon; False when it refused to start with exit 2 (a configuration
    error, which these tests accept), failing on any other ending."""
    try:
        h.start(env=clean_env())
    except AssertionError:
        assert h.proc is not None
        code = h.proc.wait(timeout=30)
        assert code == 2, h.log_path.read_text()[-2000:]
        return False
    return True


def _scanned(h: DaemonHarness, inbox: Path, scans: int) -> None:
    """Waits until the running daemon has scanned ``inbox`` ``scans`` more times."""

    def count() -> int:
        for entry in status_json(h)[1]["inboxes"]:
            if entry["path"] == str(inbox):
                return int(entry["scans"])
        return 0

    start = count()
    nbankctl(h, "rescan")
    wait_for(lambda: count() >= start + scans, 60, f"{scans} scans of {inbox}")


def test_an_inbox_reaching_into_an_archive_through_a_link_never_takes_its_files(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An inbox whose path is a link to an archive's resources/ folder is refused (as
    the same folder named directly is), or at least never claims the stored files:
    they stay where the registry says, deposited once."""
    h = daemon_factory()
    h.start()
    h.drop("keep01.dat", b"stored once")
    h.wait_settled(1)
    h.stop()
    stored = h.archive_files()["keep01.dat"]
    inode = stored.stat().st_ino
    link = h.root / "inbox2"
    link.symlink_to(h.archive / "resources")
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(link)})
    h.config_path.write_text(yaml.safe_dump(cfg))
    if _started(h):
        _scanned(h, link, 3)
        h.stop()
    assert stored.stat().st_ino == inode
    assert [r for r in h.receipts() if r["inbox"] == str(link)] == []
    assert not (h.archive / "resources" / ".nbank").exists()


def test_an_inbox_inside_the_state_directory_never_deposits_the_receipts(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """An inbox at state_dir/receipts is refused like a state_dir inside an inbox is, or
    at least never moves the daemon's receipts into the archive: history keeps them."""
    h = daemon_factory()
    h.write_config()
    receipts = h.state_dir / "receipts"
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(receipts)})
    h.config_path.write_text(yaml.safe_dump(cfg))
    if not _started(h):
        return
    h.drop("rec01.dat", b"one deposit, one receipt")
    wait_for(lambda: any(r["id"] == "rec01" for r in h.receipts()), 60, "the receipt")
    _scanned(h, receipts, 3)
    history = nbankctl(h, "history", "--json")
    h.stop()
    assert "rec01" in history.stdout, history.stdout
    assert not any(name.endswith(".jsonl") for name in h.archive_files())


@pytest.mark.parametrize("how", ["link", "state-inside"])
def test_check_config_reports_folders_that_overlap_by_another_path(
    tmp_path: Path, how: str
) -> None:
    """check-config refuses an inbox that is, by a link, another inbox's folder, and an
    inbox inside the state directory, as it refuses the lexical cases (exit 2 naming
    inboxes[1].path)."""
    (tmp_path / "inbox").mkdir()
    if how == "link":
        (tmp_path / "alias").symlink_to(tmp_path / "inbox")
        second = "alias"
    else:
        second = "state/audits"
    config = write(tmp_path, MINIMAL + f"  - path: {second}\n    dtype: other\n")
    proc = run_bounded([NBANKD, "check-config", "--offline", "-c", str(config)], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "inboxes[1]" in proc.stderr


# --- reloads -----------------------------------------------------------------------------


def test_a_reload_that_cannot_make_a_new_inbox_says_it_failed(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """`nbankctl reload` of a file whose new inbox cannot be made (its parent is a file)
    fails naming the folder (the running configuration kept), never answers "done"
    while nothing of the new file applies."""
    h = daemon_factory()
    h.start()
    (h.root / "notes.txt").write_text("a file, not a folder")
    blocked = h.root / "notes.txt" / "inbox2"

    def add_inbox(cfg: dict[str, Any]) -> None:
        cfg["inboxes"].append({**cfg["inboxes"][0], "path": str(blocked)})

    h.edit_config(add_inbox)
    proc = nbankctl(h, "reload", "--json")
    inboxes = [i["path"] for i in status_json(h)[1]["inboxes"]]
    h.stop()
    assert inboxes == [str(h.inbox)]  # the running configuration is kept...
    assert proc.returncode != 0, proc.stdout  # ...and the reload says it failed
    assert str(blocked) in proc.stdout + proc.stderr


def test_sighup_with_an_impossible_date_logs_why_and_reports_ready_again(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """SIGHUP with a file holding ``recorded: 2024-02-30`` keeps the running setup,
    logs "reload failed" naming the file, and sends READY=1 after RELOADING=1 (systemd
    otherwise keeps the unit "reloading")."""
    h = daemon_factory()
    h.start()
    h.config_path.write_text(
        h.config_path.read_text().replace(
            "inboxes:\n- ", "inboxes:\n- metadata: {recorded: 2024-02-30}\n  "
        )
    )
    assert "2024-02-30" in h.config_path.read_text()
    h.messages.clear()
    assert h.proc is not None
    h.proc.send_signal(signal.SIGHUP)
    h.wait_message(lambda m: "RELOADING=1" in m, 60)
    h.wait_message(lambda m: "READY=1" in m, 60)

    def reload_failures() -> list[dict[str, object]]:
        text = h.log_path.read_text()
        whole = text[: text.rfind("\n") + 1]  # a line being written is not read yet
        events = [json.loads(line) for line in whole.splitlines() if line[:1] == "{"]
        return [e for e in events if str(e.get("event", "")).startswith("reload failed")]

    # the log line is written by the log writer's thread: it may follow READY=1
    wait_for(lambda: bool(reload_failures()), 60, "the reload's failure logged")
    failed = reload_failures()
    h.drop("still.dat", b"still running")
    h.wait_settled(1)
    h.stop()
    assert failed and str(h.config_path) in json.dumps(failed[-1])


def test_nbankctl_reload_of_an_impossible_date_names_file_and_line(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """`nbankctl reload` with ``recorded: 2024-02-30`` in the file exits 2 naming the
    file and the line, not "ValueError: day is out of range" or a traceback."""
    h = daemon_factory()
    h.start()
    text = h.config_path.read_text().replace(
        "inboxes:\n- ", "inboxes:\n- metadata: {recorded: 2024-02-30}\n  "
    )
    h.config_path.write_text(text)
    line = 1 + text.splitlines().index("- metadata: {recorded: 2024-02-30}")
    proc = nbankctl(h, "reload")
    h.stop()
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert f"{h.config_path}:{line}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reload_changing_state_dir_keeps_depositing_until_the_restart(
    daemon_factory: Callable[..., DaemonHarness],
) -> None:
    """state_dir changes only at restart (as the log and docs say): after a reload that
    changes it, files are still deposited and status is not degraded (it must not claim
    the running state directory "was removed" and advise restoring it from a backup)."""
    h = daemon_factory()
    h.start()
    h.edit_config(lambda cfg: cfg.update(state_dir=str(h.root / "state-next")))
    reloaded = nbankctl(h, "reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    h.drop("after.dat", b"deposited after the reload")
    try:
        h.wait_settled(1, timeout=60)
        code, status = status_json(h)
    finally:
        h.stop()
    assert h.archive_files()["after.dat"].read_bytes() == b"deposited after the reload"
    assert code == 0, status["degraded"]
