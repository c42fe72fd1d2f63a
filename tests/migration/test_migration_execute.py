"""Carrying out a plan on a real target (an embedded registry here; django in tests/ctl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbankd.deposit import moves
from nbankd.migration import execute, snapshot
from nbankd.migration.plan import make_plan
from nbankd.registry.embedded import EmbeddedRegistry


@pytest.fixture
def source(tmp_path: Path) -> EmbeddedRegistry:
    reg = EmbeddedRegistry(tmp_path / "src.sqlite3", url="https://old.example/neurobank/")
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("arch", "neurobank", "/data/arch")
    reg.add_archive("tape1-0", "tape", "tape1:0", "offline")
    for i in range(6):
        reg.add_resource(
            dtype="wav",
            archive="arch",
            name=f"r{i}",
            sha1=f"{i:x}" * 40,
            metadata={"rig": i, "experimenter": "ann", "animal": f"b{i}"},
        )
    reg.add_location("r0", "tape1-0", key="resources/r0/r0.wav")
    return reg


@pytest.fixture
def target(tmp_path: Path) -> EmbeddedRegistry:
    return EmbeddedRegistry(tmp_path / "dst.sqlite3")


def migrate(source: snapshot.Snapshot, target: EmbeddedRegistry) -> list[execute.Outcome]:
    plan = make_plan(source, execute.read_target(target, source))
    return execute.carry_out(plan, target)


def shown(reg: EmbeddedRegistry) -> dict[str, tuple[object, ...]]:
    """What a user sees of each resource, without the times and users the target sets."""
    out = {}
    for r in reg.search():
        locs = tuple((x.archive_name, x.key) for x in reg.get_locations(r.name))
        out[r.name] = (r.sha1, r.dtype, r.filename, r.metadata, r.experimenter, r.animal, locs)
    return out


def test_migration_copies_every_record(source: EmbeddedRegistry, target: EmbeddedRegistry) -> None:
    """Names, sha1s, metadata, core fields, datatype extension and tape keys arrive intact."""
    snap = snapshot.take(source)
    outcomes = migrate(snap, target)
    assert {o.status for o in outcomes} == {"created"}
    assert shown(target) == shown(source)
    assert target.list_datatypes() == source.list_datatypes()
    assert target.list_archives() == source.list_archives()


def test_parallel_jobs_copy_every_record_once(
    source: EmbeddedRegistry, target: EmbeddedRegistry
) -> None:
    """With several jobs, each worker has its own connection and the result is the same."""
    snap = snapshot.take(source)
    plan = make_plan(snap, execute.read_target(target, snap))
    opened: list[EmbeddedRegistry] = []

    def opener() -> EmbeddedRegistry:
        opened.append(EmbeddedRegistry(target.db_path))
        return opened[-1]

    outcomes = execute.carry_out(plan, target, jobs=3, opener=opener)
    assert sorted(o.status for o in outcomes) == ["created"] * len(plan.steps)
    assert shown(target) == shown(source)
    assert 1 <= len(opened) <= 3


def test_rerun_creates_nothing(source: EmbeddedRegistry, target: EmbeddedRegistry) -> None:
    """A second run finds every record present and creates nothing."""
    snap = snapshot.take(source)
    migrate(snap, target)
    again = migrate(snap, target)
    assert {o.status for o in again} == {"present"}
    assert len(list(target.search())) == 6


def test_a_stale_plan_treats_records_made_meanwhile_as_done(
    source: EmbeddedRegistry, target: EmbeddedRegistry
) -> None:
    """Records created after planning (an earlier run's last ones) count as present, once."""
    snap = snapshot.take(source)
    plan = make_plan(snap, execute.read_target(target, snap))
    first_three = snapshot.Snapshot(
        snap.source,
        snap.backend,
        snap.datatypes,
        snap.archives,
        snap.resources[:3],
        tuple(x for x in snap.locations if x.resource_name in ("r0", "r1", "r2")),
    )
    execute.carry_out(make_plan(first_three, execute.read_target(target, snap)), target)
    outcomes = execute.carry_out(plan, target)
    statuses = {(str(o.step.kind), o.step.name): o.status for o in outcomes}
    assert statuses[("resource", "r0")] == "present"
    assert statuses[("resource", "r5")] == "created"
    assert statuses[("location", "r0@tape1-0")] == "present"
    assert shown(target) == shown(source)


def test_a_conflict_made_meanwhile_is_reported_and_untouched(
    source: EmbeddedRegistry, target: EmbeddedRegistry
) -> None:
    """A name taken with other content after planning is a conflict; its locations wait."""
    snap = snapshot.take(source)
    plan = make_plan(snap, execute.read_target(target, snap))
    target.add_datatype("other")
    target.add_resource(dtype="other", archive=None, name="r0", sha1="f" * 40)
    outcomes = execute.carry_out(plan, target)
    statuses = {(str(o.step.kind), o.step.name): o.status for o in outcomes}
    assert statuses[("resource", "r0")] == "conflict"
    assert statuses[("location", "r0@tape1-0")] == "blocked"
    record = target.get_resource("r0")
    assert record is not None and record.sha1 == "f" * 40 and record.locations == ()


def test_history_follows_recorded_moves(tmp_path: Path) -> None:
    """Receipt URLs under a moved registry show under the new one; the old one is kept."""
    old, new = "file:///var/lib/nbankd/registry.sqlite3/", "https://lab/neurobank/"
    assert moves.record_move(tmp_path, old, new, time="t")
    assert not moves.record_move(tmp_path, old, new, time="t2")  # recorded once
    receipts = [
        {"id": "a", "url": old + "resources/a/"},
        {"id": "b", "url": "https://elsewhere/neurobank/resources/b/"},
    ]
    shown = moves.follow(receipts, tmp_path)
    assert shown[0] == {"id": "a", "url": new + "resources/a/", "receipt_url": old + "resources/a/"}
    assert shown[1] == receipts[1]
    assert receipts[0]["url"] == old + "resources/a/"  # the receipts themselves are unchanged
