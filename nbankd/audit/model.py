"""The values an audit produces: findings, per-archive results, the whole report.

Finding kinds are the categories of ``nbank archive check`` (and ``nbankctl archive
check``, which shares them), so users recognise them. Everything here is a plain
frozen value with a JSON form; nothing does I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from nbankd.timefmt import from_iso, iso

MISSING_FROM_ARCHIVE = "missing from archive"
MISSING_FROM_REGISTRY = "missing from registry"
REGISTERED_ELSEWHERE = "registered elsewhere"
CHANGED_ELSEWHERE = "changed elsewhere"  # registered elsewhere, but other bytes
HASH_MISMATCH = "hash mismatch"
UNREADABLE = "unreadable"
UNEXPECTED = "unexpected"
MISPLACED = "misplaced"  # a resource of this archive in the wrong stub folder
INCOMPLETE = "incomplete transfer"
PERMISSION = "permission"
NO_LOCATION = "no location"  # registry-wide: a resource no archive holds
KINDS = (
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    REGISTERED_ELSEWHERE,
    CHANGED_ELSEWHERE,
    HASH_MISMATCH,
    UNREADABLE,
    UNEXPECTED,
    MISPLACED,
    INCOMPLETE,
    PERMISSION,
    NO_LOCATION,
)
#: the groups of nbank's summary line, in its order
SUMMARY = (
    ("missing from archive", (MISSING_FROM_ARCHIVE,)),
    ("missing from registry", (MISSING_FROM_REGISTRY,)),
    ("read/verify errors", (UNREADABLE, HASH_MISMATCH)),
    ("other layout errors", (UNEXPECTED, MISPLACED, INCOMPLETE)),
    ("permission errors", (PERMISSION,)),
    ("registered elsewhere", (REGISTERED_ELSEWHERE, CHANGED_ELSEWHERE)),
)
#: error codes of an archive (or report) that mean the registry could not be reached
REGISTRY_OUTAGE_CODES = frozenset({"registry-unavailable"})


@dataclass(frozen=True)
class Finding:
    """One problem: what kind, which resource (if any), which path (if any), and why."""

    kind: str
    resource: str | None
    path: Path | None
    detail: str = ""

    def __str__(self) -> str:
        who = " : ".join(str(x) for x in (self.resource, self.path) if x is not None)
        return f"{who} - {self.kind}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "resource": self.resource,
            "path": None if self.path is None else str(self.path),
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Finding:
        path = d.get("path")
        return cls(
            str(d["kind"]),
            d.get("resource"),
            None if path is None else Path(path),
            str(d.get("detail") or ""),
        )


def summary_counts(findings: Iterable[Finding]) -> dict[str, int]:
    """{summary label: number of findings}, in nbank's order."""
    counts = Counter(f.kind for f in findings)
    return {label: sum(counts[k] for k in kinds) for label, kinds in SUMMARY}


class FileStat(NamedTuple):
    """What decides whether a stored resource changed: size, mtime, inode and ctime.

    For a folder resource: the total size of its files, the newest mtime of
    anything in it, the folder's inode and the newest ctime of anything in it.
    (Named tuples: an audit makes 100k.) The ctime catches a writer that puts the
    mtime back (except where the filesystem reports the mtime as the ctime, as SSHFS
    does: :data:`~nbankd.audit.walk.STAT_BLIND`), and is what tells a file just placed
    by a transfer (tape import, ``nbank``) from an old one.
    """

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int = 0


class CacheEntry(NamedTuple):
    """The audit cache's memory of one resource: its stat, the SHA-1 read then, when,
    and by which run (so a resumed run knows what it already read)."""

    name: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    sha1: str
    verified_at: float
    run_id: str = ""

    @property
    def stat(self) -> FileStat:
        return FileStat(self.size, self.mtime_ns, self.inode, self.ctime_ns)


# archive states in a report
CHECKED = "checked"  # walked and compared with the registry
UNAVAILABLE = "unavailable"  # configured here but could not be read (unmounted?)


@dataclass(frozen=True)
class ArchiveResult:
    """The audit of one archive."""

    name: str
    path: str
    state: str = CHECKED
    error: str | None = None
    #: the error's code (``registry-unavailable``, ``not-an-archive``...), when there is one
    error_code: str | None = None
    registered_before: int = 0
    registered_after: int = 0
    stored: int = 0
    hashed: int = 0
    bytes_hashed: int = 0
    skipped_in_flight: int = 0
    findings: tuple[Finding, ...] = ()
    #: seconds spent in each phase (listing, walk, hashing...), for benchmarks
    timings: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.findings

    def summary(self) -> str:
        """nbank's summary line for this archive."""
        parts = [f"Resources in registry: {self.registered_after}"]
        parts += [f"{k}: {n}" for k, n in summary_counts(self.findings).items()]
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "state": self.state,
            "error": self.error,
            "error_code": self.error_code,
            "ok": self.ok,
            "registered_before": self.registered_before,
            "registered_after": self.registered_after,
            "resources_in_registry": self.registered_after,
            "stored": self.stored,
            "hashed": self.hashed,
            "bytes_hashed": self.bytes_hashed,
            "skipped_in_flight": self.skipped_in_flight,
            "counts": summary_counts(self.findings),
            "findings": [f.to_json() for f in self.findings],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ArchiveResult:
        return cls(
            name=str(d["name"]),
            path=str(d.get("path", "")),
            state=str(d.get("state", CHECKED)),
            error=d.get("error"),
            error_code=d.get("error_code"),
            registered_before=int(d.get("registered_before", 0)),
            registered_after=int(d.get("registered_after", 0)),
            stored=int(d.get("stored", 0)),
            hashed=int(d.get("hashed", 0)),
            bytes_hashed=int(d.get("bytes_hashed", 0)),
            skipped_in_flight=int(d.get("skipped_in_flight", 0)),
            findings=tuple(Finding.from_json(f) for f in d.get("findings", ())),
            timings={str(k): float(v) for k, v in (d.get("timings") or {}).items()},
        )


@dataclass(frozen=True)
class OfflineArchive:
    """An archive the registry knows but this audit does not read (tape, elsewhere)."""

    name: str
    scheme: str
    root: str
    accessibility: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "scheme": self.scheme,
            "root": self.root,
            "accessibility": self.accessibility,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OfflineArchive:
        name, scheme, root, accessibility, reason = (
            str(d.get(k, "")) for k in ("name", "scheme", "root", "accessibility", "reason")
        )
        return cls(name, scheme, root, accessibility, reason)


@dataclass(frozen=True)
class AuditReport:
    """One audit run over every configured archive."""

    id: str
    started: float
    finished: float | None = None
    full: bool = False
    trigger: str = "request"  # schedule, request or resume
    resumed: bool = False
    error: str | None = None
    error_code: str | None = None
    archives: tuple[ArchiveResult, ...] = ()
    not_audited: tuple[OfflineArchive, ...] = ()
    #: registry-wide findings: resources no archive holds (``nbank registry check``)
    registry_findings: tuple[Finding, ...] = ()
    report_path: str | None = field(default=None, compare=False)

    @property
    def findings(self) -> int:
        return sum(len(a.findings) for a in self.archives) + len(self.registry_findings)

    @property
    def ok(self) -> bool:
        return (
            self.error is None and not self.registry_findings and all(a.ok for a in self.archives)
        )

    @property
    def problem_count(self) -> int:
        """Findings plus errors (the report's, and each archive's that could not be checked)."""
        errors = sum(1 for a in self.archives if a.error is not None)
        return self.findings + errors + (self.error is not None)

    def error_codes(self) -> set[str | None]:
        """The codes of every error in the report (None for an error without one)."""
        codes = {a.error_code for a in self.archives if a.error is not None}
        return codes | ({self.error_code} if self.error is not None else set())

    def registry_outage(self) -> bool:
        """True when nothing was found and every error is the registry being unreachable
        (nbankctl then exits 3, not 1)."""
        codes = self.error_codes()
        return not self.findings and bool(codes) and codes <= REGISTRY_OUTAGE_CODES

    def counts(self) -> dict[str, int]:
        counts = summary_counts(f for a in self.archives for f in a.findings)
        if self.registry_findings:
            counts[NO_LOCATION] = len(self.registry_findings)
        return counts

    def problems(self) -> list[str]:
        """One line per thing that is wrong (for status and logs)."""
        out = [] if self.error is None else [f"audit failed: {self.error}"]
        for a in self.archives:
            if a.error is not None:
                out.append(f"archive {a.name}: {a.error}")
            if a.findings:
                out.append(f"archive {a.name}: {len(a.findings)} finding(s)")
        if self.registry_findings:
            out.append(f"registry: {len(self.registry_findings)} resource(s) with no location")
        return out

    def summary_json(self) -> dict[str, Any]:
        """What ``status`` shows of the last audit."""
        return {
            "id": self.id,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "full": self.full,
            "trigger": self.trigger,
            "ok": self.ok,
            "findings": self.findings,
            "problem_count": self.problem_count,
            "counts": self.counts(),
            "error": self.error,
            "error_code": self.error_code,
            "problems": self.problems(),
            "report": self.report_path,
        }

    def to_json(self) -> dict[str, Any]:
        seconds = None if self.finished is None else round(self.finished - self.started, 3)
        return {
            "id": self.id,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "seconds": seconds,
            "full": self.full,
            "trigger": self.trigger,
            "resumed": self.resumed,
            "ok": self.ok,
            "error": self.error,
            "error_code": self.error_code,
            "registry_outage": self.registry_outage(),
            "findings": self.findings,
            "problem_count": self.problem_count,
            "counts": self.counts(),
            "archives": [a.to_json() for a in self.archives],
            "not_audited": [o.to_json() for o in self.not_audited],
            "registry_findings": [f.to_json() for f in self.registry_findings],
            "report": self.report_path,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditReport:
        started = from_iso(d.get("started"))
        return cls(
            id=str(d["id"]),
            started=started if started is not None else 0.0,
            finished=from_iso(d.get("finished")),
            full=bool(d.get("full", False)),
            trigger=str(d.get("trigger", "request")),
            resumed=bool(d.get("resumed", False)),
            error=d.get("error"),
            error_code=d.get("error_code"),
            archives=tuple(ArchiveResult.from_json(a) for a in d.get("archives", ())),
            not_audited=tuple(OfflineArchive.from_json(o) for o in d.get("not_audited", ())),
            registry_findings=tuple(Finding.from_json(f) for f in d.get("registry_findings", ())),
            report_path=d.get("report"),
        )


def findings_of(results: Sequence[ArchiveResult]) -> list[tuple[str, Finding]]:
    """(archive name, finding) for every finding, in report order."""
    return [(a.name, f) for a in results for f in a.findings]


def young(age_from: float, *, now: float, grace: float) -> bool:
    """True if something last changed at ``age_from`` (mtime or ctime, whichever is
    newer) within ``grace`` seconds: a transfer (another host's daemon, ``nbank``, a
    tape import) may be placing it right now, so it is not reported yet."""
    return now - age_from < grace


__all__ = [
    "CHANGED_ELSEWHERE",
    "CHECKED",
    "HASH_MISMATCH",
    "INCOMPLETE",
    "KINDS",
    "MISPLACED",
    "MISSING_FROM_ARCHIVE",
    "MISSING_FROM_REGISTRY",
    "NO_LOCATION",
    "PERMISSION",
    "REGISTERED_ELSEWHERE",
    "REGISTRY_OUTAGE_CODES",
    "SUMMARY",
    "UNAVAILABLE",
    "UNEXPECTED",
    "UNREADABLE",
    "ArchiveResult",
    "AuditReport",
    "CacheEntry",
    "FileStat",
    "Finding",
    "OfflineArchive",
    "findings_of",
    "iso",
    "summary_counts",
    "young",
]
