"""One audit outside the daemon (benchmarks, scripts), sharing the daemon's cache and
report folder under ``state_dir`` so the two resume and report alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nbankd.audit.cache import CACHE_NAME, AuditCache
from nbankd.audit.model import AuditReport
from nbankd.audit.report import AUDITS_DIR
from nbankd.audit.run import Auditor
from nbankd.audit.settings import AuditSettings, AuditTarget, InFlight, journal_in_flight
from nbankd.registry.base import Registry


def run_audit(
    targets: Sequence[AuditTarget],
    registry: Registry,
    state_dir: Path,
    *,
    full: bool = False,
    settings: AuditSettings | None = None,
    journal_path: Path | None = None,
    resume: bool = True,
) -> AuditReport:
    """One audit outside the daemon (benchmarks, scripts), with the daemon's cache and
    report folder under ``state_dir``. An interrupted run (of the same kind, full or
    not) is resumed when ``resume``; otherwise, or when it was of the other kind, it
    is closed (abandoned) so that nothing resumes it later. Raises
    :class:`~nbankd.audit.cache.AuditCacheError` when the cache cannot be used."""
    folder = Path(state_dir) / AUDITS_DIR
    cache = AuditCache(folder / CACHE_NAME)
    journal = None
    try:
        in_flight: Callable[[], InFlight] = InFlight
        if journal_path is not None and journal_path.exists():
            from nbankd.deposit.journal import Journal

            journal = Journal(journal_path)
            in_flight = journal_in_flight(journal)
        auditor = Auditor(registry, cache, settings=settings, in_flight=in_flight)
        unfinished = cache.unfinished_run()
        if unfinished is not None and (not resume or unfinished.full != full):
            cache.abandon_unfinished(time.time())
            unfinished = None
        return auditor.run(targets, full=full, resume=unfinished, report_dir=folder)
    finally:
        cache.close()
        if journal is not None:
            journal.close()


__all__ = ["run_audit"]
