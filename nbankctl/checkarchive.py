"""Comparing a neurobank archive on disk with the registry (``nbankctl archive check``).

Finds, as ``nbank archive check`` does: resources registered to the archive but
missing from it, files in it that the registry does not place there (missing from
the registry, or registered elsewhere, compared with the registered SHA-1 when
hashing), SHA-1 mismatches (every stored resource is read and hashed unless
``--no-hash`` is given, as nbank does: a check that skips the bytes would pass
silent corruption; several readers at once),
resources in the wrong stub folder, owners, groups and modes that break the
archive's policy, unexpected entries under ``resources/`` and leftovers in
``staging/``. It walks and judges with the daemon's audit code. Read-only: it never
changes the archive or the registry (nor even access times), except that
``--fix`` moves resources filed in the wrong stub folder where they belong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.audit.compare import by_name, elsewhere, misplaced, staging_finding, walk_findings
from nbankd.audit.model import (
    HASH_MISMATCH,
    MISPLACED,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    SUMMARY,
    UNREADABLE,
    Finding,
)
from nbankd.audit.reader import sha1_of_resource, vanished
from nbankd.audit.walk import Stored, walk_archive
from nbankd.registry.base import Registry, ResourceRecord

#: resources read and hashed at once (SHA-1 and reads release the GIL)
READERS = 4


@dataclass
class Report:
    archive: str
    path: Path
    n_registered: int = 0
    n_stored: int = 0
    findings: list[Finding] = field(default_factory=list)
    hashed: bool = True
    passed: list[tuple[str, Path]] = field(default_factory=list)  # registered, stored, ok

    @property
    def ok(self) -> bool:
        return not self.findings

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.findings)

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"Resources in registry: {self.n_registered}"]
        parts += [f"{label}: {sum(counts[k] for k in kinds)}" for label, kinds in SUMMARY]
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "archive": self.archive,
            "path": str(self.path),
            "resources_in_registry": self.n_registered,
            "resources_stored": self.n_stored,
            "ok": self.ok,
            "hashed": self.hashed,
            "counts": {label: sum(self.counts()[k] for k in kinds) for label, kinds in SUMMARY},
            "findings": [f.to_json() for f in self.findings],
        }


def _no_throttle(_n: int) -> None:
    """Reads at full speed: the user asked for this check and is waiting for it."""


def _sha1(stored: Stored) -> str:
    return sha1_of_resource(stored.path, _no_throttle, is_dir=stored.is_dir)[0]


def check_archive(
    archive: Archive,
    registry: Registry,
    archive_name: str,
    *,
    check_hash: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compares ``archive`` (registered as ``archive_name``) with the registry.

    The walk and the judgement are the daemon audit's (:mod:`nbankd.audit.walk`,
    :mod:`nbankd.audit.compare`), without its grace: like ``nbank archive check``,
    every partial transfer and every ``staging/`` entry is reported.
    """
    report = Report(archive_name, archive.path)
    expected: dict[str, ResourceRecord] = {
        r.name: r for r in registry.search(archive=archive_name) if archive_name in r.locations
    }
    report.n_registered = len(expected)
    walk = walk_archive(archive)
    report.n_stored = len(walk.stored)
    findings = walk_findings(walk)
    placed, lookup = misplaced(walk, expected)
    findings += placed
    to_hash: list[tuple[Stored, str]] = []
    kept: list[Stored] = []
    for name, stored in sorted(walk.stored.items()):
        record = expected.get(name)
        if record is None:
            lookup.append(stored)
            continue
        kept.append(stored)
        if check_hash and record.sha1:
            to_hash.append((stored, record.sha1.lower()))
    with ThreadPoolExecutor(READERS, thread_name_prefix="nbankctl-check") as pool:
        results = list(pool.map(lambda job: _verify(*job, progress), to_hash))
    bad = {f.resource for found in results for f in found}
    for found in results:
        findings += found
    report.hashed = check_hash
    report.passed = [(s.name, Path(s.path)) for s in kept if s.name not in bad]
    for name in sorted(set(expected) - set(walk.stored) - set(walk.misplaced)):
        if walk.complete(name):  # else its stub folder could not be listed: reported
            findings.append(Finding(MISSING_FROM_ARCHIVE, name, None))
    if lookup:
        known = by_name(registry.get_resources(s.name for s in lookup))
        for stored in lookup:
            found = known.get(stored.name)
            if found is None:
                findings.append(Finding(MISSING_FROM_REGISTRY, stored.name, stored.path))
            elif archive_name not in found.locations:
                finding = elsewhere(found, stored, _sha1 if check_hash else None)
                findings += [finding] if finding is not None else []
    findings += [staging_finding(archive.staging_dir / name) for name, _ in walk.staging]
    report.findings = findings
    return report


def fix_misplaced(archive: Archive, report: Report) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Moves each registered resource the report found in the wrong stub folder to
    where its identifier belongs (:func:`nbankd.archive.durable.refile`); returns the
    moves made and why the others were not made (the identifier is also stored where
    it belongs, for one: both stay and the next check reports them again)."""
    moved: list[tuple[Path, Path]] = []
    refused: list[str] = []
    for finding in report.findings:
        if finding.kind != MISPLACED or finding.path is None or finding.resource is None:
            continue
        try:
            moved.append((finding.path, durable.refile(archive, finding.path, finding.resource)))
        except errors.ArchiveError as err:
            refused.append(str(err))
    return moved, refused


def _verify(stored: Stored, want: str, progress: Callable[[str], None] | None) -> list[Finding]:
    if progress is not None:
        progress(stored.name)
    try:
        actual = _sha1(stored)
    except OSError as err:
        if vanished(err):
            return []
        return [Finding(UNREADABLE, stored.name, stored.path, err.strerror or str(err))]
    if actual != want:
        return [
            Finding(HASH_MISMATCH, stored.name, stored.path, f"sha1 {actual}, registered {want}")
        ]
    return []


__all__ = ["Finding", "Report", "check_archive", "fix_misplaced"]
