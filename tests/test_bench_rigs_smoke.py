"""The rigs benchmark keeps working (1 rig, a few files, no speed assertions): bench/rigs.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_rigs_quick_prints_a_row_for_one_rig(tmp_path: Path) -> None:
    """`bench/rigs.py --quick` exits 0 and prints the load average and one row: fast, 1 rig."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rigs.py"), "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "load average at start" in proc.stdout
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if "|" in line]
    header, *body = [[cell.strip() for cell in row] for row in rows]
    assert header[:3] == ["hasher", "rigs", "files"]
    assert [row[:3] for row in body] == [["fast", "1", "20"]]
    assert float(body[0][header.index("files/s")]) > 0
    assert not list(tmp_path.glob("nbankd-bench-rigs-*")), "scratch folder left behind"
