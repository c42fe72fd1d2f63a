"""Audits inside the real daemon: no false alarm while deposits run during an audit, and
an audit killed with SIGKILL resumes after restart where it stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
ctl = partial(nbankctl, timeout=120)  # nbankctl -c CONFIG ARGS, without the test seams


def start_audit(h: DaemonHarness, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    return subprocess.Popen(
        [NBANKCTL, "-c", str(h.config_path), "audit", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def audit_phase(h: DaemonHarness) -> str | None:
    running = json.loads(ctl(h, "status", "--json").stdout).get("audit_running")
    return running.get("phase") if running else None


def registered(h: DaemonHarness) -> int:
    reg = h.open_registry()
    try:
        return sum(1 for _ in reg.search(archive=h.archive_name))
    finally:
        reg.close()


def test_burst_of_deposits_during_an_audit_gives_no_finding(daemon_factory: Any) -> None:
    """Deposits held between register and publish when the audit lists the registry,
    and a burst deposited between its walk and the registry's second look: no finding."""
    h: DaemonHarness = daemon_factory()
    go_deposit, go_audit = h.root / "go-deposit", h.root / "go-audit"
    go_deposit.touch()
    h.start(
        env={
            "NBANKD_PAUSE_AT": "after-register",
            "NBANKD_PAUSE_UNTIL": str(go_deposit),
            "NBANKD_AUDIT_PAUSE_AT": "walked",
            "NBANKD_AUDIT_PAUSE_UNTIL": str(go_audit),
        }
    )
    for i in range(5):
        h.drop(f"base{i:04d}.dat", f"base {i}".encode())
    h.wait_settled(5)
    go_deposit.unlink()  # the next deposits stop right after registering
    for i in range(3):
        h.drop(f"held{i:04d}.dat", f"held {i}".encode())
    # held once registered: the lane registers a round's files in one transaction, so
    # one to three of them (as many as reached that step together), the rest behind them
    wait_for(lambda: registered(h) >= 6, 60, "a deposit registered, not yet published")
    held = registered(h) - 5
    audit = start_audit(h)
    wait_for(lambda: audit_phase(h) == "walked", 60, "the audit paused after its walk")
    go_deposit.touch()  # the held deposits finish, then a burst
    for i in range(10):
        h.drop(f"burst{i:04d}.dat", f"burst {i}".encode())
    h.wait_settled(18)
    go_audit.touch()
    out, err = audit.communicate(timeout=120)
    assert audit.returncode == 0, out + err
    report = json.loads(out)
    [arch] = report["archives"]
    assert arch["findings"] == [] and report["ok"] is True
    # the overlap really happened: 5 files walked, the held ones listed too and skipped
    # in flight; the burst (deposited while the audit was held) was neither walked nor
    # listed: not asked about
    listed = 5 + held
    assert (arch["stored"], arch["registered_before"], arch["registered_after"]) == (
        5,
        listed,
        listed,
    )
    assert arch["skipped_in_flight"] == held
    after = json.loads(ctl(h, "audit", "--json").stdout)
    assert after["ok"] is True and after["archives"][0]["stored"] == 18


def test_audit_killed_mid_run_resumes_after_restart(daemon_factory: Any) -> None:
    """kill -9 at the first cache commit of a slow full audit; after restart the daemon
    resumes that run by itself and reads only what was not committed."""
    h: DaemonHarness = daemon_factory(extra_config={"audit": {"max_mb_per_s": 0.001}})
    h.start(env={"NBANKD_CRASH_AT": "audit-committed"})
    for i in range(6):
        h.drop(f"slow{i:04d}.dat", bytes([65 + i]) * 1000)
    h.wait_settled(6)
    audit = start_audit(h, "--full")
    assert h.wait_exit(timeout=60) == -signal.SIGKILL
    audit.communicate(timeout=60)
    assert audit.returncode == 3  # the daemon went away
    cache = h.state_dir / "audits" / "cache.sqlite3"
    with sqlite3.connect(cache) as db:
        committed = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        [(run_id, finished)] = db.execute("SELECT id, finished FROM runs").fetchall()
    assert 1 <= committed < 6 and finished is None
    h.extra_config = {"audit": {"max_mb_per_s": 0}}
    h.write_config()
    h.start()
    report_path = h.state_dir / "audits" / f"{run_id}.json"
    wait_for(report_path.exists, 60, "the resumed audit's report")
    report = json.loads(report_path.read_text())
    assert report["resumed"] is True and report["trigger"] == "resume" and report["full"]
    assert report["ok"] is True
    assert report["archives"][0]["hashed"] == 6 - committed


def test_scheduled_audits_run_and_stay_clean_while_files_arrive(daemon_factory: Any) -> None:
    """With audit.every: 1s the daemon audits by itself, again and again, while files are
    deposited; every report is clean and status shows the last one and the next."""
    h: DaemonHarness = daemon_factory(extra_config={"audit": {"every": "1s"}})
    h.start()
    for i in range(12):
        h.drop(f"sched{i:04d}.dat", f"scheduled {i}".encode())
        if i % 4 == 3:
            h.wait_settled(i + 1)
    h.wait_settled(12)
    folder = h.state_dir / "audits"

    def reports() -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    wait_for(
        lambda: any(r["archives"][0]["stored"] == 12 for r in reports()),
        60,
        "a scheduled audit after the last deposit",
    )
    assert all(r["trigger"] == "schedule" and r["ok"] for r in reports()), reports()
    status = json.loads(ctl(h, "status", "--json").stdout)
    last = status["last_audit"]
    assert last["trigger"] == "schedule" and last["ok"] is True
    started = datetime.fromisoformat(last["started"]).timestamp()
    assert datetime.fromisoformat(status["next_audit"]).timestamp() == started + 1  # every: 1s
    assert ctl(h, "status").returncode == 0


def test_unusable_cache_disables_audits_not_the_daemon(daemon_factory: Any) -> None:
    """An audit cache written by a newer nbankd: the daemon starts and deposits, status is
    degraded saying audits are disabled and why, and nbankctl audit exits 2 naming the
    cache file and the fix."""
    h: DaemonHarness = daemon_factory()
    cache = h.state_dir / "audits" / "cache.sqlite3"
    cache.parent.mkdir(parents=True)
    with sqlite3.connect(cache) as db:
        db.execute("PRAGMA user_version=99")
    h.start()
    h.drop("kept0001.dat", b"deposits go on")
    h.wait_settled(1)
    status = ctl(h, "status")
    assert status.returncode == 1
    assert "audit: DISABLED (audits disabled: audit cache" in status.stdout
    assert "newer nbankd" in status.stdout
    proc = ctl(h, "audit")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(cache) in proc.stderr and "upgrade nbankd, or delete the file;" in proc.stderr


def thread_nice(pid: int, tid: int) -> int:
    """The nice value of one thread of a process (field 19 of /proc/PID/task/TID/stat)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[16])


@pytest.mark.parametrize(("trigger", "nice"), [("schedule", 10), ("request", 0)])
def test_scheduled_audits_read_at_a_lower_priority_requested_ones_do_not(
    daemon_factory: Any, trigger: str, nice: int
) -> None:
    """While an audit reads, its threads run at nice 10 when scheduled (deposits first)
    and at the daemon's own priority when someone asked for it with nbankctl audit."""
    every = "1s" if trigger == "schedule" else "24h"
    h: DaemonHarness = daemon_factory(extra_config={"audit": {"every": every}})
    go = h.root / "go-read"
    h.start(env={"NBANKD_AUDIT_PAUSE_AT": "reading", "NBANKD_AUDIT_PAUSE_UNTIL": str(go)})
    assert h.proc is not None
    h.drop("prio0001.dat", b"read me at the right priority" * 100)
    h.wait_settled(1)
    audit = start_audit(h) if trigger == "request" else None
    reached = Path(f"{go}.reached")

    def reader_tid() -> int | None:  # created, then the thread id written into it
        text = reached.read_text() if reached.exists() else ""
        return int(text) if text else None

    reader = wait_for(reader_tid, 60, f"a {trigger}d audit reading a file")
    reader_nice = thread_nice(h.proc.pid, reader)
    go.touch()
    assert reader_nice == nice
    if audit is not None:
        audit.communicate(timeout=60)
        assert audit.returncode == 0
