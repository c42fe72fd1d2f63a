"""Audits: archives compared with the registry, incrementally, and right during ingest.

The pure decisions are in :mod:`.plan`; :mod:`.walk`, :mod:`.listing`,
:mod:`.reader` and :mod:`.run` do the I/O; :mod:`.cache` keeps what was read;
:mod:`.report` writes reports and log events; :mod:`.schedule` runs audits inside
the daemon. For a one-off audit from Python (benchmarks, scripts)::

    from nbankd.audit import AuditTarget, run_audit
    report = run_audit([AuditTarget("birdsong", Path("/data/birdsong"))], registry, state_dir)
    report.ok, report.to_json()
"""

from __future__ import annotations

from nbankd.lazy import lazy_exports

# name -> module, imported on first use: ``nbankctl`` imports the model without
# paying for the registry clients and the hashing pool
_EXPORTS = {
    "run_audit": "nbankd.audit.api",
    "ArchiveResult": "nbankd.audit.model",
    "AuditReport": "nbankd.audit.model",
    "Finding": "nbankd.audit.model",
    "Auditor": "nbankd.audit.run",
    "AuditSettings": "nbankd.audit.settings",
    "AuditTarget": "nbankd.audit.settings",
    "InFlight": "nbankd.audit.settings",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
