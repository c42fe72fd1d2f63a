"""nbankctl's daemon commands against the real nbankd over its real control socket.

Each test starts ``nbankd`` with :class:`DaemonHarness`, runs ``nbankctl`` as a
subprocess, and checks its output, exit status and the files on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import DaemonHarness, wait_for

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))


def ctl(
    h: DaemonHarness, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``nbankctl -c CONFIG ARGS``; output captured as text."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    full_env.update(env or {})
    return subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


def ctl_json(h: DaemonHarness, *args: str) -> Any:
    proc = ctl(h, *args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def explain_state(h: DaemonHarness, path: Path) -> str:
    return str(ctl_json(h, "explain", str(path))["state"])


@pytest.fixture
def h(daemon_factory: Any) -> DaemonHarness:
    harness: DaemonHarness = daemon_factory()
    harness.start()
    return harness


def test_status_json_has_the_documented_fields(h: DaemonHarness) -> None:
    """status --json reports version, registry, inboxes, queue, degraded and audit fields."""
    result = ctl_json(h, "status")
    for key in ("version", "pid", "registry", "inboxes", "queue", "degraded"):
        assert key in result
    assert result["last_audit"] is None and result["audit_running"] is None
    next_audit = datetime.fromisoformat(result["next_audit"]).timestamp()
    assert next_audit == pytest.approx(time.time() + 24 * 3600, abs=120)  # audit.every
    [inbox] = result["inboxes"]
    assert inbox["path"] == str(h.inbox)
    assert {"paused", "last_scan", "in_flight", "deposited", "in_rejected_folder"} <= set(inbox)
    assert result["pid"] == h.proc.pid  # type: ignore[union-attr]


def test_status_exits_0_when_healthy(h: DaemonHarness) -> None:
    """A fresh daemon with a usable archive is healthy: exit 0 and a readable summary."""
    proc = ctl(h, "status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "healthy" in proc.stdout
    assert str(h.inbox) in proc.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_a_daemon_command(h: DaemonHarness, where: str) -> None:
    """--debug is taken on either side of `status`: debug lines on stderr, the same
    summary and exit status on stdout."""
    argv = ["--debug", "status"] if where == "before" else ["status", "--debug"]
    proc = ctl(h, *argv)
    assert proc.returncode == 0, proc.stderr
    assert "healthy" in proc.stdout
    assert "nbankctl: debug: nbankctl: command: status" in proc.stderr


def test_status_exits_1_when_the_archive_is_missing(h: DaemonHarness) -> None:
    """An archive whose nbank.json disappeared (unmounted) makes status degraded: exit 1."""
    (h.archive / "nbank.json").rename(h.archive / "nbank.json.away")
    assert ctl(h, "rescan").returncode == 0
    proc = wait_for(lambda: (p := ctl(h, "status")).returncode == 1 and p, what="degraded")
    assert "DEGRADED" in proc.stdout
    assert "archive" in proc.stdout


def test_status_exits_1_while_a_rejected_file_waits(h: DaemonHarness) -> None:
    """A file sitting in the rejected folder counts as degraded until it is requeued."""
    h.drop("bad name.dat", b"payload")
    h.wait_settled(1)
    proc = ctl(h, "status")
    assert proc.returncode == 1
    assert "1 rejected input(s) waiting" in proc.stdout


def test_paused_inbox_claims_nothing_until_resumed(h: DaemonHarness) -> None:
    """A paused inbox keeps scanning but leaves a ready file alone; resume deposits it."""
    assert ctl(h, "pause").returncode == 0
    src = h.drop("paused01.dat", b"waiting")
    dropped = time.time()
    ctl(h, "rescan")
    # provably scanned after the drop, and the scan found the file ready but paused
    wait_for(
        lambda: (
            ctl_json(h, "status")["inboxes"][0]["last_scan"] > dropped
            and explain_state(h, src) == "paused"
        ),
        what="a scan that sees the file ready while paused",
    )
    assert src.exists() and h.receipts() == []
    assert ctl_json(h, "status")["inboxes"][0]["paused"] is True
    assert ctl(h, "resume", str(h.inbox)).returncode == 0
    h.wait_settled(1)
    assert [r["id"] for r in h.receipts()] == ["paused01"]
    assert not src.exists()


def test_pause_survives_a_restart_until_resumed(h: DaemonHarness) -> None:
    """A paused inbox stays paused after kill -9 and restart (recorded in state_dir);
    resume deposits what waited and is itself kept across the next restart."""
    assert ctl(h, "pause").returncode == 0
    h.kill9()
    h.start()
    assert ctl_json(h, "status")["inboxes"][0]["paused"] is True
    src = h.drop("kept01.dat", b"waits for resume")
    wait_for(lambda: explain_state(h, src) == "paused", what="the file ready but paused")
    assert h.receipts() == []
    assert ctl(h, "resume").returncode == 0
    h.wait_settled(1)
    h.stop()
    h.start()
    assert ctl_json(h, "status")["inboxes"][0]["paused"] is False
    assert [r["id"] for r in h.receipts()] == ["kept01"]


def test_history_lists_receipts_newest_first_and_filters_by_id(h: DaemonHarness) -> None:
    """history shows each deposit's receipt; --id keeps only the one asked for."""
    h.drop("first01.dat", b"one")
    h.wait_settled(1)
    h.drop("second02.dat", b"two")
    h.wait_settled(2)
    all_ids = [r["id"] for r in ctl_json(h, "history")["receipts"]]
    assert all_ids == ["second02", "first01"]
    [only] = ctl_json(h, "history", "--id", "first01")["receipts"]
    assert only["id"] == "first01" and only["source"] == str(h.inbox / "first01.dat")
    text = ctl(h, "history", "--since", "1h").stdout
    assert "first01" in text and "second02" in text


def test_explain_settling_file(daemon_factory: Any) -> None:
    """A file that has not been unchanged for settle_seconds is explained as settling."""
    h = daemon_factory(inbox_options={"settle_seconds": 600})
    h.start()
    src = h.drop("slow01.dat", b"still being written")
    ctl(h, "rescan")
    wait_for(lambda: explain_state(h, src) == "settling", what="settling verdict")
    result = ctl_json(h, "explain", str(src))
    assert "settl" in result["message"]


def test_explain_rejected_file_by_original_and_rejected_path(h: DaemonHarness) -> None:
    """explain gives the reason of a rejected input from its original or rejected path."""
    src = h.drop("has space.dat", b"payload")
    h.wait_settled(1)
    by_original = ctl_json(h, "explain", str(src))
    rejected = h.rejected / "has space.dat"
    by_rejected = ctl_json(h, "explain", str(rejected))
    for result in (by_original, by_rejected):
        assert result["state"] == "rejected"
        assert result["reason"]["code"] == "invalid-name"
        assert result["rejected_path"] == str(rejected)


def test_explain_deposited_file(h: DaemonHarness) -> None:
    """explain of a deposited input's original path gives its identifier, URL and time."""
    src = h.drop("done0001.dat", b"deposited bytes")
    h.wait_settled(1)
    result = ctl_json(h, "explain", str(src))
    [receipt] = h.receipts()
    assert result["state"] == "deposited"
    assert result["id"] == "done0001" and result["url"] == receipt["url"]
    assert result["time"]


def test_explain_ignored_file(h: DaemonHarness) -> None:
    """A file matching an ignore pattern is explained as ignored, naming the pattern."""
    src = h.drop("capture.tmp", b"temporary")
    result = ctl_json(h, "explain", str(src))
    assert result["state"] == "ignored" and result["pattern"] == "*.tmp"


def test_requeue_by_rejected_path_after_fixing_the_name(h: DaemonHarness) -> None:
    """A file rejected for its name deposits once a sidecar gives an id and it is requeued."""
    h.drop("with space.dat", b"good bytes")
    h.wait_settled(1)
    rejected = h.rejected / "with space.dat"
    (h.rejected / "with space.dat.nbank.yaml").write_text("id: withspace\n")
    proc = ctl(h, "requeue", str(rejected))
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: h.receipts(), what="the requeued file's receipt")
    assert [r["id"] for r in h.receipts()] == ["withspace"]
    assert h.archive_files()["withspace.dat"].read_bytes() == b"good bytes"
    assert not (h.rejected / "with space.dat.reason").exists()
    assert ctl(h, "status").returncode == 0


def test_requeue_by_original_path_after_fixing_the_dtype(h: DaemonHarness) -> None:
    """A file rejected for an unknown dtype deposits after the sidecar is fixed and requeued."""
    (h.inbox / "odd00001.dat.nbank.yaml").write_text("dtype: no-such-dtype\n")
    src = h.drop("odd00001.dat", b"odd bytes")
    h.wait_settled(1)
    assert h.reasons()[0]["code"] == "unknown-dtype"
    (h.rejected / "odd00001.dat.nbank.yaml").write_text(f"dtype: {h.dtype}\n")
    proc = ctl(h, "requeue", str(src))
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: h.receipts(), what="the requeued file's receipt")
    assert h.receipts()[0]["id"] == "odd00001"
    assert h.reasons() == []


def test_requeue_refuses_when_the_original_name_is_taken(h: DaemonHarness) -> None:
    """Requeue never overwrites: with the original name taken it moves nothing, exit 1."""
    h.drop("taken 01.dat", b"rejected bytes")
    h.wait_settled(1)
    assert ctl(h, "pause").returncode == 0  # before the newcomer appears: it stays put
    h.drop("taken 01.dat.tmp", b"")  # ignored, so the daemon leaves it alone
    os.rename(h.inbox / "taken 01.dat.tmp", h.inbox / "taken 01.dat")
    proc = ctl(h, "requeue", str(h.rejected / "taken 01.dat"))
    assert proc.returncode == 1
    assert "already exists" in proc.stderr
    assert (h.rejected / "taken 01.dat").read_bytes() == b"rejected bytes"
    assert (h.rejected / "taken 01.dat.reason").exists()


def test_audit_exits_0_when_clean_and_1_when_a_file_is_missing(h: DaemonHarness) -> None:
    """nbankctl audit waits for the report: clean is exit 0; a deleted resource is exit 1,
    named in the output, the JSON report under state_dir/audits and a log event."""
    for name in ("audit001.dat", "audit002.dat"):
        h.drop(name, name.encode())
    h.wait_settled(2)
    clean = ctl(h, "audit")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert ": clean" in clean.stdout and "2 stored, 2 registered, 2 read" in clean.stdout
    h.archive_files()["audit002.dat"].unlink()
    proc = ctl(h, "audit", "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    [finding] = report["archives"][0]["findings"]
    assert (finding["kind"], finding["resource"]) == ("missing from archive", "audit002")
    on_disk = json.loads(Path(report["report"]).read_text())
    assert Path(report["report"]).parent == h.state_dir / "audits"
    assert on_disk["archives"][0]["findings"] == [finding]

    def findings_logged() -> list[str]:
        """The resources of the audit findings logged so far (the log writer's thread
        may write the event after the audit's reply)."""
        return [e["resource_id"] for e in h.log_events() if e.get("event") == "audit finding"]

    assert wait_for(findings_logged, 60, "the audit finding logged") == ["audit002"]
    text = ctl(h, "audit").stdout
    assert "audit002 - missing from archive" in text and "missing from archive: 1" in text


def test_status_shows_the_last_audit_and_is_degraded_by_findings(h: DaemonHarness) -> None:
    """After a clean audit status is healthy and shows it; after one with a finding
    status exits 1 naming the last audit; a later clean audit makes it healthy again."""
    h.drop("stat0001.dat", b"status audit")
    h.wait_settled(1)
    assert ctl(h, "audit").returncode == 0
    result = ctl_json(h, "status")
    assert result["last_audit"]["ok"] is True and result["last_audit"]["findings"] == 0
    assert ctl(h, "status").returncode == 0
    stored = h.archive_files()["stat0001.dat"]
    stored.chmod(0o644)  # writable in an archive of read-only resources
    assert ctl(h, "audit").returncode == 1
    proc = ctl(h, "status")
    assert proc.returncode == 1, proc.stdout
    assert "1 PROBLEM(S)" in proc.stdout and "last audit" in proc.stdout
    stored.chmod(0o444)
    assert ctl(h, "audit").returncode == 0
    assert ctl(h, "status").returncode == 0


def test_audit_with_no_daemon_exits_3(tmp_path: Path) -> None:
    """nbankctl audit with nothing on the socket says nbankd is not running: exit 3."""
    proc = subprocess.run(
        [NBANKCTL, "audit", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and "not running" in proc.stderr


def test_socket_found_through_nbankd_config_env(h: DaemonHarness) -> None:
    """Without -c, $NBANKD_CONFIG names the configuration whose control_socket is used."""
    proc = subprocess.run(
        [NBANKCTL, "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NBANKD_CONFIG": str(h.config_path)},
    )
    assert proc.returncode == 0, proc.stderr


def test_daemon_not_running_exits_3(tmp_path: Path) -> None:
    """With no daemon on the socket, nbankctl says so and exits 3."""
    missing = tmp_path / "nothing.sock"
    proc = subprocess.run(
        [NBANKCTL, "status", "--socket", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3
    assert f"nbankd is not running (no socket at {missing})" in proc.stderr


def test_requeue_all_rejected_moves_every_rejected_input_back(h: DaemonHarness) -> None:
    """requeue --all-rejected INBOX requeues each rejected input of that inbox."""
    for name in ("all one.dat", "all two.dat"):
        h.drop(name, name.encode())
    h.wait_settled(2)
    for name, ident in (("all one.dat", "allone"), ("all two.dat", "alltwo")):
        (h.rejected / f"{name}.nbank.yaml").write_text(f"id: {ident}\n")
    proc = ctl(h, "requeue", "--all-rejected", str(h.inbox))
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(h.receipts()) == 2, what="both requeued files deposited")
    assert sorted(r["id"] for r in h.receipts()) == ["allone", "alltwo"]


def test_queue_lists_a_settling_file_as_waiting(daemon_factory: Any) -> None:
    """queue shows files the daemon has seen but not yet claimed, with the reason."""
    h = daemon_factory(inbox_options={"settle_seconds": 600})
    h.start()
    h.drop("queued01.dat", b"not yet")
    ctl(h, "rescan")
    pending = wait_for(lambda: ctl_json(h, "queue")["pending"], what="the file in the queue")
    assert pending[0]["relpath"] == "queued01.dat" and pending[0]["state"] == "settling"
    assert "queued01.dat" in ctl(h, "queue").stdout


def test_queue_lists_at_most_its_limit_and_counts_every_file(daemon_factory: Any) -> None:
    """queue --limit N describes at most N files and counts every one by state, so a
    large backlog costs the daemon no more than N entries."""
    h = daemon_factory(inbox_options={"settle_seconds": 600})
    h.start()
    for n in range(12):
        h.drop(f"many{n:02d}.dat", b"not yet")
    ctl(h, "rescan")
    wait_for(lambda: len(ctl_json(h, "queue")["pending"]) == 12, what="twelve files seen")
    doc = ctl_json(h, "queue", "--limit", "5")
    assert [p["relpath"] for p in doc["pending"]] == [f"many{n:02d}.dat" for n in range(5)]
    assert doc["counts"]["pending"] == {"settling": 12} and doc["truncated"] is True
    assert "5 of 12 waiting" in ctl(h, "queue", "--limit", "5").stdout
    whole = ctl_json(h, "queue")
    assert len(whole["pending"]) == 12 and whole["truncated"] is False


@pytest.mark.parametrize("limit", ["0", "1001"])
def test_queue_limit_out_of_range_is_a_usage_error(h: DaemonHarness, limit: str) -> None:
    """queue --limit outside 1 to 1000 exits 2 naming the option."""
    proc = ctl(h, "queue", "--limit", limit)
    assert proc.returncode == 2 and "--limit" in proc.stderr


def test_reload_with_a_broken_file_is_refused_and_the_daemon_keeps_running(
    h: DaemonHarness,
) -> None:
    """reload of an invalid configuration exits 2 naming the problem; the daemon runs on."""
    good = h.config_path.read_text()
    h.config_path.write_text(good + "no_such_key: 1\n")
    proc = ctl(h, "reload", "--socket", str(h.socket_path))
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr
    h.config_path.write_text(good)
    assert ctl(h, "reload").returncode == 0
    assert ctl(h, "status").returncode == 0


def test_reload_that_cannot_prepare_an_inbox_fails_naming_it_and_keeps_the_old_setup(
    h: DaemonHarness,
) -> None:
    """reload adding an inbox whose path is a file exits 2 naming it; the running
    configuration stays, and a corrected file reloads."""
    good = h.config_path.read_text()
    blocked = h.root / "not-a-folder"
    blocked.write_bytes(b"someone's file")
    config = yaml.safe_load(good)
    config["inboxes"].append({**config["inboxes"][0], "path": str(blocked)})
    h.config_path.write_text(yaml.safe_dump(config))
    proc = ctl(h, "reload")
    assert proc.returncode == 2, proc.stderr
    assert "reload failed" in proc.stderr and str(blocked) in proc.stderr
    assert [i["path"] for i in ctl_json(h, "status")["inboxes"]] == [str(h.inbox)]
    h.config_path.write_text(good)
    assert ctl(h, "reload").returncode == 0
    assert blocked.read_bytes() == b"someone's file"


def test_options_before_the_command_are_kept(tmp_path: Path) -> None:
    """``nbankctl -c FILE --json status`` uses FILE (no daemon there: exit 3 naming its socket)."""
    sock = tmp_path / "nowhere.sock"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ncontrol_socket: {sock}\n")
    out = subprocess.run(
        [str(Path(sys.executable).with_name("nbankctl")), "-c", str(cfg), "--json", "status"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3
    assert str(sock) in out.stderr


def test_queue_shows_what_is_in_the_inbox_now(daemon_factory: Any) -> None:
    """queue scans before answering: a deposited file is gone from it and a file
    dropped since the last scan is listed, even with rescans an hour apart."""
    h = daemon_factory(inbox_options={"rescan_every": "1h", "watch": "poll"})
    h.start()
    h.drop("done01.dat", b"deposited")
    assert ctl_json(h, "queue")["fresh"] is True
    wait_for(lambda: len(h.receipts()) == 1, what="done01.dat deposited")
    h.drop("late01.dat", b"dropped after the last scan")
    result = ctl_json(h, "queue")
    names = [p["relpath"] for p in result["pending"]] + [i["relpath"] for i in result["items"]]
    assert "done01.dat" not in names
    assert "late01.dat" in names


def test_explain_text_shows_escapes_as_text_and_keeps_the_command_to_paste() -> None:
    """explain's text shows a terminal's escapes in its message (a registry's id) as
    text, and the requeue command it quotes stays as written, to paste."""
    from nbankctl import render
    from nbankd.shellwords import requeue_command

    command = requeue_command("/in/nbank-rejected/a\\b\x1b.dat", None)
    message = f"deposited as ab\x1b]0;x\x07 -- fix the cause, then: {command}"
    text = render.explain({"path": "/in/a.dat", "state": "rejected", "message": message})
    assert "\x1b" not in text and "\x07" not in text, text
    assert command in text and "ab\\x1b]0;x\\x07" in text, text


def test_requeue_command_in_reason_and_explain_can_be_pasted(h: DaemonHarness) -> None:
    """The requeue command a .reason file and explain give names the configuration and
    quotes the path: run by a shell as written, it requeues the file."""
    h.drop("it's a file.dat", b"pasted bytes")
    h.wait_settled(1)
    [reason] = h.reasons()
    explained = ctl_json(h, "explain", reason["rejected_path"])
    assert explained["requeue"] == reason["requeue"]
    assert f"-c {h.config_path}" in reason["requeue"]
    assert f"fix the cause, then: {reason['requeue']}" in explained["message"]
    (h.rejected / "it's a file.dat.nbank.yaml").write_text("id: pasted01\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    env["PATH"] = f"{Path(NBANKCTL).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        ["sh", "-c", reason["requeue"]], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: h.receipts(), what="the requeued file's receipt")
    assert [r["id"] for r in h.receipts()] == ["pasted01"]


@pytest.mark.parametrize(
    ("how", "hint"),
    [
        ("-c", "start it with: nbankd -c {config}"),
        ("env", "start it with: nbankd -c {config}"),
        ("--socket", "start the daemon that owns this socket"),
    ],
)
def test_not_running_hint_follows_how_the_daemon_was_named(
    tmp_path: Path, how: str, hint: str
) -> None:
    """With -c or $NBANKD_CONFIG the hint is that configuration's start command, with
    --socket the socket; systemctl is suggested only for the default configuration."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ncontrol_socket: {tmp_path / 'no.sock'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    args = {"-c": ["-c", str(cfg)], "env": [], "--socket": ["--socket", str(tmp_path / "x")]}
    if how == "env":
        env["NBANKD_CONFIG"] = str(cfg)
    proc = subprocess.run(
        [NBANKCTL, "status", *args[how]], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 3
    assert hint.format(config=cfg) in proc.stderr
    assert "systemctl" not in proc.stderr
