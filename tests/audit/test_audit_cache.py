"""The audit cache: incremental reads, the rolling scrub over real runs, resuming an
interrupted run, the aggregate rate cap, and the JSON report (embedded registry)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from audit_helpers import Setup

from nbankd.audit.api import run_audit
from nbankd.audit.cache import AuditCache
from nbankd.audit.model import HASH_MISMATCH
from nbankd.audit.plan import DAY
from nbankd.audit.reader import Cancelled, RateLimiter
from nbankd.audit.report import latest_report
from nbankd.audit.run import Auditor, AuditSettings
from nbankd.audit.walk import Stored


class CountingAuditor(Auditor):
    """An Auditor that records what it reads and can be told to stop after n reads."""

    def __init__(self, *args: object, stop_after: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.read: list[str] = []
        self.stop_after = stop_after
        self._count_lock = threading.Lock()

    def _read(self, stored: Stored) -> tuple[str, int, bool]:
        with self._count_lock:
            if self.stop_after is not None and len(self.read) >= self.stop_after:
                self.stop.set()
                raise Cancelled("told to stop")
            self.read.append(stored.name)
        return super()._read(stored)


def counting(
    s: Setup, cache: AuditCache, clock: object = time.time, **settings: object
) -> CountingAuditor:
    stop_after = settings.pop("stop_after", None)
    opts = {"workers": 1, "batch": 1, "scrub_days": 0, **settings}
    return CountingAuditor(
        s.registry,
        cache,
        settings=AuditSettings(**opts),  # type: ignore[arg-type]
        clock=clock,  # type: ignore[arg-type]
        stop_after=stop_after,  # type: ignore[arg-type]
    )


def test_incremental_audit_reads_only_what_changed(setup: Setup, tmp_path: Path) -> None:
    """After a full audit, a changed file is the only one read again, and its mismatch found."""
    cache = AuditCache(tmp_path / "cache.sqlite3")
    first = counting(setup, cache)
    assert first.run([setup.target], full=True).ok
    assert sorted(first.read) == setup.names
    victim = setup.archive.stored_path("res005")
    assert victim is not None
    victim.chmod(0o644)
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    victim.chmod(0o444)
    second = counting(setup, cache)
    report = second.run([setup.target])
    assert second.read == ["res005"]
    assert [(f.kind, f.resource) for f in report.archives[0].findings] == [
        (HASH_MISMATCH, "res005")
    ]


def test_interrupted_audit_resumes_where_it_stopped(setup: Setup, tmp_path: Path) -> None:
    """A full audit stopped after 5 reads resumes (new cache connection, as after a
    restart) with the same run, reading only the 7 resources it had not read."""
    cache_path = tmp_path / "cache.sqlite3"
    cache = AuditCache(cache_path)
    first = counting(setup, cache, stop_after=5)
    with pytest.raises(Cancelled):
        first.run([setup.target], full=True)
    cache.close()
    cache = AuditCache(cache_path)
    unfinished = cache.unfinished_run()
    assert unfinished is not None and unfinished.full
    second = counting(setup, cache)
    report = second.run([setup.target], resume=unfinished)
    assert report.resumed and report.id == unfinished.id and report.full and report.ok
    assert sorted(first.read + second.read) == setup.names
    assert not set(first.read) & set(second.read)
    assert cache.unfinished_run() is None


def test_scheduled_runs_scrub_every_resource_within_scrub_days(
    setup: Setup, tmp_path: Path
) -> None:
    """With scrub_days=3 and daily audits, three unchanged runs read disjoint thirds,
    together every resource; the fourth starts over with the first third."""
    now = [1_000_000.0]
    cache = AuditCache(tmp_path / "cache.sqlite3")
    counting(setup, cache, clock=lambda: now[0]).run([setup.target], full=True)
    slices = []
    for _ in range(4):
        now[0] += DAY
        auditor = counting(setup, cache, clock=lambda: now[0], scrub_days=3, every=DAY)
        assert auditor.run([setup.target]).ok
        slices.append(sorted(auditor.read))
    assert [len(s) for s in slices] == [4, 4, 4, 4]
    assert sorted(slices[0] + slices[1] + slices[2]) == setup.names
    assert slices[3] == slices[0]


def test_run_audit_writes_the_json_report(setup: Setup) -> None:
    """run_audit (the API benchmarks use) writes <id>.json under state_dir/audits."""
    report = run_audit([setup.target], setup.registry, setup.state, full=True)
    assert report.ok and report.report_path is not None
    path = Path(report.report_path)
    assert path.parent == setup.state / "audits" and path.name == f"{report.id}.json"
    data = json.loads(path.read_text())
    assert data["id"] == report.id and data["ok"] is True and data["full"] is True
    assert data["archives"][0]["hashed"] == 12 and data["archives"][0]["stored"] == 12
    assert os.stat(path).st_mode & 0o777 == 0o640
    latest = latest_report(setup.state / "audits")
    assert latest is not None and latest.id == report.id


def test_rate_limiter_caps_the_aggregate_rate() -> None:
    """Four threads reading together stay under the cap: 2 MB at 10 MB/s takes >= 0.15 s."""
    limiter = RateLimiter(10e6, burst=0.05)
    start = time.monotonic()

    def reader() -> None:
        for _ in range(10):
            limiter(50_000)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 0.2 - 0.05


def test_rate_limiter_books_each_block_on_one_timeline() -> None:
    """Without real time: 10 blocks of 1 MB at 1 MB/s take 10 s; idle time earns at most
    the burst back."""
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(1e6, burst=0.5, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        limiter(1_000_000)
    assert sum(slept) == pytest.approx(10.0)
    now[0] += 100.0  # idle: only 0.5 s of credit
    slept.clear()
    limiter(1_000_000)
    assert sum(slept) == pytest.approx(0.5)
    assert RateLimiter(None).rate is None and RateLimiter(0).rate is None
