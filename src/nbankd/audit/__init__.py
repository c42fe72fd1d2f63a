"""Audits: archives compared with the registry, incrementally, and right during ingest.

The pure decisions are in :mod:`.plan`; :mod:`.walk`, :mod:`.listing`,
:mod:`.reader` and :mod:`.run` do the I/O; :mod:`.cache` keeps what was read;
:mod:`.report` writes reports and log events; :mod:`.schedule` runs audits inside
the daemon. For a one-off audit from Python (benchmarks, scripts)::

    from nbankd.audit import AuditTarget, run_audit
    report = run_audit([AuditTarget("birdsong", Path("/data/birdsong"))], registry, state_dir)
    report.ok, report.to_json()
"""

from nbankd.audit.api import run_audit
from nbankd.audit.model import ArchiveResult, AuditReport, Finding
from nbankd.audit.run import Auditor
from nbankd.audit.settings import AuditSettings, AuditTarget, InFlight

__all__ = [
    "ArchiveResult",
    "AuditReport",
    "AuditSettings",
    "AuditTarget",
    "Auditor",
    "Finding",
    "InFlight",
    "run_audit",
]
