"""An audit problem never stops the daemon nor spins: a damaged cache is moved aside, an
unusable one disables audits with the reason, a read-only one fails at a bounded rate;
older caches are rebuilt; reports are pruned; reads are booked before they happen."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import Setup

from fixtures.daemon import wait_for
from fixtures.users import TestUser
from nbankd import errors
from nbankd.audit import report as reports
from nbankd.audit.cache import SCHEMA_VERSION, AuditCache
from nbankd.audit.model import AuditReport
from nbankd.audit.reader import sha1_of_file
from nbankd.audit.schedule import AuditScheduler, AuditsDisabled
from nbankd.audit.settings import AuditSettings, InFlight, default_workers
from nbankd.config.model import ArchiveConfig, AuditConfig, Config
from nbankd.hashing import BLOCK_SIZE


def scheduler(s: Setup, every: float = 86400.0) -> AuditScheduler:
    config = Config(
        source=s.state / "config.yaml",
        state_dir=s.state,
        archives=(ArchiveConfig(s.archive.path, "arch"),),
        audit=AuditConfig(every=every, max_mb_per_s=0),
    )
    return AuditScheduler(config=lambda: config, registry=lambda: s.registry, in_flight=InFlight)


def audit_now(sched: AuditScheduler, full: bool = True) -> dict[str, Any]:
    """Requests an audit and waits for its report."""
    ticket = sched.request(full)
    state = wait_for(
        lambda: (st := sched.wait(ticket, 1.0)) and st["state"] == "done" and st,
        what="the requested audit's report",
    )
    return state["report"]  # type: ignore[no-any-return]


def test_damaged_cache_is_moved_aside_and_audits_go_on(setup: Setup) -> None:
    """A cache file that is not a database is renamed cache.sqlite3.bad-<time> at start;
    audits are not disabled and the next one reads everything into a new cache."""
    folder = setup.state / "audits"
    folder.mkdir(parents=True)
    (folder / "cache.sqlite3").write_bytes(b"not a database at all " * 200)
    sched = scheduler(setup)
    sched.start()
    try:
        assert sched.disabled is None and sched.problems() == []
        [bad] = folder.glob("cache.sqlite3.bad-*")
        assert bad.read_bytes().startswith(b"not a database")
        report = audit_now(sched)
        assert report["ok"] and report["archives"][0]["hashed"] == 12
    finally:
        sched.stop()
    with sqlite3.connect(folder / "cache.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 12


def test_unusable_cache_disables_audits_with_the_reason(setup: Setup) -> None:
    """A cache of a newer nbankd is left alone and disables audits: status and problems
    say why, a request fails with exit 2 naming the file and the fix, and once the file
    is deleted the next request runs an audit."""
    cache_path = setup.state / "audits" / "cache.sqlite3"
    cache_path.parent.mkdir(parents=True)
    with sqlite3.connect(cache_path) as db:
        db.execute("PRAGMA user_version=99")
    sched = scheduler(setup)
    sched.start()
    try:
        assert sched.disabled is not None and sched.disabled.startswith("audits disabled: ")
        assert str(cache_path) in sched.disabled and "newer nbankd" in sched.disabled
        status = sched.status()
        assert status["audit_disabled"] == sched.disabled and status["next_audit"] is None
        [problem] = sched.problems()
        assert str(cache_path) in problem
        with pytest.raises(AuditsDisabled) as caught:
            sched.request(False)
        err = caught.value
        assert isinstance(err, errors.NbankdError) and (err.code, err.exit_code) == ("config", 2)
        assert str(cache_path) in str(err) and "delete the file" in str(err)
        assert cache_path.exists()  # not damaged: never moved or deleted by nbankd
        cache_path.unlink()
        assert audit_now(sched)["ok"]
        assert sched.disabled is None and sched.problems() == []
    finally:
        sched.stop()


READ_ONLY_RUN = """
import json, sys, time
from pathlib import Path
from nbankd.audit.schedule import AuditScheduler
from nbankd.audit.settings import InFlight
from nbankd.config.model import AuditConfig, Config
from nbankd.registry.embedded import EmbeddedRegistry

state, window = Path(sys.argv[1]), float(sys.argv[2])
registry = EmbeddedRegistry(state / "registry.sqlite3")
config = Config(source=state / "c.yaml", state_dir=state, audit=AuditConfig(every=0.25))
sched = AuditScheduler(config=lambda: config, registry=lambda: registry, in_flight=InFlight)
began = time.monotonic()
sched.start()
time.sleep(window)  # the observation window: attempts are counted over it
deadline = time.monotonic() + 60
while sched.status()["last_audit"] is None and time.monotonic() < deadline:
    time.sleep(0.05)  # on a loaded machine the first try may end after the window
out = {"disabled": sched.disabled, "problems": sched.problems(), "status": sched.status()}
sched.stop()
out["observed"] = time.monotonic() - began
print(json.dumps(out))
"""


def test_read_only_cache_fails_at_a_bounded_rate(
    unpriv_user: TestUser, user_tmp_path: Path
) -> None:
    """A cache the daemon's user cannot write (made by root) opens, and every audit then
    fails with a report naming the file and the fix, one try per audit.every (0.25 s),
    not in a busy loop: at most 9 tries in 1.5 s (3 more than one per 0.25 s of the time
    observed), and status is degraded by it."""
    state = user_tmp_path / "state"
    folder = state / "audits"
    folder.mkdir(parents=True)
    for path in (state, folder):
        os.chown(path, unpriv_user.uid, unpriv_user.gid)
    AuditCache(folder / "cache.sqlite3").close()  # root's, mode 0640
    (folder / "cache.sqlite3").chmod(0o644)  # readable, not writable, by the user
    proc = unpriv_user.python(READ_ONLY_RUN, state, "1.5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])  # after the log lines
    failures = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    # 1.5 s and a little (9 tries at most), or longer if the first try ended late
    most = int(out["observed"] / 0.25) + 3
    assert 1 <= len(failures) <= most, (len(failures), out["observed"])
    assert all(f["error_code"] == "audit-cache" for f in failures)
    assert (
        "readonly" in failures[0]["error"] and str(folder / "cache.sqlite3") in failures[0]["error"]
    )
    assert "must be able to write the file" in failures[0]["error"]
    assert out["disabled"] is None and out["status"]["last_audit"]["ok"] is False
    assert any("cache.sqlite3" in p for p in out["problems"])


V1_SCHEMA = (
    "CREATE TABLE entries (archive TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha1 TEXT NOT NULL,"
    " verified_at REAL NOT NULL, PRIMARY KEY (archive, name)) WITHOUT ROWID",
    "CREATE TABLE runs (id TEXT PRIMARY KEY, started REAL NOT NULL, full INTEGER NOT NULL,"
    " trigger TEXT NOT NULL, finished REAL, report TEXT)",
)


def test_version_1_cache_is_rebuilt_keeping_its_runs(tmp_path: Path) -> None:
    """A version 1 cache (no ctime, no run id) loses its entries, so the next audit reads
    everything once, but keeps its runs, so the schedule carries on."""
    path = tmp_path / "cache.sqlite3"
    with sqlite3.connect(path) as db:
        for statement in V1_SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO entries VALUES ('arch', 'r1', 1, 2, 3, 'aa', 4.0)")
        db.execute("INSERT INTO runs VALUES ('run1', 10.0, 0, 'schedule', 20.0, NULL)")
        db.execute("PRAGMA user_version=1")
    cache = AuditCache(path)
    try:
        assert cache.load("arch") == {}
        last = cache.last_finished()
        assert last is not None and (last.id, last.finished) == ("run1", 20.0)
    finally:
        cache.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        columns = [row[1] for row in db.execute("PRAGMA table_info(entries)")]
        assert "ctime_ns" in columns and "run_id" in columns


def test_reports_are_kept_by_number_age_and_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing a report deletes those older than KEEP_DAYS and those past KEEP_BYTES
    (counted from the newest); the newest always stays."""
    folder = tmp_path / "audits"
    now = time.time()
    old = reports.write_report(folder, AuditReport(id="20200101T000000Z-aaaaaa", started=0.0))
    os.utime(old, (now - 100 * 86400, now - 100 * 86400))
    recent = [
        reports.write_report(folder, AuditReport(id=f"20260101T00000{i}Z-bbbbbb", started=0.0))
        for i in range(3)
    ]
    assert not old.exists() and all(p.exists() for p in recent)
    monkeypatch.setattr(reports, "KEEP_BYTES", 2 * recent[0].stat().st_size + 10)
    newest = reports.write_report(folder, AuditReport(id="20270101T000000Z-cccccc", started=0.0))
    assert sorted(folder.glob("*.json")) == [recent[2], newest]
    monkeypatch.setattr(reports, "KEEP_BYTES", 1)
    reports.write_report(folder, AuditReport(id="20280101T000000Z-dddddd", started=0.0))
    assert [p.name for p in folder.glob("*.json")] == ["20280101T000000Z-dddddd.json"]


def test_each_block_is_booked_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate limiter is asked for a block's bytes before the block is read, so many
    threads starting together cannot each read a block past the cap first."""
    path = tmp_path / "big.dat"
    path.write_bytes(os.urandom(BLOCK_SIZE + 1000))
    events: list[tuple[str, int]] = []
    real_readv = os.readv

    def readv(fd: int, buffers: Any) -> int:
        n = real_readv(fd, buffers)
        events.append(("read", n))
        return n

    monkeypatch.setattr(os, "readv", readv)
    sha1_of_file(path, lambda n: events.append(("book", n)))
    assert events == [
        ("book", BLOCK_SIZE),
        ("read", BLOCK_SIZE),
        ("book", 1000),
        ("read", 1000),
        ("read", 0),
    ]


def test_reading_threads_default_and_setting() -> None:
    """Two reading threads per core, at least 4 and at most 32; audit.workers overrides."""
    assert [default_workers(n) for n in (1, 2, 3, 16, 64)] == [4, 4, 6, 32, 32]
    assert AuditSettings.from_config(AuditConfig(workers=5)).workers == 5
    assert AuditSettings.from_config(AuditConfig()).workers == default_workers()
