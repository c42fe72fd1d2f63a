"""A damaged audit cache is renamed aside (audit.cache.move_aside) under a compact UTC stamp."""

from __future__ import annotations

from pathlib import Path

from nbankd.audit.cache import move_aside
from nbankd.timefmt import compact_stamp


def test_move_aside_renames_the_cache_and_its_journal_files(tmp_path: Path) -> None:
    """The cache and its -wal and -shm become <name>.bad-<stamp>[-wal|-shm]; nothing
    else is touched, and a missing -shm is no error."""
    cache = tmp_path / "cache.sqlite3"
    cache.write_bytes(b"not a database")
    (tmp_path / "cache.sqlite3-wal").write_bytes(b"wal")
    (tmp_path / "keep").write_bytes(b"k")
    bad = move_aside(cache, now=1_764_900_000.0)
    assert bad == tmp_path / f"cache.sqlite3.bad-{compact_stamp(1_764_900_000.0)}"
    assert bad.name == "cache.sqlite3.bad-20251205T020000Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        bad.name,
        f"{bad.name}-wal",
        "keep",
    ]
    assert bad.read_bytes() == b"not a database"
