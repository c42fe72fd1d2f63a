"""Findings left alone by earlier reviews of nbankctl and the registries, closed here.

- ``tape register`` passed over a member whose name holds a control character (an
  escape, a newline) without a word, or located it under its raw name though ``tape
  import`` refuses it: it is now named (escaped), said not registered and why, and
  the command exits 1;
- ``registry export`` warned of each resource no registry can be given again and
  exited 0, so a script took a backup that cannot all be restored for a whole one: it
  exits 1 (the file still written, every record in it);
- the embedded registry's metadata update read the stored record with ``json.loads``:
  one nested past what JSON reads (an older version's, an administrator's) raised
  RecursionError, an internal error, and so did reading such a record with an
  experimenter or animal; one whose stored metadata is a list raised TypeError. Each
  is now an error naming the resource;
- ``HttpRegistry`` sent ``dict(metadata)``: a list of pairs went as an object, text or
  a number raised ValueError or TypeError; it refuses what is not an object as the
  embedded registry does ("metadata must be a dictionary"), sending nothing;
- metadata holding a NUL character (``\\u0000``) reached django-neurobank, whose
  PostgreSQL ``jsonb`` refuses it: a 500, taken for an outage ("retry later"); both
  backends refuse it before anything is sent, naming the key.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbank.util import hash_directory

from fixtures.cli_backends import Backend, make_backend, make_tar
from fixtures.django_server import DjangoServer, unique_name
from fixtures.registry_dtype import registry_with_dtype
from nbankd import errors
from nbankd.migration import snapshot
from nbankd.registry.base import Registry
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """nbankctl on a fresh embedded registry (nothing shared with other tests)."""
    return make_backend("embedded", tmp_path, request)


# --- tape register: members whose names hold control characters -----------------------


def test_tape_register_names_each_member_with_a_control_character_and_exits_1(
    embedded: Backend,
) -> None:
    """Members named with an escape, a newline or a tab (one with a valid identifier
    after a folder so named) are each named escaped, said not registered and why, get
    no location, and the command exits 1; the honest member is registered."""
    _, arch = embedded.archive()
    good, odd = embedded.blob("good"), embedded.blob("odd")
    id_good = embedded.resource(good, arch)
    id_odd = embedded.resource(odd, arch)
    hostile = {
        "x\x1b[2J.dat": "x\\x1b[2J.dat",
        "notes\n.txt": "notes\\x0a.txt",
        f"in\tdir/{id_odd}.dat": f"in\\x09dir/{id_odd}.dat",
    }
    names = list(hostile)
    tar = make_tar(
        embedded.tmp / "t.tar",
        [(f"{id_good}.dat", good), (names[0], b"a"), (names[1], b"b"), (names[2], odd)],
    )
    tape = embedded.name("TAPE")
    proc = embedded.ctl("tape", "register", tape, "0", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stderr
    for shown in hostile.values():
        [line] = [x for x in proc.stderr.splitlines() if f"✗ {shown} ->" in x]
        assert "not registered" in line and "control character" in line, line
    assert "failed or refused: 3" in proc.stderr, proc.stderr
    locations = {
        id: [loc.key for loc in embedded.registry.get_locations(id) if loc.scheme == "tape"]
        for id in (id_good, id_odd)
    }
    assert locations == {id_good: [f"{id_good}.dat"], id_odd: []}


def test_tape_register_refuses_a_folder_resource_holding_a_member_with_a_control_character(
    embedded: Backend,
) -> None:
    """A folder resource whose hash matches but which holds a member named with an
    escape (tape import would refuse it) gets no location; the member is named escaped
    and the command exits 1."""
    _, arch = embedded.archive()
    files = {"a.txt": embedded.blob("a"), "b\x1b[31m.txt": embedded.blob("b")}
    root = embedded.tmp / "folder"
    root.mkdir()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    idd = embedded.registry.add_resource(
        dtype=embedded.dtype, archive=arch, name=embedded.name("d"), sha1=hash_directory(root)
    ).name
    tar = make_tar(
        embedded.tmp / "t.tar", [(idd, None)] + [(f"{idd}/{k}", v) for k, v in files.items()]
    )
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    [line] = [x for x in lines if f"✗ {idd}/b\\x1b[31m.txt ->" in x]
    assert "not registered" in line and "control character" in line, line
    [folder] = [x for x in lines if f"✗ {idd} ->" in x]
    assert "control character" in folder and "no location recorded" in folder, folder
    assert [loc for loc in embedded.registry.get_locations(idd) if loc.scheme == "tape"] == []


# --- registry export: records it warns of -------------------------------------------------


def test_registry_export_that_warns_of_a_record_exits_1_and_still_writes_every_record(
    embedded: Backend,
) -> None:
    """A record whose metadata no registry can be given again (a lone surrogate an older
    registry kept) is warned of by name and makes the export exit 1; the file holds it
    and the other records."""
    embedded.resource(b"odd", None, name="odd", metadata={})
    embedded.resource(b"fine", None, name="fine")
    db_path = embedded.tmp / "state" / "registry.sqlite3"
    with sqlite3.connect(db_path) as db:  # as an older version could store it
        db.execute(
            "UPDATE resource SET metadata = ? WHERE name = 'odd'",
            (json.dumps({"take": "a\udcff.wav"}),),
        )
    db.close()
    export = embedded.tmp / "export.jsonl"
    proc = embedded.ctl("registry", "export", "-o", str(export))
    assert proc.returncode == 1, proc.stderr
    [warning] = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert "resource 'odd'" in warning and "cannot be created again" in warning, warning
    assert sorted(r.name for r in snapshot.load(export).resources) == ["fine", "odd"]


# --- the embedded registry: stored metadata it cannot merge into ----------------------


def _stored(tmp: Path, metadata_text: str, *, animal: str | None = None) -> EmbeddedRegistry:
    """An embedded registry with resource 'odd' whose stored metadata is
    ``metadata_text`` (set in its database, as an older version or an administrator
    could) and resource 'fine'."""
    path = tmp / "registry.sqlite3"
    reg = EmbeddedRegistry(path)
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_resource(dtype="wav", archive=None, name="odd", metadata={})
    reg.add_resource(dtype="wav", archive=None, name="fine", metadata={"a": 1})
    reg.close()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE resource SET metadata = ?, animal = ? WHERE name = 'odd'",
            (metadata_text, animal),
        )
    db.close()
    return EmbeddedRegistry(path)


DEEP = '{"a": ' * 5000 + "1" + "}" * 5000


def test_embedded_update_of_metadata_nested_too_deep_to_read_names_the_resource(
    tmp_path: Path,
) -> None:
    """Updating a record whose stored metadata is nested 5,000 deep is a RegistryError
    naming it, never a RecursionError; the record and the others are unchanged."""
    reg = _stored(tmp_path, DEEP)
    try:
        with pytest.raises(errors.RegistryError, match=r"resource 'odd'.*nested too deep"):
            reg.update_metadata("odd", {"b": 2})
        assert reg.update_metadata("fine", {"b": 2}).metadata == {"a": 1, "b": 2}
    finally:
        reg.close()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:
        [(stored,)] = db.execute("SELECT metadata FROM resource WHERE name = 'odd'")
    db.close()
    assert stored == DEEP


def test_embedded_record_with_an_animal_and_metadata_too_deep_is_read_naming_it(
    tmp_path: Path,
) -> None:
    """A record with an animal and metadata nested 5,000 deep is listed and read; its
    metadata is a RegistryError naming it, never a RecursionError."""
    reg = _stored(tmp_path, DEEP, animal="bird-7")
    try:
        assert sorted(r.name for r in reg.search()) == ["fine", "odd"]
        record = reg.get_resource("odd")
        assert record is not None and record.animal == "bird-7"
        with pytest.raises(errors.RegistryError, match=r"resource 'odd'.*nested too deep"):
            record.metadata  # noqa: B018
    finally:
        reg.close()


def test_embedded_update_of_metadata_stored_as_a_list_names_the_resource(tmp_path: Path) -> None:
    """Updating a record whose stored metadata is a list is a RegistryError naming it and
    what it holds, never a TypeError; the list is kept."""
    reg = _stored(tmp_path, "[1, 2, 3]")
    try:
        with pytest.raises(errors.RegistryError, match=r"resource 'odd'.*a list, not an object"):
            reg.update_metadata("odd", {"b": 2})
        assert reg.get_resource("odd").metadata == [1, 2, 3]  # type: ignore[union-attr]
    finally:
        reg.close()


# --- what metadata reaches django-neurobank ----------------------------------------------


@pytest.fixture
def server_dtype(request: pytest.FixtureRequest) -> Iterator[tuple[DjangoServer, str]]:
    """A datatype on the session's django server (``request.param``: the fixture's name),
    removed after with every resource of it."""
    server: DjangoServer = request.getfixturevalue(request.param)
    dtype = server.add_datatype()
    yield server, dtype
    server.shell(  # other tests list every record of the session's servers
        "from nbank_registry.models import DataType, Resource\n"
        f"Resource.objects.filter(dtype__name={dtype!r}).delete()\n"
        f"DataType.objects.filter(name={dtype!r}).delete()"
    )


@pytest.mark.parametrize("server_dtype", ["django_registry"], indirect=True)
@pytest.mark.parametrize("metadata", [[("rig", 3)], "rig=3", 3], ids=["pairs", "text", "number"])
def test_http_registry_refuses_metadata_that_is_not_an_object_sending_nothing(
    server_dtype: tuple[DjangoServer, str], metadata: Any
) -> None:
    """HttpRegistry.add_resource given a list of pairs, text or a number refuses it as
    the embedded registry does ("metadata must be a dictionary"); nothing is created."""
    server, dtype = server_dtype
    name = unique_name("nd")
    with HttpRegistry(server.url, server.auth) as reg:
        with pytest.raises(errors.RegistryRejected, match="metadata must be a dictionary"):
            reg.add_resource(dtype=dtype, archive=None, name=name, metadata=metadata)
        assert reg.get_resource(name) is None


@pytest.fixture
def registry_dtype(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Registry, str]]:
    """(a registry, a datatype of this test): a fresh embedded registry, or the session's
    django on PostgreSQL (``request.param``: embedded or django_registry_pg)."""
    yield from registry_with_dtype(request, request.param, tmp_path)


NUL_METADATA = {"take": {"note": "before\x00after"}}


@pytest.mark.parametrize("registry_dtype", ["embedded", "django_registry_pg"], indirect=True)
def test_metadata_holding_a_nul_is_refused_naming_the_key_before_it_is_sent(
    registry_dtype: tuple[Registry, str],
) -> None:
    """A new record whose metadata holds a NUL character is refused by either backend
    naming the key (django-neurobank on PostgreSQL answered 500), and not created."""
    reg, dtype = registry_dtype
    name = unique_name("nul")
    with pytest.raises(errors.RegistryRejected, match=r'metadata key "take\.note" holds a NUL'):
        reg.add_resource(dtype=dtype, archive=None, name=name, metadata=NUL_METADATA)
    assert reg.get_resource(name) is None


@pytest.mark.parametrize("registry_dtype", ["embedded", "django_registry_pg"], indirect=True)
def test_a_metadata_key_holding_a_nul_is_refused_in_an_update(
    registry_dtype: tuple[Registry, str],
) -> None:
    """An update setting a key that holds a NUL character is refused by either backend
    naming it; the record keeps its metadata."""
    reg, dtype = registry_dtype
    name = reg.add_resource(dtype=dtype, archive=None, name=unique_name("nul"), metadata={}).name
    with pytest.raises(errors.RegistryRejected, match=r"metadata key .*holds a NUL"):
        reg.update_metadata(name, {"bad\x00key": 1})
    assert reg.get_resource(name).metadata == {}  # type: ignore[union-attr]
