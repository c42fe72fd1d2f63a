"""Helpers of the audit tests: an embedded registry and an archive of registered resources."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fixtures.cli_backends import sha1, store
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.audit.settings import AuditTarget
from nbankd.registry.embedded import EmbeddedRegistry


@dataclass
class Setup:
    registry: EmbeddedRegistry
    archive: Archive
    target: AuditTarget
    names: list[str]
    state: Path


def make_setup(root: Path, n: int = 12, **archive_options: object) -> Setup:
    """An embedded registry under ``root/state`` and an archive ``root/arch`` holding
    ``n`` registered resources named res000, res001..."""
    state = root / "state"
    registry = EmbeddedRegistry(state / "registry.sqlite3")
    registry.add_datatype("dat", "application/octet-stream")
    archive = create_archive(root / "arch", registry.url, **archive_options)  # type: ignore[arg-type]
    registry.add_archive("arch", "neurobank", str(archive.path))
    names = []
    for i in range(n):
        data = f"resource number {i}".encode() * 100
        name = f"res{i:03d}"
        registry.add_resource(dtype="dat", archive="arch", name=name, sha1=sha1(data))
        store(archive, name, data)
        names.append(name)
    return Setup(registry, archive, AuditTarget("arch", archive.path), names, state)
