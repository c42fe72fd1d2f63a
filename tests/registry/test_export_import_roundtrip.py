"""An export is a backup that restores: ``nbankctl registry export`` read back and
imported into an empty registry gives the same records, for every kind of metadata a
registry holds; what no registry can be given again (metadata that is not an object,
as django-neurobank shows an administrator's list; a lone surrogate an older embedded
registry kept) is said by the export (which then exits 1) and reported by the import
in the same words, naming the resource and the key.

Findings (a hostile review, fixed): the export wrote a list as metadata that reading
the file back refused, so nothing of such an export imported; the embedded registry
stored a lone surrogate in metadata (django-neurobank fails on it), which made the
export crash; an export to stdout failed under a locale that is not UTF-8.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, base_env
from fixtures.django_server import DjangoServer, unique_name
from nbankd import errors
from nbankd.migration import execute, snapshot
from nbankd.migration.plan import Verdict, make_plan
from nbankd.registry.embedded import EmbeddedRegistry

#: metadata of the kinds registries hold, every one storable
STORABLE: dict[str, dict[str, object] | None] = {
    "none": None,
    "empty": {},
    "flat": {"rig": 3, "gain": 1.5, "ok": True, "gone": None, "note": "text"},
    "lists": {"channels": [1, 2, 3], "tags": ["a", "b"], "mixed": [1, "x", None, [2]]},
    "nested": {"song": {"motifs": [{"start": 0.25, "labels": ["a", "b"]}], "n": {"x": {}}}},
    "unicode": {"oiseau": "étourneau 🐦", "日本": "語", "sep": "a\u2028b", "esc": "\x1b[31m"},
    "big": {"count": 10**20, "tiny": 1e-300, "neg": -7},
    "people": {"experimenter": "ann", "animal": "bird-7", "session": [1, 2]},
}


def _embedded(path: Path) -> EmbeddedRegistry:
    reg = EmbeddedRegistry(path)
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("arch", "neurobank", "/data/arch")
    return reg


def _config(tmp: Path) -> Path:
    config = tmp / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {tmp / 'state'}\n")
    return config


def _ctl(argv: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NBANKCTL, *argv],
        env={**base_env(tmp / "home"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _import(snap: snapshot.Snapshot, target: EmbeddedRegistry) -> list[execute.Outcome]:
    """What ``registry import`` does, into ``target``: plan, then carry it out."""
    return execute.carry_out(make_plan(snap, execute.read_target(target, snap)), target)


def _records(reg: EmbeddedRegistry) -> dict[str, tuple[object, ...]]:
    return {
        r.name: (r.sha1, r.dtype, r.metadata, r.experimenter, r.animal, r.locations)
        for r in reg.search()
    }


def test_every_kind_of_metadata_round_trips_into_an_empty_registry(tmp_path: Path) -> None:
    """Export, read back, import into an empty registry: the same records, metadata and all."""
    source = _embedded(tmp_path / "state" / "registry.sqlite3")
    for i, (name, metadata) in enumerate(STORABLE.items()):
        source.add_resource(
            dtype="wav", archive="arch", name=name, sha1=f"{i:040x}", metadata=metadata
        )
    export = tmp_path / "export.jsonl"
    made = _ctl(["-c", str(_config(tmp_path)), "registry", "export", "-o", str(export)], tmp_path)
    assert made.returncode == 0, made.stderr
    assert "warning" not in made.stderr
    target = EmbeddedRegistry(tmp_path / "empty.sqlite3")
    outcomes = _import(snapshot.load(export), target)
    assert {o.status for o in outcomes} == {"created"}
    assert _records(target) == _records(source)


def test_a_list_as_metadata_is_said_by_the_export_and_blocked_by_the_import(
    tmp_path: Path, django_registry: DjangoServer
) -> None:
    """django-neurobank shows an administrator's list as metadata: the export keeps it and
    warns, the file reads back, and the import blocks that resource naming it and why."""
    server = django_registry
    dtype, archive = server.add_datatype(), server.add_archive(str(tmp_path / "ar"))
    listed, kept = unique_name("listed"), unique_name("kept")
    for name in (listed, kept):
        server.post(
            "resources/",
            {"name": name, "dtype": dtype, "locations": [archive], "metadata": {"tags": [1]}},
        )
    server.shell(
        "from nbank_registry.models import Resource\n"
        f"r = Resource.objects.get(name={listed!r}); r.metadata = [1, 2, 3]; r.save()"
    )
    export = tmp_path / "export.jsonl"
    try:
        made = _ctl(["-r", server.url, "registry", "export", "-o", str(export)], tmp_path)
    finally:  # a whole export of the session's server warns of it (and exits 1)
        server.shell(
            "from nbank_registry.models import Resource; "
            f"Resource.objects.filter(name__in={[listed, kept]!r}).delete()"
        )
    assert made.returncode == 1, made.stderr
    warned = [line for line in made.stderr.splitlines() if listed in line]
    assert len(warned) == 1 and "metadata is a list, not an object" in warned[0]
    assert kept not in made.stderr
    snap = snapshot.load(export)
    mine = snapshot.Snapshot(
        source=snap.source,
        backend=snap.backend,
        datatypes=tuple(d for d in snap.datatypes if d.name == dtype),
        archives=tuple(a for a in snap.archives if a.name == archive),
        resources=tuple(r for r in snap.resources if r.name in (listed, kept)),
        locations=tuple(x for x in snap.locations if x.resource_name in (listed, kept)),
    )
    assert {r.name: r.metadata for r in mine.resources} == {listed: [1, 2, 3], kept: {"tags": [1]}}
    target = EmbeddedRegistry(tmp_path / "empty.sqlite3")
    steps = {(s.kind, s.name): s for s in make_plan(mine, execute.read_target(target, mine)).steps}
    blocked = steps[("resource", listed)]
    assert blocked.verdict is Verdict.BLOCKED
    assert "its metadata is a list, not an object" in blocked.message
    assert "its metadata is a list, not an object" in warned[0]
    outcomes = _import(mine, target)
    assert {o.step.name: o.status for o in outcomes if o.step.kind == "resource"} == {
        listed: "blocked",
        kept: "created",
    }
    assert target.get_resource(kept) is not None and target.get_resource(listed) is None


def _older_registry_with_a_surrogate(tmp: Path) -> EmbeddedRegistry:
    """An embedded registry whose record holds a lone surrogate in its metadata, as one
    written before the embedded registry refused it held (set in its database)."""
    source = _embedded(tmp / "state" / "registry.sqlite3")
    source.add_resource(dtype="wav", archive="arch", name="odd", sha1="a" * 40, metadata={})
    source.add_resource(dtype="wav", archive="arch", name="fine", sha1="b" * 40)
    source.close()
    with sqlite3.connect(tmp / "state" / "registry.sqlite3") as db:
        db.execute(
            "UPDATE resource SET metadata = ? WHERE name = 'odd'",
            (json.dumps({"take": {"file": "a\udcff.wav"}}),),
        )
    db.close()
    return EmbeddedRegistry(tmp / "state" / "registry.sqlite3")


def test_a_lone_surrogate_an_older_registry_kept_is_exported_and_named(tmp_path: Path) -> None:
    """The export writes valid UTF-8 (the surrogate escaped), warns naming resource and key,
    and the import blocks that resource with the same words, creating the rest."""
    _older_registry_with_a_surrogate(tmp_path).close()
    export = tmp_path / "export.jsonl"
    made = _ctl(["-c", str(_config(tmp_path)), "registry", "export", "-o", str(export)], tmp_path)
    assert made.returncode == 1, made.stderr  # the file written, what it warned of in it
    assert "Traceback" not in made.stderr
    why = 'metadata key "take.file" holds a lone surrogate'
    assert f"resource 'odd': {why}" in made.stderr
    export.read_bytes().decode("utf-8")  # valid UTF-8
    snap = snapshot.load(export)
    assert [r.metadata for r in snap.resources if r.name == "odd"] == [
        {"take": {"file": "a\udcff.wav"}}
    ]
    target = EmbeddedRegistry(tmp_path / "empty.sqlite3")
    outcomes = {o.step.name: o for o in _import(snap, target) if o.step.kind == "resource"}
    assert outcomes["fine"].status == "created"
    assert outcomes["odd"].status == "blocked" and why in outcomes["odd"].message


def test_the_embedded_registry_refuses_metadata_no_registry_stores(tmp_path: Path) -> None:
    """A lone surrogate in metadata is refused, naming the key (django-neurobank fails on it)."""
    reg = _embedded(tmp_path / "r.sqlite3")
    with pytest.raises(errors.RegistryRejected, match=r'metadata key "take\.file" holds a lone'):
        reg.add_resource(
            dtype="wav", archive="arch", name="odd", metadata={"take": {"file": "a\udcff"}}
        )
    reg.add_resource(dtype="wav", archive="arch", name="ok", metadata={"a": 1})
    with pytest.raises(errors.RegistryRejected, match=r'metadata key "k\[1\]" holds a lone'):
        reg.update_metadata("ok", {"k": ["x", "\ud800"]})
    assert [r.name for r in reg.search()] == ["ok"] and reg.get_resource("ok").metadata == {"a": 1}


def test_an_export_to_stdout_is_utf8_under_any_locale(tmp_path: Path) -> None:
    """With an ASCII locale the export to stdout is still written, as UTF-8, and reads back."""
    source = _embedded(tmp_path / "state" / "registry.sqlite3")
    source.add_resource(dtype="wav", archive="arch", name="u", metadata=STORABLE["unicode"])
    made = subprocess.run(
        [NBANKCTL, "-c", str(_config(tmp_path)), "registry", "export"],
        env={**base_env(tmp_path / "home"), "PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
        capture_output=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr.decode("utf-8", "replace")
    snap = snapshot.read(made.stdout.decode("utf-8").split("\n"), "<stdout>")
    assert [r.metadata for r in snap.resources] == [STORABLE["unicode"]]
