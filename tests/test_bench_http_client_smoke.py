"""bench/http_client.py keeps working (a few requests, no speed assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_http_client_prints_cpu_per_post_for_each_client() -> None:
    """`bench/http_client.py` POSTs through each client and prints a line per client."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "http_client.py"), "--requests", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict(re.findall(r"^(http\.client|requests|nbankd) +(\d+) +\d+ ", proc.stdout, re.M))
    assert set(rows) == {"http.client", "requests", "nbankd"}, proc.stdout
    assert all(int(cpu) > 0 for cpu in rows.values()), proc.stdout
