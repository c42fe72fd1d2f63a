"""Comparing a neurobank archive on disk with the registry (``nbankctl archive check``).

Finds, as ``nbank archive check`` does: resources registered to the archive but
missing from it, files in it that the registry does not place there (missing from
the registry, or registered elsewhere), SHA-1 mismatches (only when asked: hashing
a large archive takes long), owners, groups and modes that break the archive's
policy, unexpected entries under ``resources/`` and leftovers in ``staging/``.
Read-only: it never changes the archive or the registry.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nbankd.archive.layout import Anomaly, Archive
from nbankd.audit.checks import permission_findings
from nbankd.audit.model import (
    HASH_MISMATCH,
    INCOMPLETE,
    MISSING_FROM_ARCHIVE,
    MISSING_FROM_REGISTRY,
    REGISTERED_ELSEWHERE,
    SUMMARY,
    UNEXPECTED,
    UNREADABLE,
    Finding,
)
from nbankd.hashing import hash_path
from nbankd.registry.base import Registry, ResourceRecord


@dataclass
class Report:
    archive: str
    path: Path
    n_registered: int = 0
    n_stored: int = 0
    findings: list[Finding] = field(default_factory=list)

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
            "counts": {label: sum(self.counts()[k] for k in kinds) for label, kinds in SUMMARY},
            "findings": [f.to_json() for f in self.findings],
        }


def _tree(root: Path) -> Iterator[Path]:
    """root, then everything inside it if it is a folder; links are not followed."""
    yield root
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                yield Path(dirpath, name)


def _check_permissions(archive: Archive, stored: list[tuple[str, Path]]) -> Iterator[Finding]:
    tops = [archive.resources_dir, archive.staging_dir]
    tops += sorted({p.parent for _, p in stored})
    for path in tops:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if path == archive.staging_dir:
                yield Finding(UNEXPECTED, None, path, "staging/ is missing; run nbankctl init?")
            continue
        yield from permission_findings(archive, path, st)
    for _id, root in stored:
        for path in _tree(root):
            try:
                st = os.lstat(path)
            except OSError as err:
                yield Finding(UNREADABLE, None, path, err.strerror or str(err))
                continue
            if stat.S_ISLNK(st.st_mode):
                yield Finding(UNEXPECTED, None, path, "symbolic link inside a resource")
                continue
            yield from permission_findings(archive, path, st)


def _staging_leftovers(archive: Archive) -> Iterator[Finding]:
    try:
        names = sorted(os.listdir(archive.staging_dir))
    except FileNotFoundError:
        return
    except OSError as err:
        yield Finding(UNREADABLE, None, archive.staging_dir, err.strerror or str(err))
        return
    for name in names:
        yield Finding(
            INCOMPLETE,
            None,
            archive.staging_dir / name,
            "left in staging/ by an interrupted transfer; safe to delete",
        )


def check_archive(
    archive: Archive,
    registry: Registry,
    archive_name: str,
    *,
    check_hash: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compares ``archive`` (registered as ``archive_name``) with the registry."""
    report = Report(archive_name, archive.path)
    expected: dict[str, ResourceRecord] = {
        r.name: r for r in registry.search(archive=archive_name) if archive_name in r.locations
    }
    report.n_registered = len(expected)
    anomalies: list[Anomaly] = []
    stored: list[tuple[str, Path]] = []
    seen: dict[str, Path] = {}
    for id, path in archive.iter_resources(anomalies):
        if id in seen:
            report.findings.append(
                Finding(UNEXPECTED, id, path, f"a second copy of {id} (also {seen[id].name})")
            )
            continue
        seen[id] = path
        stored.append((id, path))
    report.n_stored = len(stored)
    for anomaly in anomalies:
        kind = INCOMPLETE if "incomplete" in anomaly.reason else UNEXPECTED
        report.findings.append(Finding(kind, None, anomaly.path, anomaly.reason))
    unregistered: list[tuple[str, Path]] = []
    for id, path in stored:
        record = expected.get(id)
        if record is None:
            unregistered.append((id, path))
            continue
        if check_hash and record.sha1:
            if progress is not None:
                progress(id)
            try:
                actual = hash_path(path)
            except OSError as err:
                report.findings.append(Finding(UNREADABLE, id, path, err.strerror or str(err)))
                continue
            if actual != record.sha1.lower():
                report.findings.append(
                    Finding(HASH_MISMATCH, id, path, f"sha1 {actual}, registered {record.sha1}")
                )
    for id in sorted(set(expected) - set(seen)):
        report.findings.append(Finding(MISSING_FROM_ARCHIVE, id, None))
    if unregistered:
        known = {r.name: r for r in registry.get_resources(id for id, _ in unregistered)}
        for id, path in unregistered:
            record = known.get(id)
            if record is None:
                report.findings.append(Finding(MISSING_FROM_REGISTRY, id, path))
            else:
                where = ", ".join(record.locations) or "no archive"
                report.findings.append(
                    Finding(REGISTERED_ELSEWHERE, id, path, f"registered in {where}")
                )
    report.findings.extend(_check_permissions(archive, stored))
    report.findings.extend(_staging_leftovers(archive))
    return report


__all__ = ["Finding", "Report", "check_archive"]
