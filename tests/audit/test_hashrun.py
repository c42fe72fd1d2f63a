"""The audit's reader pool: work handed over while it runs, errors kept per file,
cancellation, and results committed to a real cache."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd.audit.cache import AuditCache, AuditCacheError
from nbankd.audit.hashrun import HashRun, Read
from nbankd.audit.model import FileStat
from nbankd.audit.reader import Cancelled, sha1_of_resource
from nbankd.audit.walk import Stored


def stored(path: Path) -> Stored:
    st = os.lstat(path)
    stat = FileStat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return Stored(path.stem, str(path), stat, False)


def files(root: Path, n: int) -> list[Stored]:
    out = []
    for i in range(n):
        path = root / f"r{i:03d}.dat"
        path.write_bytes(f"file {i}".encode() * 1000)
        out.append(stored(path))
    return out


def read(item: Stored) -> tuple[str, int, bool]:
    sha1, n = sha1_of_resource(item.path, lambda _n: None, is_dir=False)
    return sha1, n, True


def run(
    cache: AuditCache,
    reader: Callable[[Stored], tuple[str, int, bool]] = read,
    cancelled: Callable[[], bool] = lambda: False,
) -> HashRun:
    return HashRun(
        "arch",
        cache,
        reader,
        workers=2,
        run_id="run-1",
        batch=3,
        batch_seconds=60.0,
        cancelled=cancelled,
    )


@pytest.fixture
def cache(tmp_path: Path) -> AuditCache:
    return AuditCache(tmp_path / "cache.sqlite3")


def test_work_handed_over_while_running_is_read_once_each(
    tmp_path: Path, cache: AuditCache
) -> None:
    """Resources submitted in two rounds (one twice) are each read once, hashed right."""
    items = files(tmp_path, 10)
    reads = run(cache)
    reads.submit(items[:6])
    reads.submit(items[4:])
    results = reads.finish()
    assert reads.hashed == 10 and sorted(results) == [s.name for s in items]
    for s in items:
        assert results[s.name] == Read(
            hashlib.sha1(s.path.read_bytes()).hexdigest(), s.stat.size, True
        )


def test_every_unchanged_read_is_committed_to_the_cache(tmp_path: Path, cache: AuditCache) -> None:
    """Each read that stayed unchanged is in the cache with this run's id and its stat."""
    items = files(tmp_path, 7)
    reads = run(cache)
    reads.submit(items)
    reads.finish()
    entries = cache.load("arch")
    assert sorted(entries) == [s.name for s in items]
    assert all(entries[s.name].run_id == "run-1" and entries[s.name][1:5] == s.stat for s in items)


def test_a_file_changed_while_read_gets_a_result_but_no_cache_entry(
    tmp_path: Path, cache: AuditCache
) -> None:
    """A read that saw the file change is returned, and not cached (read next run)."""
    [item] = files(tmp_path, 1)
    reads = run(cache, reader=lambda s: (*read(s)[:2], False))
    reads.submit([item])
    assert reads.finish()[item.name].unchanged is False
    assert cache.load("arch") == {}


def test_an_unreadable_file_is_kept_as_its_error_and_the_rest_are_read(
    tmp_path: Path, cache: AuditCache
) -> None:
    """A file that vanished gives its OSError; the others are read and cached."""
    items = files(tmp_path, 4)
    items[1].path.unlink()
    reads = run(cache)
    reads.submit(items)
    results = reads.finish()
    assert isinstance(results[items[1].name], FileNotFoundError)
    assert sorted(cache.load("arch")) == sorted(s.name for s in items if s is not items[1])


def test_cancelling_stops_handing_out_work(tmp_path: Path, cache: AuditCache) -> None:
    """Once cancelled, reads under way end (Cancelled) and nothing more is started."""
    items = files(tmp_path, 50)
    stop = threading.Event()
    started: list[str] = []

    def reader(item: Stored) -> tuple[str, int, bool]:
        started.append(item.name)
        stop.set()
        raise Cancelled("audit stopped")

    reads = run(cache, reader=reader, cancelled=stop.is_set)
    reads.submit(items)
    results = reads.finish()
    assert results == {} and 1 <= len(started) <= 8  # at most the first handful queued


def test_a_cache_that_cannot_be_written_is_raised_by_finish(tmp_path: Path) -> None:
    """A commit that fails reaches the caller through finish()."""
    cache = AuditCache(tmp_path / "cache.sqlite3")
    cache.close()  # every later write fails
    reads = run(cache)
    reads.submit(files(tmp_path, 2))
    with pytest.raises(AuditCacheError):
        reads.finish()
