"""What the registry says an archive holds, listed in bulk.

An audit lists an archive's resources once, beside its walk (after the walk it
asks only about the names where walk and listing disagree), so listing must be
cheap for 100k resources:

- the embedded registry: one SQL query over its database file, in one read
  transaction (a consistent snapshot), returning only names and hashes;
- django-neurobank: ``resources/?archive=NAME`` pages fetched concurrently
  (:meth:`~nbankd.registry.http.HttpRegistry.search_pages`);
- anything else: :meth:`~nbankd.registry.base.Registry.search`.

No per-resource requests. The registry is never written.

:func:`without_location` lists the resources no archive holds (``nbank registry
check``'s "has NO locations"), with one query.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from nbankd.audit.model import OfflineArchive
from nbankd.registry.base import ArchiveRecord, Registry, ResourceRecord

if TYPE_CHECKING:  # loaded with the embedded registry itself: an HTTP check never needs it
    from nbankd.registry.embedded import EmbeddedRegistry

PAGE_WORKERS = 4
_EMBEDDED_LISTING = (
    "SELECT r.name, r.sha1 FROM location l JOIN archive a ON a.id = l.archive_id"
    " JOIN resource r ON r.id = l.resource_id WHERE a.name = ?"
)


def _embedded(registry: EmbeddedRegistry, archive: str) -> dict[str, str | None]:
    rows = registry.query(_EMBEDDED_LISTING, (archive,))
    return {name: sha1.lower() if sha1 else None for name, sha1 in rows}


_WITHOUT_LOCATION = (
    "SELECT r.name FROM resource r"
    " WHERE NOT EXISTS (SELECT 1 FROM location l WHERE l.resource_id = r.id)"
)


def _embedded_registry(registry: Registry) -> EmbeddedRegistry | None:
    """``registry`` if it is the embedded one."""
    if registry.backend != "embedded":
        return None
    from nbankd.registry.embedded import EmbeddedRegistry

    return registry if isinstance(registry, EmbeddedRegistry) else None


def without_location(registry: Registry) -> set[str] | None:
    """Names of the registry's resources that no archive holds; None when the registry
    does not filter on ``has_location`` (an older server answers with everything:
    a record with a location in the answer gives that away). Raises the registry's
    errors."""
    embedded = _embedded_registry(registry)
    if embedded is not None:
        return {name for (name,) in embedded.query(_WITHOUT_LOCATION)}
    out = set()
    for record in registry.search(has_location="false"):
        if record.locations:
            return None
        out.add(record.name)
    return out


def _records(records: Iterable[ResourceRecord], archive: str) -> dict[str, str | None]:
    return {r.name: r.sha1.lower() if r.sha1 else None for r in records if archive in r.locations}


def list_registered(
    registry: Registry, archive: str, *, workers: int = PAGE_WORKERS
) -> dict[str, str | None]:
    """{resource name: registered SHA-1 (lowercase) or None} of every resource located
    in ``archive``. Raises the registry's errors (RegistryUnavailable when it is down)."""
    embedded = _embedded_registry(registry)
    if embedded is not None:
        return _embedded(embedded, archive)
    search_pages = getattr(registry, "search_pages", None)
    if search_pages is not None:
        return _records(search_pages(workers, archive=archive), archive)
    return _records(registry.search(archive=archive), archive)


def not_audited(records: Iterable[ArchiveRecord], audited: Iterable[str]) -> list[OfflineArchive]:
    """The registry's archives this daemon does not read, each with the reason."""
    mine = set(audited)
    out = []
    for a in sorted(records, key=lambda a: a.name):
        if a.name in mine:
            continue
        if a.accessibility == "offline" or a.scheme != "neurobank":
            reason = f"{a.accessibility} {a.scheme} archive: listed, not read"
        else:
            reason = "not configured in this daemon"
        out.append(OfflineArchive(a.name, a.scheme, a.root, a.accessibility, reason))
    return out


__all__ = ["list_registered", "not_audited", "without_location"]
