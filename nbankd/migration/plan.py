"""The migration planner: pure decisions over frozen records, no I/O.

For every record of an export it decides one :class:`Verdict`:

- ``create``: the target lacks it;
- ``present``: the target has the same thing already (an earlier, perhaps
  interrupted, import made it, or someone did by hand): nothing to do;
- ``conflict``: the target holds something incompatible, which is reported and
  never touched: a resource with the same name and another SHA-1, the same SHA-1
  under another name, the same name and SHA-1 but another datatype or metadata, an
  archive name with another scheme or root (compared exactly: ``/data/Arch`` is
  not ``/data/arch``), a (scheme, root) registered under another archive name (the
  root compared regardless of case, so that two archives never differ by case alone),
  a location with another key;
- ``blocked``: it depends on something in conflict (a resource in a conflicting
  archive, the locations of a conflicting resource) and waits for that to be fixed,
  or no registry can be given it (metadata that is not an object, or holds a lone
  surrogate: :func:`~nbankd.registry.base.unstorable_metadata`), as its export said.

Steps come in dependency order: datatypes, archives, resources, then the locations
not created with their resource. A new resource is created together with its first
location (one request), so the target never shows it without a place to find it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nbankd.migration.snapshot import Snapshot
from nbankd.registry.base import (
    ArchiveRecord,
    DataType,
    LocationRecord,
    ResourceRecord,
    json_shape,
    unstorable_metadata,
)


class Kind(StrEnum):
    DATATYPE = "datatype"
    ARCHIVE = "archive"
    RESOURCE = "resource"
    LOCATION = "location"


class Verdict(StrEnum):
    CREATE = "create"
    PRESENT = "present"
    CONFLICT = "conflict"
    BLOCKED = "blocked"


Record = DataType | ArchiveRecord | ResourceRecord | LocationRecord


@dataclass(frozen=True)
class Step:
    """What to do with one exported record. ``location`` is a new resource's first location."""

    kind: Kind
    name: str
    verdict: Verdict
    message: str = ""
    record: Record | None = field(default=None, compare=False, repr=False)
    location: LocationRecord | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "name": self.name,
            "verdict": str(self.verdict),
            "message": self.message,
        }


@dataclass(frozen=True)
class TargetState:
    """What the target registry holds, as far as the export is concerned.

    ``resources``: the export's resource names the target has; ``by_sha1``: the
    target's resources (any name) whose SHA-1 (lowercase) is one of the export's;
    ``locations``: the target's locations of the resources in ``resources``.
    """

    datatypes: Mapping[str, DataType] = field(default_factory=dict)
    archives: Mapping[str, ArchiveRecord] = field(default_factory=dict)
    resources: Mapping[str, ResourceRecord] = field(default_factory=dict)
    by_sha1: Mapping[str, ResourceRecord] = field(default_factory=dict)
    locations: Mapping[str, tuple[LocationRecord, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def counts(self) -> Counter[tuple[str, str]]:
        """(kind, verdict) -> number of steps."""
        return Counter((str(s.kind), str(s.verdict)) for s in self.steps)

    @property
    def to_create(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.verdict is Verdict.CREATE)

    @property
    def problems(self) -> tuple[Step, ...]:
        """Conflicts and what they block."""
        return tuple(s for s in self.steps if s.verdict in (Verdict.CONFLICT, Verdict.BLOCKED))


def location_name(loc: LocationRecord) -> str:
    return f"{loc.resource_name}@{loc.archive_name}"


def _sha1(value: str | None) -> str | None:
    return value.lower() if value else None


def _metadata(record: ResourceRecord) -> tuple[Any, dict[str, Any]]:
    """(metadata, core fields): the metadata as shown by either backend, None counting as
    empty, and the core fields that are set. An object holds the core fields (copied
    in, as the server shows them; none are left beside it); any other JSON value an
    administrator stored (a list, say) has no keys for them and is kept as it is, the
    core fields beside it."""
    core = {
        key: value
        for key, value in (("experimenter", record.experimenter), ("animal", record.animal))
        if value is not None
    }
    metadata = record.metadata
    if metadata is None or isinstance(metadata, dict):
        return {**(metadata or {}), **core}, {}
    return metadata, core


def _differing(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def record_differences(exported: ResourceRecord, target: ResourceRecord) -> list[str]:
    """How a target record with the same name and SHA-1 differs from the exported one."""
    out = []
    if exported.dtype != target.dtype:
        out.append(f"datatype {target.dtype!r} (export: {exported.dtype!r})")
    (mine, my_core), (theirs, their_core) = _metadata(exported), _metadata(target)
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = _differing(mine, theirs)
    else:  # a list or other value on one side at least: compared whole
        if mine != theirs:
            shapes = json_shape(theirs), json_shape(mine)
            out.append(
                f"metadata differs ({shapes[0]} on both sides, compared whole)"
                if shapes[0] == shapes[1]
                else f"metadata is {shapes[0]} on the target, {shapes[1]} in the export"
            )
        # the core fields beside such values; an object holds its own, compared with it
        both_bare = not isinstance(mine, dict) and not isinstance(theirs, dict)
        keys = _differing(my_core, their_core) if both_bare else []
    if keys:
        out.append(f"metadata differs in {', '.join(map(json.dumps, keys))}")
    return out


def _plan_datatypes(source: Snapshot, target: TargetState, steps: list[Step]) -> set[str]:
    usable = set(target.datatypes)
    for d in source.datatypes:
        there = target.datatypes.get(d.name)
        if there is None:
            steps.append(Step(Kind.DATATYPE, d.name, Verdict.CREATE, "", d))
            usable.add(d.name)
            continue
        note = ""
        if (there.content_type, there.extension) != (d.content_type, d.extension):
            note = (
                f"on the target with content type {there.content_type!r} and extension "
                f"{there.extension!r} (export: {d.content_type!r}, {d.extension!r}); left as it is"
            )
        steps.append(Step(Kind.DATATYPE, d.name, Verdict.PRESENT, note, d))
    return usable


def _plan_archives(source: Snapshot, target: TargetState, steps: list[Step]) -> set[str]:
    usable: set[str] = set()
    by_root = {(a.scheme, a.root.lower()): a for a in target.archives.values()}
    for a in source.archives:
        there = target.archives.get(a.name)
        if there is not None:
            if (there.scheme, there.root) == (a.scheme, a.root):
                note = ""
                if there.accessibility != a.accessibility:
                    note = (
                        f"accessibility is {there.accessibility!r} on the target "
                        f"(export: {a.accessibility!r}); left as it is"
                    )
                steps.append(Step(Kind.ARCHIVE, a.name, Verdict.PRESENT, note, a))
                usable.add(a.name)
            else:
                why = f"the target's archive {a.name!r} is {there.scheme}:{there.root}, "
                why += f"not {a.scheme}:{a.root}"
                if (there.scheme, there.root.lower()) == (a.scheme, a.root.lower()):
                    why += (
                        " (the roots differ only in case: on a case-sensitive filesystem "
                        "they are different folders; correct the root on the target or in "
                        "the export, whichever is wrong)"
                    )
                steps.append(Step(Kind.ARCHIVE, a.name, Verdict.CONFLICT, why, a))
            continue
        other = by_root.get((a.scheme, a.root.lower()))
        if other is not None:
            why = f"{a.scheme}:{a.root} is registered on the target as archive {other.name!r}"
            if other.root != a.root:
                why += (
                    f" (with root {other.root}: the roots differ only in case; check which "
                    "folder is meant, and correct or rename the archive on the target)"
                )
            steps.append(Step(Kind.ARCHIVE, a.name, Verdict.CONFLICT, why, a))
            continue
        steps.append(Step(Kind.ARCHIVE, a.name, Verdict.CREATE, "", a))
        by_root[(a.scheme, a.root.lower())] = a
        usable.add(a.name)
    return usable


def _resource_verdict(
    r: ResourceRecord,
    target: TargetState,
    locations: list[LocationRecord],
    dtypes: set[str],
    archives: set[str],
    planned_sha1: dict[str, str],
    moved: frozenset[str],
) -> tuple[Verdict, str]:
    there = target.resources.get(r.name)
    if r.name in moved:
        return _moved_verdict(r, there)
    if there is not None:
        if _sha1(there.sha1) != _sha1(r.sha1):
            return Verdict.CONFLICT, (
                f"the target's {r.name!r} has sha1 {there.sha1}, the export {r.sha1}"
            )
        diffs = record_differences(r, there)
        if diffs:
            return Verdict.CONFLICT, (
                f"the target's {r.name!r} has the same sha1 but " + "; ".join(diffs)
            )
        return Verdict.PRESENT, ""
    sha1 = _sha1(r.sha1)
    if sha1 is not None:
        other = target.by_sha1.get(sha1)
        if other is not None:
            return (
                Verdict.CONFLICT,
                f"the same content (sha1 {sha1}) is {other.name!r} on the target",
            )
        if sha1 in planned_sha1:
            return Verdict.CONFLICT, f"the export has the same sha1 as {planned_sha1[sha1]!r}"
    unstorable = unstorable_metadata(r.metadata)
    if unstorable:
        return Verdict.BLOCKED, f"{unstorable}; it cannot be created again"
    if r.dtype not in dtypes:
        return Verdict.BLOCKED, f"datatype {r.dtype!r} is neither on the target nor created"
    bad = [loc.archive_name for loc in locations if loc.archive_name not in archives]
    if bad:
        return Verdict.BLOCKED, f"archive {bad[0]!r} is in conflict"
    return Verdict.CREATE, ""


def _moved_verdict(r: ResourceRecord, there: ResourceRecord | None) -> tuple[Verdict, str]:
    """A resource moved to the target earlier and unchanged in the export since: the
    target's record is the registry's now and wins (metadata corrected there is kept)."""
    if there is None:
        return Verdict.BLOCKED, (
            f"{r.name!r} was moved to the target earlier but the target no longer has it "
            "(deleted there since?), so the location(s) added to it since cannot be "
            "imported: re-create it on the target (same name and sha1), then run again"
        )
    if _sha1(there.sha1) != _sha1(r.sha1):
        return Verdict.CONFLICT, (
            f"the target's {r.name!r} has sha1 {there.sha1}, the export {r.sha1}"
        )
    diffs = record_differences(r, there)
    if diffs:
        return Verdict.PRESENT, (
            f"moved earlier; the target's record ({'; '.join(diffs)}) is kept as it is"
        )
    return Verdict.PRESENT, ""


def _plan_locations(
    r: ResourceRecord,
    verdict: Verdict,
    locations: list[LocationRecord],
    target: TargetState,
    archives: set[str],
    out: list[Step],
) -> None:
    """Location steps for a resource (other than a new resource's first one)."""
    held = {loc.archive_name: loc for loc in target.locations.get(r.name, ())}
    for loc in locations:
        name = location_name(loc)
        if verdict in (Verdict.CONFLICT, Verdict.BLOCKED):
            why = f"resource {r.name!r} is {verdict}"
            out.append(Step(Kind.LOCATION, name, Verdict.BLOCKED, why, loc))
        elif loc.archive_name in held:
            there = held[loc.archive_name]
            if (there.key or None) == (loc.key or None):
                out.append(Step(Kind.LOCATION, name, Verdict.PRESENT, "", loc))
            else:
                why = f"the target locates it with key {there.key!r} (export: {loc.key!r})"
                out.append(Step(Kind.LOCATION, name, Verdict.CONFLICT, why, loc))
        elif loc.archive_name not in archives:
            why = f"archive {loc.archive_name!r} is in conflict"
            out.append(Step(Kind.LOCATION, name, Verdict.BLOCKED, why, loc))
        else:
            out.append(Step(Kind.LOCATION, name, Verdict.CREATE, "", loc))


def make_plan(
    source: Snapshot, target: TargetState, *, moved: frozenset[str] = frozenset()
) -> Plan:
    """Decides what to do with every record of ``source`` given the ``target``'s state.

    ``moved`` names resources an earlier import moved to the target, unchanged since, and
    in ``source`` only for locations added to them since (a re-run of ``registry
    switch``): the target's record wins, so metadata corrected there is no conflict.
    """
    steps: list[Step] = []
    dtypes = _plan_datatypes(source, target, steps)
    archives = _plan_archives(source, target, steps)
    located = source.locations_of()
    later: list[Step] = []
    planned_sha1: dict[str, str] = {}
    for r in source.resources:
        locations = located.get(r.name, [])
        verdict, why = _resource_verdict(
            r, target, locations, dtypes, archives, planned_sha1, moved
        )
        first = None
        if verdict is Verdict.CREATE:
            if r.sha1:
                planned_sha1[r.sha1.lower()] = r.name
            if locations:
                first, locations = locations[0], locations[1:]
        steps.append(Step(Kind.RESOURCE, r.name, verdict, why, r, first))
        _plan_locations(r, verdict, locations, target, archives, later)
    return Plan(tuple(steps + later))


__all__ = [
    "Kind",
    "Plan",
    "Step",
    "TargetState",
    "Verdict",
    "location_name",
    "make_plan",
    "record_differences",
]
