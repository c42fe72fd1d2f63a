"""What an audit is given: its targets, its settings, the deposits in flight, its run id."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from nbankd.config.model import AuditConfig
from nbankd.timefmt import compact_stamp

log = structlog.get_logger("nbankd.audit")

NICE = 10  # audit threads yield the CPU (and, with CFQ/BFQ, the disk) to deposits
MAX_WORKERS = 32


def default_workers(cpus: int | None = None) -> int:
    """Reading threads when ``audit.workers`` is not set: two per core, at least 4 (small
    files and NFS are bound by latency more than by CPU), at most 32."""
    return min(MAX_WORKERS, max(4, 2 * (cpus or os.cpu_count() or 1)))


@dataclass(frozen=True)
class AuditTarget:
    """An archive to audit: its registry name and its folder."""

    name: str
    path: Path


@dataclass(frozen=True)
class InFlight:
    """What the deposit journal shows in flight: identifiers and staging tokens."""

    names: frozenset[str] = frozenset()
    tokens: frozenset[str] = frozenset()

    def __or__(self, other: InFlight) -> InFlight:
        return InFlight(self.names | other.names, self.tokens | other.tokens)


def journal_in_flight(journal: Any) -> Callable[[], InFlight]:
    """An in-flight reader over a :class:`~nbankd.deposit.journal.Journal`."""

    def read() -> InFlight:
        items = journal.unfinished()
        return InFlight(
            frozenset(i.name for i in items if i.name), frozenset(i.token for i in items)
        )

    return read


@dataclass(frozen=True)
class AuditSettings:
    scrub_days: int = 30
    every: float = 86400.0
    max_mb_per_s: float = 200.0
    workers: int = field(default_factory=default_workers)  # reading threads
    #: unowned staging entries, partial transfers, NFS placeholders and unregistered
    #: files changed more recently than this may be another host's transfer under way
    staging_grace: float = 3600.0
    batch: int = 256  # cache commit after this many reads...
    batch_seconds: float = 2.0  # ...or this long

    @classmethod
    def from_config(cls, audit: AuditConfig, **overrides: Any) -> AuditSettings:
        base = cls(
            scrub_days=audit.scrub_days,
            every=audit.every,
            max_mb_per_s=audit.max_mb_per_s,
            workers=audit.workers or default_workers(),
        )
        return replace(base, **overrides)


def new_run_id(now: float) -> str:
    return f"{compact_stamp(now)}-{secrets.token_hex(3)}"


def lower_priority() -> None:
    """Lowers the calling thread's priority (audits yield to deposits); a refusal (a
    seccomp filter without setpriority) is logged once, never an error."""
    global _refused_logged
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError as err:
        if not _refused_logged:
            _refused_logged = True
            log.warning(
                "cannot lower the audit's priority; it runs at the daemon's",
                error=err.strerror or str(err),
                hint="allow setpriority in the unit (SystemCallFilter=setpriority)",
            )


_refused_logged = False


__all__ = [
    "AuditSettings",
    "AuditTarget",
    "InFlight",
    "default_workers",
    "journal_in_flight",
    "lower_priority",
    "new_run_id",
]
