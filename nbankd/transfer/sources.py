"""Which copy of each resource to read: the registry's record and its locations, and the
first stored copy on this host that can be read (as ``nbank``'s ``find_sources``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nbankd import errors
from nbankd.archive.opening import open_archive
from nbankd.registry.base import LocationRecord, Registry, ResourceRecord


@dataclass(frozen=True)
class Source:
    """A requested resource: its record, its locations, and a readable copy here.

    ``path`` and ``archive`` name the copy; when there is none they are None and
    ``error`` says why.
    """

    id: str
    record: ResourceRecord | None = None
    locations: tuple[LocationRecord, ...] = ()
    path: Path | None = None
    archive: str | None = None
    error: str | None = None

    @property
    def sha1(self) -> str | None:
        return None if self.record is None else self.record.sha1

    @property
    def ok(self) -> bool:
        return self.path is not None


def stored_copy(loc: LocationRecord) -> Path | None:
    """The stored copy of a neurobank location when its archive is on this host."""
    if loc.scheme != "neurobank" or not os.path.isdir(loc.root):
        return None
    try:
        return open_archive(loc.root).stored_path(loc.resource_name)
    except errors.NbankdError:
        return None


def _unreadable(path: Path) -> bool:
    flags = os.R_OK | (os.X_OK if path.is_dir() else 0)
    return not os.access(path, flags)


def _pick(id: str, record: ResourceRecord, locations: list[LocationRecord]) -> Source:
    error = "no copy on this host"
    for loc in locations:
        path = stored_copy(loc)
        if path is None:
            continue
        if _unreadable(path):
            error = f"'{path}' is not readable"
            continue
        return Source(id, record, tuple(locations), path, loc.archive_name)
    return Source(id, record, tuple(locations), error=error)


def find_sources(
    registry: Registry, ids: Iterable[str], *, archive: str | None = None
) -> list[Source]:
    """A :class:`Source` for each distinct id, in order; with ``archive``, only copies
    in that archive count. Hashes are not checked here."""
    wanted = list(dict.fromkeys(ids))
    records = {r.name: r for r in registry.get_resources(wanted)}
    located = registry.get_locations_bulk([id for id in wanted if id in records])
    out: list[Source] = []
    for id in wanted:
        record = records.get(id)
        if record is None:
            out.append(Source(id, error="not in the registry"))
            continue
        locations = located.get(id, [])
        if archive is not None:
            locations = [loc for loc in locations if loc.archive_name == archive]
            if not locations:
                out.append(Source(id, record, error=f"not in archive '{archive}'"))
                continue
        if not locations:
            out.append(Source(id, record, error="has no locations"))
            continue
        out.append(_pick(id, record, locations))
    return out


__all__ = ["Source", "find_sources", "stored_copy"]
