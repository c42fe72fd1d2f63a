"""The registry interface shared by the HTTP and embedded backends.

Records are small frozen values in django-neurobank's wire vocabulary, so one
backend's output can be fed to the other (``to_json`` gives the wire form).
Both backends raise the typed errors of :mod:`nbankd.errors` for the same causes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from nbankd import errors
from nbankd.names import is_utf8

# the registry's slug rule (Django SlugField); nbank's client also allows "~",
# which the server rejects, so we do not.
SLUG_RE = re.compile(r"\A[-_0-9a-zA-Z]+\Z")
SHA1_RE = re.compile(r"\A[0-9a-fA-F]{40}\Z")
RESOURCE_NAME_MAX = 255
ARCHIVE_NAME_MAX = 32
DATATYPE_NAME_MAX = 32
ACCESSIBILITY = ("local", "remote", "offline")
# fields of a resource that clients may send inside metadata (API 1.2)
CORE_FIELDS = ("experimenter", "animal")


def core_field_as_stored(value: Any) -> str | None:
    """An ``experimenter`` or ``animal`` sent in metadata as the registry keeps it: as
    text (``417`` comes back ``"417"``), with ``""`` and None meaning none (the record
    then has no such key in its metadata)."""
    if value is None or value == "":
        return None
    return str(value)


def metadata_as_stored(sent: Mapping[str, Any], record: Mapping[str, Any] | None) -> bool:
    """True when a record's metadata holds what ``sent`` asked the registry to store:
    every key's value, the core fields compared as :func:`core_field_as_stored`. A key
    the record lacks counts as stored when its value is one of the record's core
    fields: django-neurobank moves the keys its ``NBANK_METADATA_ALIASES`` names
    (``bird`` for ``animal``, say) into those fields, keeping no copy under the key."""
    theirs = record if isinstance(record, Mapping) else {}  # a list holds none of ours
    for key, value in sent.items():
        if key in CORE_FIELDS:
            if theirs.get(key) != core_field_as_stored(value):
                return False
        elif key in theirs:
            if theirs[key] != value:
                return False
        else:
            moved = core_field_as_stored(value)
            if moved is not None and moved not in (theirs.get(f) for f in CORE_FIELDS):
                return False
    return True


#: levels of nesting past which metadata is refused as unstorable: more than any
#: registry's JSON parser is sure to take (Python's, django-neurobank's included, stops
#: near 1,000 levels, less the stack its caller already uses)
METADATA_DEPTH_MAX = 500


class _BadKey:
    """Where :func:`unstorable_metadata` meets a key no registry stores: ``why`` not."""

    def __init__(self, why: str) -> None:
        self.why = why


#: why no registry is given a NUL character (django-neurobank on PostgreSQL answers 500)
_NUL = (
    "a NUL character (\\u0000), which django-neurobank on PostgreSQL cannot store (its "
    "jsonb refuses it)"
)


def _key_problem(key: str) -> str | None:
    if not is_utf8(key):
        return "is not UTF-8 (a lone surrogate): no registry stores it"
    if "\0" in key:
        return f"holds {_NUL}"
    return None


def unstorable_metadata(metadata: Any) -> str | None:
    """Why no registry can be given ``metadata`` through its API, naming the key; None
    when one can. django-neurobank takes only an object ("metadata must be a
    dictionary"; a list or text stored by an administrator is shown, never accepted) and
    fails on a lone surrogate, and on PostgreSQL on a NUL character (in a key or a
    value); neither backend keeps NaN or an infinity, nor metadata nested more than
    :data:`METADATA_DEPTH_MAX` levels deep. The embedded registry
    refuses the same, so an export and its import agree on what cannot return. Walked
    with a stack of its own: any depth is told, never a RecursionError."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        return (
            f"its metadata is {json_shape(metadata)}, not an object: a registry takes only an "
            "object as metadata (django-neurobank: 'metadata must be a dictionary')"
        )
    # (value, its path, its depth): depth first, in order, as the keys are shown
    stack: list[tuple[Any, str, int]] = [(metadata, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not is_utf8(value):
                return (
                    f"{_where(path)} holds a lone surrogate (not UTF-8), which no registry stores"
                )
            if "\0" in value:
                return f"{_where(path)} holds {_NUL}"
        elif isinstance(value, float) and not math.isfinite(value):
            return (
                f"{_where(path)} is not a JSON number (NaN or an infinity), which no registry "
                "stores"
            )
        elif isinstance(value, Mapping | list) and depth > METADATA_DEPTH_MAX:
            return (
                f"{_where(path[:_PATH_SHOWN] + '...')} is nested too deep (over "
                f"{METADATA_DEPTH_MAX} levels), which no registry is sure to store"
            )
        elif isinstance(value, _BadKey):
            return f"metadata key {json.dumps(path, ensure_ascii=True)} {value.why}"
        elif isinstance(value, Mapping):
            children: list[tuple[Any, str, int]] = []
            for key, item in value.items():
                sub = f"{path}.{key}" if path else str(key)
                if why := _key_problem(str(key)):  # told when the walk reaches it, as keys before
                    children.append((_BadKey(why), sub, depth))
                    break
                children.append((item, sub, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(
                (item, f"{path}[{i}]", depth + 1) for i, item in reversed(list(enumerate(value)))
            )
    return None


#: characters of the path to metadata nested too deep a message shows
_PATH_SHOWN = 64


def _where(path: str) -> str:
    return f"metadata key {json.dumps(path, ensure_ascii=True)}" if path else "metadata"


def read_metadata(name: str, text: str) -> Any:
    """The metadata of resource ``name`` from its JSON ``text``; nested too deep for
    Python's JSON reader (near 1,000 levels), a RegistryError naming the resource,
    never a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise errors.RegistryError(
            f"resource {name!r}: its metadata is nested too deep to be read (near "
            "1,000 levels or more), which no registry is sure to store",
            hint="replace that resource's metadata in the registry with a shallower "
            "one, then run the command again",
        ) from None


def _freeze_metadata(metadata: Any) -> str | None:
    return None if metadata is None else json.dumps(metadata, sort_keys=True)


class MalformedRecord(ValueError):
    """A record from the wire is not of the shape the API gives (a field missing, a
    number where text belongs, a list where a record belongs). The message names the
    kind of record and the field, never a value. The HTTP backend turns it into
    :class:`~nbankd.errors.RegistryUnavailable` naming the registry."""


def json_shape(value: Any) -> str:
    """What a JSON value is, for messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def as_record(d: Any, kind: str) -> Mapping[str, Any]:
    """``d`` if it is a JSON object (a record); else :class:`MalformedRecord`."""
    if not isinstance(d, Mapping):
        raise MalformedRecord(f"{kind} record is {json_shape(d)}, not an object")
    return d


def _text(d: Mapping[str, Any], key: str, kind: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        shape = "missing" if key not in d else json_shape(value)
        raise MalformedRecord(f"{kind} record's {key!r} is {shape}, not text")
    return value


def _optional_text(d: Mapping[str, Any], key: str, kind: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise MalformedRecord(f"{kind} record's {key!r} is {json_shape(value)}, not text or null")
    return value


@dataclass(frozen=True)
class DataType:
    name: str
    content_type: str = ""
    extension: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "content_type": self.content_type, "extension": self.extension}

    @classmethod
    def from_json(cls, d: Any) -> DataType:
        """The datatype of a wire record; :class:`MalformedRecord` if it is not one."""
        d = as_record(d, "a datatype")
        return cls(
            _text(d, "name", "a datatype"),
            _optional_text(d, "content_type", "a datatype") or "",
            _optional_text(d, "extension", "a datatype") or "",
        )


@dataclass(frozen=True)
class ArchiveRecord:
    name: str
    scheme: str
    root: str
    accessibility: str = "local"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": self.scheme,
            "root": self.root,
            "accessibility": self.accessibility,
        }

    @classmethod
    def from_json(cls, d: Any) -> ArchiveRecord:
        """The archive of a wire record; :class:`MalformedRecord` if it is not one."""
        d = as_record(d, "an archive")
        return cls(
            _text(d, "name", "an archive"),
            _text(d, "scheme", "an archive"),
            _text(d, "root", "an archive"),
            _optional_text(d, "accessibility", "an archive") or "local",
        )


@dataclass(frozen=True)
class LocationRecord:
    archive_name: str
    scheme: str
    root: str
    resource_name: str
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "archive_name": self.archive_name,
            "scheme": self.scheme,
            "root": self.root,
            "resource_name": self.resource_name,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, d: Any) -> LocationRecord:
        """The location of a wire record; :class:`MalformedRecord` if it is not one."""
        d = as_record(d, "a location")
        return cls(
            _text(d, "archive_name", "a location"),
            _text(d, "scheme", "a location"),
            _text(d, "root", "a location"),
            _text(d, "resource_name", "a location"),
            _optional_text(d, "key", "a location"),
        )


@dataclass(frozen=True)
class ResourceRecord:
    """A registered resource, as django-neurobank 0.12 serialises it.

    ``metadata`` is kept as canonical JSON text so the record stays hashable;
    use the ``metadata`` property's dict. As on the server, ``experimenter`` and
    ``animal`` are also copied into the metadata dict when set.
    """

    name: str
    sha1: str | None
    dtype: str
    locations: tuple[str, ...] = ()
    experimenter: str | None = None
    animal: str | None = None
    created_by: str | None = None
    created_on: str | None = None
    filename: str | None = None
    metadata_json: str | None = field(default=None, repr=False)

    @property
    def metadata(self) -> Any:
        """The record's metadata: an object (a dict) as a rule, None when it has none;
        any other JSON value an administrator stored is kept as it is. Nested too deep
        for Python's JSON reader (near 1,000 levels): a RegistryError naming the record,
        never a RecursionError."""
        if self.metadata_json is None:
            return None
        return read_metadata(self.name, self.metadata_json)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha1": self.sha1,
            "dtype": self.dtype,
            "filename": self.filename if self.filename is not None else self.name,
            "metadata": self.metadata,
            "experimenter": self.experimenter,
            "animal": self.animal,
            "locations": list(self.locations),
            "created_by": self.created_by,
            "created_on": self.created_on,
        }

    @classmethod
    def from_json(cls, d: Any) -> ResourceRecord:
        """The resource of a wire record; :class:`MalformedRecord` if it is not one."""
        kind = "a resource"
        d = as_record(d, kind)
        locations = d.get("locations") or []
        if not isinstance(locations, list) or not all(isinstance(a, str) for a in locations):
            raise MalformedRecord(f"{kind} record's 'locations' is not a list of archive names")
        # any JSON value, kept as it is: django-neurobank's admin form stores whatever
        # JSON it is given (a list, say), and such a record is still a record
        metadata = d.get("metadata")
        return cls(
            name=_text(d, "name", kind),
            sha1=_optional_text(d, "sha1", kind),
            dtype=_text(d, "dtype", kind),
            locations=tuple(locations),
            experimenter=_optional_text(d, "experimenter", kind),
            animal=_optional_text(d, "animal", kind),
            created_by=_optional_text(d, "created_by", kind),
            created_on=_optional_text(d, "created_on", kind),
            filename=_optional_text(d, "filename", kind),
            metadata_json=_freeze_metadata(metadata),
        )


@runtime_checkable
class Registry(Protocol):
    """What nbankd needs from a registry. Both backends implement all of it.

    Errors: :class:`~nbankd.errors.RegistryUnavailable` (transient),
    :class:`~nbankd.errors.RegistryAuthError`, :class:`~nbankd.errors.NotFound`,
    and the :class:`~nbankd.errors.RegistryRejected` family (permanent).
    """

    #: base URL that identifiers resolve under (ends with "/")
    url: str
    #: "embedded" or "http"
    backend: str

    def info(self) -> dict[str, Any]: ...

    # datatypes
    def list_datatypes(self) -> list[DataType]: ...

    def add_datatype(self, name: str, content_type: str = "", extension: str = "") -> DataType:
        """Creates a datatype; ``extension`` is the file extension clients give downloads."""
        ...

    # archives
    def list_archives(self, **filters: str) -> list[ArchiveRecord]: ...

    def get_archive(self, name: str) -> ArchiveRecord | None: ...

    def find_archive_by_root(self, root: str, scheme: str = "neurobank") -> ArchiveRecord | None:
        """The archive with this (scheme, root); root compared case-insensitively."""
        ...

    def add_archive(
        self, name: str, scheme: str, root: str, accessibility: str = "local"
    ) -> ArchiveRecord: ...

    # resources
    def add_resource(
        self,
        *,
        dtype: str,
        archive: str | None,
        name: str | None = None,
        sha1: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> ResourceRecord:
        """Registers a resource located in ``archive``; ``name=None`` lets the registry pick.

        ``experimenter``/``animal`` keys of metadata become the resource's fields.
        ``key`` records the location key in the archive (tape member names).
        """
        ...

    def get_resource(self, name: str) -> ResourceRecord | None: ...

    def get_resources(self, names: Iterable[str]) -> list[ResourceRecord]:
        """Bulk lookup; unknown names are omitted; order is unspecified."""
        ...

    def search(self, **filters: str) -> Iterator[ResourceRecord]:
        """Resources matching django-neurobank's filters (see REGISTRY-NOTES.md)."""
        ...

    def update_metadata(self, name: str, metadata: Mapping[str, Any]) -> ResourceRecord:
        """Merges metadata into the record; a value of None deletes the key."""
        ...

    # locations
    def get_locations(self, name: str) -> list[LocationRecord]: ...

    def get_locations_bulk(self, names: Iterable[str]) -> dict[str, list[LocationRecord]]: ...

    def add_location(self, name: str, archive: str, key: str | None = None) -> LocationRecord: ...

    def remove_location(self, name: str, archive: str) -> None: ...

    def set_location_key(self, name: str, archive: str, key: str | None) -> LocationRecord:
        """Changes the key of a resource's location in ``archive``, in one request."""
        ...

    def resource_url(self, name: str) -> str:
        """The full URL of a resource: ``<url>resources/<name>/``."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """The writes this thread makes inside are committed together when it ends, or,
        should that fail (the registry's errors), none of them (the embedded registry:
        one transaction). A registry without transactions commits each write at once."""
        ...

    def close(self) -> None: ...


def by_root(found: Iterable[ArchiveRecord], root: str, scheme: str) -> ArchiveRecord | None:
    """The archive of ``found`` (the registry's case-insensitive matches for ``root``)
    that ``root`` names: the one whose root is written the same, else, for a folder,
    one whose root is the same folder on this machine (a filesystem that ignores
    case). Never another folder whose name differs only in case, nor another tape."""
    candidates = [a for a in found if a.scheme == scheme and a.root.lower() == root.lower()]
    for a in candidates:
        if a.root == root:
            return a
    if scheme != "neurobank":
        return None
    for a in candidates:
        try:
            if os.path.samefile(a.root, root):
                return a
        except (OSError, ValueError):
            continue
    return None


def full_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/resources/{name}/"
