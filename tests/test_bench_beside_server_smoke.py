"""The load-beside-the-server measure keeps working (50 POSTs, no speed assertions):
bench/beside_server.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = (sys.executable, str(REPO / "bench" / "beside_server.py"))


def test_bench_beside_server_quick_prints_a_rate_for_each_load(tmp_path: Path) -> None:
    """`bench/beside_server.py --quick` exits 0, prints a positive rate for each of its
    three loads, and kills its load processes and removes its scratch folder."""
    proc = subprocess.run(
        [*SCRIPT, "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {
        line[:24].strip(): float(line[24:].split()[0])
        for line in proc.stdout.splitlines()
        if line[:24].strip() in ("alone", "fsync 190 files/s", "cpu 0.5 core")
    }
    assert set(rows) == {"alone", "fsync 190 files/s", "cpu 0.5 core"}
    assert all(rate > 0 for rate in rows.values())
    assert not list(tmp_path.glob("nbankd-beside-*")), "scratch folder left behind"
    leftover = subprocess.run(
        ["pgrep", "-f", f"{tmp_path}/nbankd-beside-.*/fsync-190"], capture_output=True
    )
    assert leftover.returncode == 1, "the fsync load is still running"
