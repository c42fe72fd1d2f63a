"""Figures from reliability runs, for RELIABILITY.md to quote.

Each suite writes ``tests/reliability/results/<suite>.json`` (or under
``$NBANKD_RELIABILITY_RESULTS``): one entry per case, merged into what earlier
runs wrote, plus a ``totals`` summary recomputed at every write. Writing is
atomic (temporary file, then rename), so an interrupted run leaves the last
complete file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("NBANKD_RELIABILITY_RESULTS", Path(__file__).parent / "results"))
SUMMED = ("inputs", "deposited", "rejected", "kills", "losses", "duplicates")


def results_path(suite: str) -> Path:
    return RESULTS / f"{suite}.json"


def load(suite: str) -> dict[str, Any]:
    try:
        return json.loads(results_path(suite).read_text())
    except (FileNotFoundError, ValueError):
        return {"suite": suite, "cases": {}}


def record(suite: str, case: str, data: dict[str, Any]) -> Path:
    """Stores ``data`` as case ``case`` of ``suite`` and refreshes the totals."""
    doc = load(suite)
    doc["cases"][case] = {**data, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    totals: dict[str, Any] = {"cases": len(doc["cases"])}
    for key in SUMMED:
        values = [c[key] for c in doc["cases"].values() if isinstance(c.get(key), int)]
        if values:
            totals[key] = sum(values)
    doc["totals"] = totals
    doc["machine"] = {"python": platform.python_version(), "kernel": platform.release()}
    path = results_path(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
