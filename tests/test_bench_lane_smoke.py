"""bench/lane.py keeps working (tiny sizes, no speed assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_lane_deposits_and_reports_cpu_per_file(tmp_path: Path) -> None:
    """`bench/lane.py` deposits its files in rounds and prints CPU and calls per file."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "lane.py"),
            "--files",
            "20",
            "--runs",
            "1",
            "--profile",
            "3",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = re.search(r"run 1: 20 files: cpu_us_per_file (\d+).*calls_per_file (\d+)", proc.stdout)
    assert line is not None, proc.stdout
    assert int(line[1]) > 0 and int(line[2]) > 0
    assert list(tmp_path.iterdir()) == []  # its scratch folder removed
