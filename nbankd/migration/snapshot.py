"""A registry's whole content as frozen records, and the export file that carries it.

The export file is JSON lines: a ``header`` line (format, version, source registry,
time), then one line per ``datatype``, ``archive``, ``resource`` and ``location``, in
that order, and an ``end`` line with the count of each. Reading checks every line
and refuses a file without its ``end`` line (a truncated copy), so an import never
acts on part of an export believing it is the whole.

A resource line keeps what django-neurobank lets a client set (name, sha1, dtype,
metadata with ``experimenter`` and ``animal``) and, for the record, the original
``created_on`` and ``created_by``, which a server sets itself on import.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from nbankd import __version__, errors
from nbankd.archive.fsops import write_atomic
from nbankd.names import is_utf8
from nbankd.registry.base import (
    SHA1_RE,
    SLUG_RE,
    ArchiveRecord,
    DataType,
    LocationRecord,
    Registry,
    ResourceRecord,
    unstorable_metadata,
)
from nbankd.timefmt import iso

FORMAT = "nbankd-registry-export"
VERSION = 1
KINDS = ("datatype", "archive", "resource", "location")
#: how many times :func:`take` lists a registry's resources, at most (see _list_resources)
LISTINGS = 5

#: called with the number of records just read from a registry
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Snapshot:
    """Everything one registry holds. ``resources`` carry no ``locations``: see ``locations``."""

    source: str
    backend: str
    datatypes: tuple[DataType, ...] = ()
    archives: tuple[ArchiveRecord, ...] = ()
    resources: tuple[ResourceRecord, ...] = ()
    locations: tuple[LocationRecord, ...] = ()
    exported_at: str = ""

    def counts(self) -> dict[str, int]:
        return {
            "datatype": len(self.datatypes),
            "archive": len(self.archives),
            "resource": len(self.resources),
            "location": len(self.locations),
        }

    def locations_of(self) -> dict[str, list[LocationRecord]]:
        """{resource name: its locations, in export order}."""
        out: dict[str, list[LocationRecord]] = {}
        for loc in self.locations:
            out.setdefault(loc.resource_name, []).append(loc)
        return out


def _created_key(record: ResourceRecord) -> tuple[datetime, str]:
    try:
        when = datetime.fromisoformat(record.created_on or "")
    except ValueError:
        when = datetime.min
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when, record.name


def take(registry: Registry, *, advance: Advance | None = None) -> Snapshot:
    """Reads every record of ``registry``: resources oldest first, then by name.

    A location in an archive the registry does not list (django-neurobank's virtual
    ``registry`` download location) is left out.
    """
    step = advance or (lambda _n: None)
    datatypes = tuple(registry.list_datatypes())
    archives = tuple(registry.list_archives())
    step(len(datatypes) + len(archives))
    resources = _list_resources(registry, step)
    resources.sort(key=_created_key)
    known = {(a.name, a.scheme, a.root) for a in archives}
    located = registry.get_locations_bulk(r.name for r in resources if r.locations)
    locations = tuple(
        loc
        for r in resources
        for loc in located.get(r.name, ())
        if (loc.archive_name, loc.scheme, loc.root) in known
    )
    return Snapshot(
        source=registry.url,
        backend=registry.backend,
        datatypes=datatypes,
        archives=archives,
        resources=tuple(_bare(r) for r in resources),
        locations=locations,
        exported_at=iso(time.time()),
    )


def _list_resources(registry: Registry, step: Advance) -> list[ResourceRecord]:
    """Every resource of ``registry``, listed until no listing can have skipped one.

    A server lists resources page by page, by page number: a record deleted by someone
    else during a listing shifts the later pages, so one record that was there all along
    falls between two pages. So the listing is repeated until one holds every record of
    the listing before it (records created meanwhile are welcome; a record deleted
    meanwhile makes another round), at most ``LISTINGS`` times; a record listed twice
    (pages shifted by a record created meanwhile) is kept once.
    """
    previous: dict[str, ResourceRecord] | None = None
    missing: list[str] = []
    for n in range(LISTINGS):
        listing: dict[str, ResourceRecord] = {}
        for record in registry.search():
            listing[record.name] = record
            if n == 0:
                step(1)
        if previous is not None:
            missing = sorted(previous.keys() - listing.keys())
            if not missing:
                return list(listing.values())
        previous = listing
    shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
    raise errors.RegistryError(
        f"the resources of {registry.url} kept changing while they were listed ({LISTINGS} "
        f"listings; {len(missing)} record(s) gone between the last two, such as {shown}): "
        "a listing by pages may have skipped records, so nothing was exported",
        hint="export again when no one deletes records from that registry",
    )


def _bare(record: ResourceRecord) -> ResourceRecord:
    """The record without its archive names (kept as location lines instead)."""
    return ResourceRecord(
        name=record.name,
        sha1=record.sha1.lower() if record.sha1 else record.sha1,
        dtype=record.dtype,
        experimenter=record.experimenter,
        animal=record.animal,
        created_by=record.created_by,
        created_on=record.created_on,
        metadata_json=record.metadata_json,
    )


# --- what changed since an earlier snapshot ------------------------------------------


@dataclass(frozen=True)
class Changes:
    """What a registry holds that an earlier snapshot of it did not (:func:`changes`).

    ``snapshot`` holds the new or changed datatypes, archives, resources and locations,
    plus the archives of its locations and the resources of its locations (so that an
    import can place them); ``moved`` names those resources that are there only for a
    location, unchanged since the earlier snapshot.
    """

    snapshot: Snapshot
    moved: frozenset[str]

    @property
    def empty(self) -> bool:
        return not any(self.snapshot.counts().values())


def _same(record: DataType | ArchiveRecord | LocationRecord) -> str:
    return json.dumps(record.to_json(), sort_keys=True)


def _same_resource(record: ResourceRecord) -> str:
    """What an import sends for a resource (the creation time and user are the server's)."""
    line = resource_line(record)
    del line["created_on"], line["created_by"]
    return json.dumps(line, sort_keys=True)


def changes(current: Snapshot, earlier: Snapshot) -> Changes:
    """What ``current`` holds that ``earlier`` (of the same registry) did not: records
    added or changed since. Records deleted since are not in it (an import never
    deletes), nor anything unchanged, which an import must not bring back."""
    datatypes = {_same(d) for d in earlier.datatypes}
    archives = {_same(a) for a in earlier.archives}
    resources = {_same_resource(r) for r in earlier.resources}
    locations_seen = {_same(loc) for loc in earlier.locations}
    locations = tuple(loc for loc in current.locations if _same(loc) not in locations_seen)
    changed = {r.name for r in current.resources if _same_resource(r) not in resources}
    moved = {loc.resource_name for loc in locations} - changed
    used = {loc.archive_name for loc in locations}
    return Changes(
        Snapshot(
            source=current.source,
            backend=current.backend,
            datatypes=tuple(d for d in current.datatypes if _same(d) not in datatypes),
            archives=tuple(
                a for a in current.archives if _same(a) not in archives or a.name in used
            ),
            resources=tuple(r for r in current.resources if r.name in changed | moved),
            locations=locations,
            exported_at=current.exported_at,
        ),
        frozenset(moved),
    )


# --- writing -------------------------------------------------------------------------


#: characters some readers take for the end of a line (within JSON text only in strings)
_LINE_BREAKS = ("\x85", "\u2028", "\u2029")


def unstorable(snap: Snapshot) -> list[str]:
    """A message per resource of ``snap`` that no registry can be given again (see
    :func:`~nbankd.registry.base.unstorable_metadata`), naming it and the key: an import
    reports the same resources, blocked, with the same words."""
    out = []
    for r in snap.resources:
        why = unstorable_metadata(r.metadata)
        if why:
            out.append(unstorable_message(r.name, why))
    return out


def unstorable_message(name: str, why: str) -> str:
    return f"resource {name!r}: {why}; it cannot be created again"


def resource_line(record: ResourceRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "sha1": record.sha1,
        "dtype": record.dtype,
        "metadata": record.metadata,
        "experimenter": record.experimenter,
        "animal": record.animal,
        "created_on": record.created_on,
        "created_by": record.created_by,
    }


def lines(snapshot: Snapshot) -> Iterator[str]:
    """The export file, one JSON text per line (without newlines)."""

    def line(kind: str, body: Mapping[str, Any]) -> str:
        text = json.dumps({"type": kind, **body}, sort_keys=True, ensure_ascii=False)
        if is_utf8(text):
            # what other readers split lines at, too (str.splitlines, JavaScript), escaped
            for ch in _LINE_BREAKS:
                text = text.replace(ch, f"\\u{ord(ch):04x}")
            return text
        # a lone surrogate held by the registry: kept as a \u escape, so the file stays
        # UTF-8 and reads back as the same value (which the import then reports)
        return json.dumps({"type": kind, **body}, sort_keys=True, ensure_ascii=True)

    yield line(
        "header",
        {
            "format": FORMAT,
            "version": VERSION,
            "source": snapshot.source,
            "backend": snapshot.backend,
            "exported_at": snapshot.exported_at,
            "nbankd": __version__,
        },
    )
    for d in snapshot.datatypes:
        yield line("datatype", d.to_json())
    for a in snapshot.archives:
        yield line("archive", a.to_json())
    for r in snapshot.resources:
        yield line("resource", resource_line(r))
    for loc in snapshot.locations:
        yield line("location", loc.to_json())
    yield line("end", {"counts": snapshot.counts()})


def write(snapshot: Snapshot, out: IO[str]) -> None:
    for text in lines(snapshot):
        out.write(text + "\n")


def save(
    snapshot: Snapshot,
    path: Path,
    *,
    mode: int = 0o640,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
) -> None:
    """Writes the export file durably (temp file, fsync, rename); never half a file.

    With ``replace=False`` an existing file is never replaced (FileExistsError).
    Raises OSError (the caller names the path and what to do).
    """
    text = "".join(line + "\n" for line in lines(snapshot))
    write_atomic(Path(path), text.encode("utf-8"), mode=mode, owner=owner, replace=replace)


# --- reading -------------------------------------------------------------------------


class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where
        self.lineno = 0

    def bad(self, why: str, hint: str = "") -> errors.UsageError:
        return errors.UsageError(
            f"{self.where}:{self.lineno}: {why}",
            hint=hint or "give a file written by 'nbankctl registry export'",
        )

    def text(self, body: Mapping[str, Any], key: str, *, slug: bool = False) -> str:
        value = body.get(key)
        if not isinstance(value, str) or not value:
            raise self.bad(f"'{key}' is missing or not a string")
        if slug and not SLUG_RE.match(value):
            raise self.bad(f"'{key}' {value!r} is not a valid registry name")
        return value

    def optional(self, body: Mapping[str, Any], key: str) -> str | None:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise self.bad(f"'{key}' is not a string")
        return value

    def resource(self, body: Mapping[str, Any]) -> ResourceRecord:
        sha1 = self.optional(body, "sha1")
        if sha1 is not None and not SHA1_RE.match(sha1):
            raise self.bad(f"'sha1' {sha1!r} is not a SHA-1")
        # any JSON value, as the export writes what the registry held (an administrator
        # may have stored a list); the import's plan says what cannot be created again
        metadata = body.get("metadata")
        return ResourceRecord(
            name=self.text(body, "name", slug=True),
            sha1=sha1.lower() if sha1 else None,
            dtype=self.text(body, "dtype", slug=True),
            experimenter=self.optional(body, "experimenter"),
            animal=self.optional(body, "animal"),
            created_on=self.optional(body, "created_on"),
            created_by=self.optional(body, "created_by"),
            metadata_json=None if metadata is None else json.dumps(metadata, sort_keys=True),
        )

    def location(self, body: Mapping[str, Any]) -> LocationRecord:
        return LocationRecord(
            archive_name=self.text(body, "archive_name", slug=True),
            scheme=self.text(body, "scheme"),
            root=self.text(body, "root"),
            resource_name=self.text(body, "resource_name", slug=True),
            key=self.optional(body, "key") or None,
        )


def read(stream: Iterable[str], where: str) -> Snapshot:
    """Parses an export file; UsageError naming ``where`` and the line for anything wrong."""
    r = _Reader(where)
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    found: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    names: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for raw in stream:
        r.lineno += 1
        if not raw.strip():
            continue
        if end is not None:
            raise r.bad("content after the 'end' line")
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise r.bad(f"not JSON ({err.msg})") from None
        except RecursionError:  # metadata an export warned of, or a crafted line
            raise r.bad(
                "nested too deep to be read (a value of near 1,000 levels), which no "
                "registry stores",
                hint="remove that line's resource from the file (and its location lines), "
                "or replace its metadata with a shallower one",
            ) from None
        if not isinstance(body, dict):
            raise r.bad("not a JSON object")
        kind = body.get("type")
        if header is None:
            if kind != "header" or body.get("format") != FORMAT:
                raise r.bad(f"not an nbankd registry export (no '{FORMAT}' header)")
            version = body.get("version")
            if not isinstance(version, int) or version > VERSION:
                raise r.bad(
                    f"export format version {version!r} is newer than this nbankd reads "
                    f"({VERSION})",
                    hint="import it with the nbankd that exported it, or a newer one",
                )
            header = body
            continue
        try:
            if kind == "datatype":
                found[kind].append(
                    DataType(
                        r.text(body, "name", slug=True),
                        r.optional(body, "content_type") or "",
                        r.optional(body, "extension") or "",
                    )
                )
            elif kind == "archive":
                found[kind].append(
                    ArchiveRecord(
                        r.text(body, "name", slug=True),
                        r.text(body, "scheme"),
                        r.text(body, "root"),
                        r.optional(body, "accessibility") or "local",
                    )
                )
            elif kind == "resource":
                found[kind].append(r.resource(body))
            elif kind == "location":
                found[kind].append(r.location(body))
            elif kind == "end":
                end = body
            else:
                raise r.bad(f"unknown line type {kind!r}")
        except (TypeError, KeyError) as err:
            raise r.bad(f"malformed {kind} line ({err})") from None
        if kind in KINDS:
            _check_line(r, kind, found[kind][-1], names)
    if header is None:
        raise r.bad("the file is empty")
    if end is None:
        raise r.bad(
            "no 'end' line: the export is incomplete (interrupted or truncated)",
            hint="export again with 'nbankctl registry export'",
        )
    counts = {kind: len(found[kind]) for kind in KINDS}
    if end.get("counts") != counts:
        raise r.bad(f"the 'end' line counts {end.get('counts')!r} but the file holds {counts!r}")
    snapshot = Snapshot(
        source=str(header.get("source") or ""),
        backend=str(header.get("backend") or ""),
        datatypes=tuple(found["datatype"]),
        archives=tuple(found["archive"]),
        resources=tuple(found["resource"]),
        locations=tuple(found["location"]),
        exported_at=str(header.get("exported_at") or ""),
    )
    return snapshot


def _check_line(r: _Reader, kind: str, record: Any, names: dict[str, set[str]]) -> None:
    """Refuses a name given twice, and a location naming what the lines above do not."""
    if isinstance(record, LocationRecord):
        if record.resource_name not in names["resource"]:
            raise r.bad(
                f"a location names resource {record.resource_name!r}, which is not exported "
                "above it"
            )
        if record.archive_name not in names["archive"]:
            raise r.bad(
                f"a location names archive {record.archive_name!r}, which is not exported above it"
            )
        name = f"{record.resource_name}@{record.archive_name}"
        if name in names[kind]:
            raise r.bad(
                f"resource {record.resource_name!r} is located in {record.archive_name!r} twice"
            )
    else:
        name = record.name
        if name in names[kind]:
            raise r.bad(f"{kind} {name!r} appears twice")
    names[kind].add(name)


def load(path: str | os.PathLike[str]) -> Snapshot:
    """Reads an export file ('-' for stdin)."""
    import sys

    if str(path) == "-":
        return read(sys.stdin, "<stdin>")
    try:
        with open(path, encoding="utf-8") as f:
            return read(f, str(path))
    except OSError as err:
        raise errors.UsageError(
            f"cannot read the export file {path}: {err.strerror or err}",
            hint="give the path of a file written by 'nbankctl registry export'",
        ) from None
    except UnicodeDecodeError:
        raise errors.UsageError(f"{path} is not UTF-8 text: not an export file") from None
