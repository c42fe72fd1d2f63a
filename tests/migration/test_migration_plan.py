"""The migration planner: a table of source/target situations and the verdicts they give."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from nbankd.migration.plan import Kind, TargetState, Verdict, make_plan
from nbankd.migration.snapshot import Snapshot
from nbankd.registry.base import ArchiveRecord, DataType, LocationRecord, ResourceRecord

SHA_A = "a" * 40
SHA_B = "b" * 40
WAV = DataType("wav", "audio/wav", "wav")
ARCH = ArchiveRecord("arch", "neurobank", "/data/arch")
TAPE = ArchiveRecord("tape1-0", "tape", "tape1:0", "offline")


def res(name: str, sha1: str | None = SHA_A, dtype: str = "wav", **meta: Any) -> ResourceRecord:
    return ResourceRecord(
        name=name,
        sha1=sha1,
        dtype=dtype,
        experimenter=meta.get("experimenter"),
        animal=meta.get("animal"),
        metadata_json=json.dumps(meta, sort_keys=True) if meta else None,
    )


def bare(name: str, metadata: Any, **core: str) -> ResourceRecord:
    """A record whose metadata is any JSON value (a list, say: an administrator's)."""
    return ResourceRecord(
        name=name,
        sha1=SHA_A,
        dtype="wav",
        experimenter=core.get("experimenter"),
        animal=core.get("animal"),
        metadata_json=json.dumps(metadata),
    )


def loc(name: str, archive: ArchiveRecord = ARCH, key: str | None = None) -> LocationRecord:
    return LocationRecord(archive.name, archive.scheme, archive.root, name, key)


@dataclass
class Case:
    """One situation: what the export holds, what the target holds, the expected verdicts."""

    id: str
    resources: list[ResourceRecord] = field(default_factory=list)
    locations: list[LocationRecord] = field(default_factory=list)
    target_resources: list[ResourceRecord] = field(default_factory=list)
    target_locations: list[LocationRecord] = field(default_factory=list)
    target_archives: list[ArchiveRecord] = field(default_factory=list)
    target_datatypes: list[DataType] = field(default_factory=list)
    archives: list[ArchiveRecord] = field(default_factory=lambda: [ARCH])
    datatypes: list[DataType] = field(default_factory=lambda: [WAV])
    # (kind, name) -> verdict, for the steps the case is about
    expect: dict[tuple[str, str], str] = field(default_factory=dict)
    message: str = ""  # a fragment of the message of the first non-present, non-create step
    # (kind, name) -> a fragment of the note of a present step (a difference left as it is)
    notes: dict[tuple[str, str], str] = field(default_factory=dict)


CASES = [
    Case(
        "empty target: everything is created",
        resources=[res("r1")],
        locations=[loc("r1")],
        expect={
            ("datatype", "wav"): "create",
            ("archive", "arch"): "create",
            ("resource", "r1"): "create",
        },
    ),
    Case(
        "same record already there (resumed import)",
        resources=[res("r1", rig="3")],
        locations=[loc("r1")],
        target_datatypes=[WAV],
        target_archives=[ARCH],
        target_resources=[res("r1", rig="3")],
        target_locations=[loc("r1")],
        expect={
            ("datatype", "wav"): "present",
            ("archive", "arch"): "present",
            ("resource", "r1"): "present",
            ("location", "r1@arch"): "present",
        },
    ),
    Case(
        "same name, different sha1",
        resources=[res("r1", SHA_A)],
        locations=[loc("r1")],
        target_archives=[ARCH],
        target_resources=[res("r1", SHA_B)],
        expect={("resource", "r1"): "conflict", ("location", "r1@arch"): "blocked"},
        message=f"has sha1 {SHA_B}",
    ),
    Case(
        "same sha1 under another name",
        resources=[res("r1", SHA_A)],
        locations=[loc("r1")],
        target_archives=[ARCH],
        target_resources=[res("other", SHA_A)],
        expect={("resource", "r1"): "conflict", ("location", "r1@arch"): "blocked"},
        message="is 'other' on the target",
    ),
    Case(
        "sha1 compared case-insensitively",
        resources=[res("r1", SHA_A.upper())],
        target_resources=[res("r1", SHA_A)],
        expect={("resource", "r1"): "present"},
    ),
    Case(
        "same name and sha1, other metadata",
        resources=[res("r1", rig="3")],
        target_resources=[res("r1", rig="4")],
        expect={("resource", "r1"): "conflict"},
        message='metadata differs in "rig"',
    ),
    Case(
        "same name and sha1, other experimenter",
        resources=[res("r1", experimenter="ann")],
        target_resources=[res("r1", experimenter="bob")],
        expect={("resource", "r1"): "conflict"},
        message='"experimenter"',
    ),
    Case(
        "no metadata equals empty metadata",
        resources=[res("r1")],
        target_resources=[ResourceRecord(name="r1", sha1=SHA_A, dtype="wav", metadata_json="{}")],
        expect={("resource", "r1"): "present"},
    ),
    Case(
        "same name and sha1, the same list as metadata",
        resources=[bare("r1", [1, {"rig": 3}], experimenter="ann")],
        target_resources=[bare("r1", [1, {"rig": 3}], experimenter="ann")],
        expect={("resource", "r1"): "present"},
    ),
    Case(
        "same name and sha1, another list as metadata",
        resources=[bare("r1", [1, 2])],
        target_resources=[bare("r1", [2, 1])],
        expect={("resource", "r1"): "conflict"},
        message="metadata differs (a list on both sides, compared whole)",
    ),
    Case(
        "same name and sha1, the same list as metadata, other experimenter",
        resources=[bare("r1", [1], experimenter="ann")],
        target_resources=[bare("r1", [1], experimenter="bob")],
        expect={("resource", "r1"): "conflict"},
        message='metadata differs in "experimenter"',
    ),
    Case(
        "same name and sha1, a list as metadata on the target, an object in the export",
        resources=[res("r1", a="b", c="d")],
        target_resources=[bare("r1", ["ab", "cd"])],
        expect={("resource", "r1"): "conflict"},
        message="metadata is a list on the target, an object in the export",
    ),
    Case(
        "same name and sha1, the same text as metadata",
        resources=[bare("r1", "notes")],
        target_resources=[bare("r1", "notes")],
        expect={("resource", "r1"): "present"},
    ),
    Case(
        "same name and sha1, other datatype",
        resources=[res("r1", dtype="wav")],
        target_datatypes=[WAV, DataType("raw")],
        target_resources=[res("r1", dtype="raw")],
        expect={("resource", "r1"): "conflict"},
        message="datatype 'raw'",
    ),
    Case(
        "resources without sha1 match by name",
        resources=[res("r1", None)],
        target_resources=[res("r1", None)],
        expect={("resource", "r1"): "present"},
    ),
    Case(
        "no sha1 on one side only is a conflict",
        resources=[res("r1", None)],
        target_resources=[res("r1", SHA_A)],
        expect={("resource", "r1"): "conflict"},
    ),
    Case(
        "archive name with another root",
        resources=[res("r1")],
        locations=[loc("r1")],
        target_archives=[ArchiveRecord("arch", "neurobank", "/elsewhere")],
        expect={
            ("archive", "arch"): "conflict",
            ("resource", "r1"): "blocked",
            ("location", "r1@arch"): "blocked",
        },
        message="neurobank:/elsewhere",
    ),
    Case(
        "root registered under another archive name",
        archives=[ARCH],
        target_archives=[ArchiveRecord("old-name", "neurobank", "/DATA/arch")],
        expect={("archive", "arch"): "conflict"},
        message="as archive 'old-name'",
    ),
    Case(
        "archive accessibility differs: present, with a note",
        archives=[TAPE],
        target_archives=[ArchiveRecord("tape1-0", "tape", "tape1:0", "local")],
        expect={("archive", "tape1-0"): "present"},
        notes={("archive", "tape1-0"): "accessibility is 'local' on the target"},
    ),
    Case(
        "datatype present with another content type and extension is not a conflict",
        target_datatypes=[DataType("wav", "application/octet-stream", "dat")],
        expect={("datatype", "wav"): "present"},
        notes={("datatype", "wav"): "extension 'dat'"},
    ),
    Case(
        "datatype neither exported nor on the target",
        datatypes=[],
        resources=[res("r1", dtype="ghost")],
        expect={("resource", "r1"): "blocked"},
        message="datatype 'ghost'",
    ),
    Case(
        "new resource: first location with it, the tape one after",
        archives=[ARCH, TAPE],
        resources=[res("r1")],
        locations=[loc("r1"), loc("r1", TAPE, "resources/r1/r1.wav")],
        expect={("resource", "r1"): "create", ("location", "r1@tape1-0"): "create"},
    ),
    Case(
        "present resource missing its tape location",
        archives=[ARCH, TAPE],
        resources=[res("r1")],
        locations=[loc("r1"), loc("r1", TAPE, "m")],
        target_archives=[ARCH, TAPE],
        target_resources=[res("r1")],
        target_locations=[loc("r1")],
        expect={
            ("resource", "r1"): "present",
            ("location", "r1@arch"): "present",
            ("location", "r1@tape1-0"): "create",
        },
    ),
    Case(
        "location with another key",
        archives=[TAPE],
        resources=[res("r1")],
        locations=[loc("r1", TAPE, "m1")],
        target_archives=[TAPE],
        target_resources=[res("r1")],
        target_locations=[loc("r1", TAPE, "m2")],
        expect={("location", "r1@tape1-0"): "conflict"},
        message="key 'm2'",
    ),
    Case(
        "two exported resources with one sha1: the second conflicts",
        resources=[res("r1"), res("r2")],
        expect={("resource", "r1"): "create", ("resource", "r2"): "conflict"},
        message="same sha1 as 'r1'",
    ),
]


def target_of(case: Case) -> TargetState:
    by_sha1 = {r.sha1.lower(): r for r in case.target_resources if r.sha1}
    names = {r.name for r in case.resources}
    located: dict[str, tuple[LocationRecord, ...]] = {}
    for x in case.target_locations:
        located[x.resource_name] = (*located.get(x.resource_name, ()), x)
    return TargetState(
        datatypes={d.name: d for d in case.target_datatypes},
        archives={a.name: a for a in case.target_archives},
        resources={r.name: r for r in case.target_resources if r.name in names},
        by_sha1=by_sha1,
        locations=located,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_planner_verdicts(case: Case) -> None:
    """Each situation gives the expected verdict for the records it is about."""
    source = Snapshot(
        "file:///old/",
        "embedded",
        tuple(case.datatypes),
        tuple(case.archives),
        tuple(case.resources),
        tuple(case.locations),
    )
    plan = make_plan(source, target_of(case))
    got = {(str(s.kind), s.name): str(s.verdict) for s in plan.steps}
    for key, verdict in case.expect.items():
        assert got.get(key) == verdict, (key, got)
    if case.message:
        first = next(s for s in plan.steps if s.verdict in (Verdict.CONFLICT, Verdict.BLOCKED))
        assert case.message in first.message
    messages = {(str(s.kind), s.name): s.message for s in plan.steps}
    for key, fragment in case.notes.items():
        assert fragment in messages[key], (key, messages[key])


def test_plan_is_in_dependency_order() -> None:
    """Datatypes, then archives, then resources, then the extra locations."""
    source = Snapshot(
        "file:///old/",
        "embedded",
        (WAV,),
        (ARCH, TAPE),
        (res("r1", SHA_A), res("r2", SHA_B)),
        (loc("r1"), loc("r1", TAPE, "k1"), loc("r2")),
    )
    plan = make_plan(source, TargetState())
    kinds = [s.kind for s in plan.steps]
    order = [Kind.DATATYPE, Kind.ARCHIVE, Kind.RESOURCE, Kind.LOCATION]
    assert kinds == sorted(kinds, key=order.index)
    first = {s.name: s.location for s in plan.steps if s.kind is Kind.RESOURCE}
    assert first == {"r1": loc("r1"), "r2": loc("r2")}
    assert [s.name for s in plan.steps if s.kind is Kind.LOCATION] == ["r1@tape1-0"]


def test_a_resource_without_locations_is_created_without_one() -> None:
    """A record with no location is created bare (the server allows it)."""
    source = Snapshot("u", "embedded", (WAV,), (), (res("lonely"),), ())
    [step] = [s for s in make_plan(source, TargetState()).steps if s.kind is Kind.RESOURCE]
    assert step.verdict is Verdict.CREATE and step.location is None


def test_counts_and_problems() -> None:
    """The plan counts verdicts per kind and lists conflicts with what they block."""
    source = Snapshot("u", "embedded", (WAV,), (ARCH,), (res("r1"),), (loc("r1"),))
    target = TargetState(resources={"r1": res("r1", SHA_B)}, datatypes={"wav": WAV})
    plan = make_plan(source, target)
    assert plan.counts()[("resource", "conflict")] == 1
    assert plan.counts()[("datatype", "present")] == 1
    assert [(str(s.kind), str(s.verdict)) for s in plan.problems] == [
        ("resource", "conflict"),
        ("location", "blocked"),
    ]
