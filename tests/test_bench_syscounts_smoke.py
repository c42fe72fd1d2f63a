"""The sync-call count keeps working (tiny burst, no speed assertions): bench/syscounts.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = (
    "journal database",
    "registry database",
    "data files (staging/, resources/)",
    "stub folders (resources/XX)",
    "resources/ and staging/ folders",
    "receipts",
    "inbox work folder (.nbank)",
    "inbox folder",
    "other",
)
COLUMNS = ("nbankd (embedded)", "nbank deposit", "django-neurobank (during nbank)")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_bench_syscounts_quick_prints_every_category(tmp_path: Path) -> None:
    """`bench/syscounts.py --quick` prints and saves sync calls per file by category."""
    out = tmp_path / "syscounts.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "syscounts.py"),
            "--quick",
            "--files",
            "20",
            "--disk-seconds",
            "0.3",
            "--work-dir",
            str(tmp_path),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if "|" in line]
    for category in CATEGORIES:
        assert any(row.startswith(category) for row in rows), category
    assert any(row.startswith("journal commits") for row in rows)
    assert "| sync calls per file | " + " | ".join(COLUMNS) in proc.stdout
    doc = json.loads(out.read_text())
    nbankd = doc["columns"]["nbankd (embedded)"]
    assert nbankd["total_per_file"] > 0  # a durable deposit waits for the disk
    assert nbankd["journal commits (syncs of journal.sqlite3-wal)"] > 0
    assert [d["threads"] for d in doc["limits"]["disk"]] == [1, 4]
    assert doc["limits"]["nbankd_cpu_ms_per_file"] > 0
    assert not list(tmp_path.glob("nbankd-syscounts-*")), "scratch folder left behind"
