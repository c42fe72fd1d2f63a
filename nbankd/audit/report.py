"""Audit reports on disk (JSON under ``state_dir/audits/``) and as log events.

Each run writes ``<id>.json`` (ids sort by start time) atomically: a temporary
file, fsynced, renamed into place, mode 0640. Old reports are deleted: at most the
newest :data:`KEEP` are kept, none older than :data:`KEEP_DAYS` days, and no more
than :data:`KEEP_BYTES` together (a report listing a wiped registry's findings can
be large); the newest report is always kept.

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
    _prune(folder)
    return path


def _reports(folder: Path) -> list[Path]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(folder / n for n in names if n.endswith(_SUFFIX) and not n.startswith("."))


def _prune(folder: Path, now: float | None = None) -> None:
    """Deletes reports beyond the newest :data:`KEEP`, older than :data:`KEEP_DAYS`, or
    past :data:`KEEP_BYTES` counted from the newest; the newest is always kept."""
    now = time.time() if now is None else now
    total = 0
    for i, path in enumerate(reversed(_reports(folder))):
        try:
            st = path.stat()
        except OSError:
            continue
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
    """The newest readable report in ``folder``, if any."""
    for path in reversed(_reports(folder)):
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
    "find_report",
    "latest_report",
    "log_report",
    "read_report",
    "report_path",
    "write_report",
]
