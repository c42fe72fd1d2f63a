"""Audit reports on disk (JSON under ``state_dir/audits/``) and as log events.

Each run writes ``<id>.json`` atomically: a temporary file, fsynced, renamed into
place, mode 0640; then ``.latest`` names it. The latest report is the one ``.latest``
names, else the one written last (by mtime): never the one whose id, a time stamp,
sorts last, as a report written while the clock was ahead would hide every later
one. Old reports are deleted: at most the newest :data:`KEEP` are kept, none older
than :data:`KEEP_DAYS` days, and no more than :data:`KEEP_BYTES` together (a report
listing a wiped registry's findings can be large); the report just written is always
kept.

Every finding is also logged as one structured warning event (``audit finding``,
with ``archive``, ``kind``, ``resource_id``, ``path``, ``detail``), so
``journalctl NBANK_RESOURCE_ID=...`` finds a resource's problems (at most
:data:`LOG_LIMIT` per run, so a wiped registry does not flood the journal; the
report always has every finding).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import structlog

from nbankd.archive.fsops import write_atomic
from nbankd.audit.model import AuditReport

log = structlog.get_logger("nbankd.audit")

AUDITS_DIR = "audits"
KEEP = 100
KEEP_DAYS = 90
KEEP_BYTES = 200_000_000
LOG_LIMIT = 1000  # findings logged one by one per run; the report has them all
_SUFFIX = ".json"
#: names the report written last (a clock step can put ids and mtimes out of order)
LATEST = ".latest"


def report_path(folder: Path, report: AuditReport) -> Path:
    return folder / f"{report.id}{_SUFFIX}"


def write_report(folder: Path, report: AuditReport) -> Path:
    """Writes the report (with its own path inside) and prunes old ones; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = report_path(folder, report)
    data = report.to_json()
    data["report"] = str(path)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    write_atomic(path, text.encode("utf-8"), mode=0o640)
    write_atomic(folder / LATEST, f"{path.name}\n".encode(), mode=0o640)
    _prune(folder, keep=path)
    return path


def _reports(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """The reports in ``folder`` with their stat, newest (by mtime, then name) first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.endswith(_SUFFIX) or name.startswith("."):
            continue
        path = folder / name
        with contextlib.suppress(OSError):
            found.append((path, path.stat()))
    found.sort(key=lambda p: (p[1].st_mtime_ns, p[0].name), reverse=True)
    return found


def _prune(folder: Path, *, keep: Path | None = None, now: float | None = None) -> None:
    """Deletes reports beyond the newest :data:`KEEP`, older than :data:`KEEP_DAYS`, or
    past :data:`KEEP_BYTES` counted from the newest; ``keep`` (the report just written)
    counts as the newest and always stays."""
    now = time.time() if now is None else now
    reports = _reports(folder)
    reports.sort(key=lambda p: p[0] != keep)  # stable: the rest stay newest first
    total = 0
    for i, (path, st) in enumerate(reports):
        total += st.st_size
        old = now - st.st_mtime > KEEP_DAYS * 86400
        if i > 0 and (i >= KEEP or total > KEEP_BYTES or old):
            with contextlib.suppress(OSError):
                path.unlink()


def read_report(path: Path) -> AuditReport | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = AuditReport.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report


def latest_report(folder: Path) -> AuditReport | None:
    """The report written last in ``folder`` (the one :data:`LATEST` names), else the
    newest readable one by mtime; None if there is none."""
    try:
        name = (folder / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        name = ""
    if name.endswith(_SUFFIX) and "/" not in name and not name.startswith("."):
        report = read_report(folder / name)
        if report is not None:
            return report
    for path, _st in _reports(folder):
        report = read_report(path)
        if report is not None:
            return report
    return None


def find_report(folder: Path, report_id: str) -> AuditReport | None:
    if "/" in report_id or report_id.startswith("."):
        return None
    return read_report(folder / f"{report_id}{_SUFFIX}")


def log_report(report: AuditReport, limit: int = LOG_LIMIT) -> None:
    """One event per finding (the first ``limit`` of them), then one summary event."""
    logged = 0
    for archive in report.archives:
        if archive.error is not None:
            log.error("audit could not check archive", archive=archive.name, error=archive.error)
        for f in archive.findings:
            logged += 1
            if logged > limit:
                break
            log.warning(
                "audit finding",
                audit=report.id,
                archive=archive.name,
                kind=f.kind,
                resource_id=f.resource,
                path=None if f.path is None else str(f.path),
                detail=f.detail,
            )
    if logged > limit:
        log.warning(
            "audit findings not logged one by one",
            audit=report.id,
            not_logged=report.findings - limit,
            report=report.report_path,
        )
    fields = {
        "audit": report.id,
        "full": report.full,
        "trigger": report.trigger,
        "findings": report.findings,
        "report": report.report_path,
        "hashed": sum(a.hashed for a in report.archives),
        "seconds": None if report.finished is None else round(report.finished - report.started, 3),
    }
    if report.error is not None:
        log.error("audit failed", error=report.error, **fields)
    elif report.ok:
        log.info("audit clean", **fields)
    else:
        log.warning("audit found problems", problems=report.problems(), **fields)


__all__ = [
    "AUDITS_DIR",
    "LATEST",
    "find_report",
    "latest_report",
    "log_report",
    "read_report",
    "report_path",
    "write_report",
]
