"""The benchmark command keeps working (tiny sizes, no speed assertions): bench/run.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("nbankd-embedded", "nbankd-django", "nbank-deposit", "bare-post")


def test_bench_quick_burst_writes_a_result_file(tmp_path: Path) -> None:
    """`bench/run.py --quick --scenario burst` deposits with all four systems and writes JSON."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--scenario",
            "burst",
            "--burst-files",
            "10",
            "--slow-hasher-files",
            "0",
            "--work-dir",
            str(tmp_path),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["kernel"]
    assert doc["versions"]["neurobank"].startswith("0.13")
    assert doc["versions"]["django-neurobank"].startswith("0.12")
    burst = doc["scenarios"]["burst"]
    for system in SYSTEMS:
        assert burst["metrics"][f"{system} files/s"]["values"][0] > 0
    assert "burst: embedded vs nbank deposit" in burst["targets"]
    assert "== burst" in proc.stdout  # the printed table
    assert not list(tmp_path.glob("nbankd-bench-*")), "scratch folder left behind"
