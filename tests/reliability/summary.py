"""Prints the figures of the last reliability runs as Markdown, for RELIABILITY.md.

    python tests/reliability/summary.py [RESULTS_DIR]

Reads every ``*.json`` the suites wrote (see ``figures.py``; the registry- and
disk-fault suites write a flat document with their own ``faults_injected``
counts) and prints one table row per suite. A suite with no results file is
listed as "not run", never as zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SUITES = (
    ("crashpoints-embedded", "crash points, embedded registry"),
    ("crashpoints-django", "crash points, django-neurobank"),
    ("kill9-soak", "random kill -9 soak"),
    ("registry_faults", "registry faults (proxy)"),
    ("disk_faults", "disk faults (tmpfs)"),
    ("hostile_inputs", "hostile inputs"),
    ("two_daemons", "two daemons, one inbox"),
    ("secrets", "socket and secrets"),
    ("inbox_escapes", "inbox folders swapped for links"),
    ("one_daemon_per_state", "one daemon per state directory"),
    ("control_dos", "control socket denial of service"),
    ("one-identifier", "two inputs for one identifier"),
    ("upgrade-recovery", "previous release killed, this one recovers"),
)
COLUMNS = ("cases", "inputs", "deposited", "rejected", "kills", "faults", "losses", "duplicates")


def _row(doc: dict[str, Any]) -> dict[str, Any]:
    totals = dict(doc.get("totals") or {})
    if not totals:  # the flat format of the fault suites
        cases = doc.get("cases") or []
        totals = {k: doc[k] for k in ("inputs", "rejected", "losses") if k in doc}
        totals["cases"] = len(cases)
        if "registered_twice" in doc:
            totals["duplicates"] = doc["registered_twice"]
    faults = doc.get("faults_injected")
    if isinstance(faults, dict):
        totals["faults"] = sum(v for v in faults.values() if isinstance(v, int))
    return totals


def summarise(results: Path) -> str:
    lines = [
        "| suite | " + " | ".join(COLUMNS) + " | last run |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | --- |",
    ]
    for stem, label in SUITES:
        path = results / f"{stem}.json"
        if not path.exists():
            lines.append(f"| {label} | " + " | ".join("" for _ in COLUMNS) + " | not run |")
            continue
        doc = json.loads(path.read_text())
        row = _row(doc)
        when = (
            doc.get("time")
            or max((c.get("when", "") for c in (doc.get("cases") or {}).values()), default="")
            if isinstance(doc.get("cases"), dict)
            else doc.get("time", "")
        )
        cells = " | ".join(str(row.get(c, "")) for c in COLUMNS)
        lines.append(f"| {label} | {cells} | {when} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "results"
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
