"""Hostile review of today's nbankctl and registry fixes (adf0a3f..5035565).

tape register / import / prune / check tar agreeing on which members are acceptable;
registry export's exit status; metadata
holding a NUL character across both backends and the export / import path.

Findings (13 strict xfails), all fixed since on branch ``tape``, markers removed:
tape register located, and check tar passed, members tape import refuses (absolute,
``..``, not UTF-8), so tape prune deleted the only copy (one rule now,
``nbankd.tape.member_problem``); the embedded registry stored a NUL in experimenter or
animal; search with a NUL filter was reported as an outage. (A finding that what
nbankctl said on stderr before its last line waits on a stderr nobody reads was
"fixed" by dropping stderr output after 2 s, then undone: that cut a report read
slowly, ``2>&1 | less``, short without a word; nbankctl's stderr is its report and
waits for its reader, as README says.)
"""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, base_env, make_backend, store
from fixtures.django_server import DjangoServer, unique_name
from fixtures.registry_dtype import registry_with_dtype
from nbankd import errors
from nbankd.migration import snapshot
from nbankd.registry.base import Registry
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry (nothing shared with other tests)."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A PAX tar of regular members (name, contents), names kept exactly as given."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    return path


def _tape_keys(b: Backend, id: str) -> list[str | None]:
    return [loc.key for loc in b.registry.get_locations(id) if loc.scheme == "tape"]


#: member names (the resource's id put in for ``{}``) tape import refuses, though
#: they hold no control character
IMPORT_REFUSES = {
    "absolute": "/{}.dat",
    "dotdot": "../{}.dat",
    "dotdot-inside": "sub/../{}.dat",
}


# --- tape register / prune / import / check tar: one verdict per member ----------------


@pytest.mark.parametrize("label", list(IMPORT_REFUSES))
def test_tape_register_locates_no_member_tape_import_refuses(embedded: Backend, label: str) -> None:
    """A member named absolute or with '..' (tape import refuses it) gets no tape location
    and the command exits 1."""
    _, arch = embedded.archive()
    data = embedded.blob(label)
    id = embedded.resource(data, arch)
    tar = _tar(embedded.tmp / "t.tar", [(IMPORT_REFUSES[label].format(id), data)])
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert _tape_keys(embedded, id) == [], proc.stderr
    assert proc.returncode == 1, proc.stderr


def test_prune_after_register_never_leaves_a_resource_that_import_cannot_restore(
    embedded: Backend,
) -> None:
    """register then prune then import from the same tar: the resource is still
    somewhere (kept locally, or restored by import)."""
    archive, arch = embedded.archive()
    data = embedded.blob("only")
    id = embedded.resource(data, arch)
    path = store(archive, id, data)
    tar = _tar(embedded.tmp / "t.tar", [(f"../{id}.dat", data)])
    embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    embedded.ctl("tape", "prune", arch, "-", input=id + "\n")
    restore, _ = embedded.archive("restore")
    proc = embedded.ctl("tape", "import", str(tar), str(restore.path), id)
    restored = restore.stored_path(id)
    assert path.exists() or restored is not None, proc.stderr


@pytest.mark.parametrize(
    "label,fmt",
    [
        ("control", "take\x1b[2J/{}.dat"),
        ("del", "take\x7f/{}.dat"),
        ("not-utf8", "\udcff/{}.dat"),
        ("absolute", "/{}.dat"),
        ("dotdot", "../{}.dat"),
    ],
)
def test_check_tar_does_not_pass_a_member_tape_import_refuses(
    embedded: Backend, label: str, fmt: str
) -> None:
    """check tar fails (exit 1) a registered member whose SHA-1 matches but that tape
    import would refuse to restore."""
    data = embedded.blob(label)
    id = embedded.resource(data, None)
    tar = _tar(embedded.tmp / "t.tar", [(fmt.format(id), data)])
    proc = embedded.ctl("check", "tar", str(tar))
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_tape_register_locates_no_member_named_with_bytes_that_are_not_utf8(
    embedded: Backend,
) -> None:
    """A member whose name is not UTF-8 (tape import refuses it) gets no tape location and
    the command exits 1 naming it escaped."""
    _, arch = embedded.archive()
    data = embedded.blob("raw")
    id = embedded.resource(data, arch)
    tar = _tar(embedded.tmp / "t.tar", [(f"\udcff/{id}.dat", data)])
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert proc.returncode == 1, proc.stderr
    assert _tape_keys(embedded, id) == []
    assert f"\\xff/{id}.dat" in proc.stderr


@pytest.mark.parametrize("odd", ["\u0085", "\u2028", "\u009b2J"])
def test_a_location_tape_register_records_is_one_tape_import_restores(
    embedded: Backend, odd: str
) -> None:
    """A member named with a C1 control or a Unicode line separator that register keys is
    one tape import restores from the same tar (they agree)."""
    _, arch = embedded.archive()
    data = embedded.blob("c1")
    id = embedded.resource(data, arch)
    name = f"take{odd}/{id}.dat"
    tar = _tar(embedded.tmp / "t.tar", [(name, data)])
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert proc.returncode == 0 and _tape_keys(embedded, id) == [name], proc.stderr
    assert odd not in proc.stderr  # shown escaped, as other names
    restore, _ = embedded.archive("restore")
    proc = embedded.ctl("tape", "import", str(tar), str(restore.path), id)
    assert proc.returncode == 0, proc.stderr
    restored = restore.stored_path(id)
    assert restored is not None and restored.read_bytes() == data


def test_tape_register_keys_the_clean_member_of_an_id_also_held_under_a_refused_name(
    embedded: Backend,
) -> None:
    """The same resource under a control-character name and a clean one: only the clean
    name is recorded as its key, and the command exits 1 for the other."""
    _, arch = embedded.archive()
    data = embedded.blob("twice")
    id = embedded.resource(data, arch)
    tar = _tar(embedded.tmp / "t.tar", [(f"bad\n/{id}.dat", data), (f"{id}.dat", data)])
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert proc.returncode == 1, proc.stderr
    assert _tape_keys(embedded, id) == [f"{id}.dat"]


# --- registry export: its exit status and its file ----------------------------------------


def _store_raw_metadata(b: Backend, name: str, metadata: object) -> None:
    """Writes a record's metadata as an older version could have stored it."""
    with sqlite3.connect(b.tmp / "state" / "registry.sqlite3") as db:
        db.execute("UPDATE resource SET metadata = ? WHERE name = ?", (json.dumps(metadata), name))
    db.close()


def test_a_clean_registry_export_exits_0(embedded: Backend) -> None:
    """An export that has nothing to warn of exits 0 and warns of nothing."""
    embedded.resource(b"a", None, name="clean", metadata={"take": ["x", {"y": 1}]})
    out = embedded.tmp / "export.jsonl"
    proc = embedded.ctl("registry", "export", "-o", str(out))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_registry_export_of_a_nested_nul_names_resource_and_key_and_keeps_every_record(
    embedded: Backend,
) -> None:
    """A stored record with a NUL deep in a list is warned of naming it and the key, the
    export exits 1, and the file holds it byte for byte and the others."""
    embedded.resource(b"odd", None, name="oddnul", metadata={})
    embedded.resource(b"fine", None, name="finenul", metadata={})
    metadata = {"takes": [{"note": "a\x00b"}]}
    _store_raw_metadata(embedded, "oddnul", metadata)
    out = embedded.tmp / "export.jsonl"
    proc = embedded.ctl("registry", "export", "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    [warning] = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert "'oddnul'" in warning and "takes" in warning and "NUL" in warning, warning
    records = {r.name: r.metadata for r in snapshot.load(out).resources}
    assert records == {"oddnul": metadata, "finenul": {}}


@pytest.fixture
def pg_cleanup(django_registry_pg: DjangoServer) -> Iterator[list[str]]:
    """Datatype names whose resources (and themselves) are removed from the session's
    PostgreSQL server after the test."""
    names: list[str] = []
    yield names
    django_registry_pg.shell(
        "from nbank_registry.models import DataType, Resource\n"
        f"Resource.objects.filter(dtype__name__in={names!r}).delete()\n"
        f"DataType.objects.filter(name__in={names!r}).delete()"
    )


def test_registry_import_of_an_export_holding_a_nul_creates_the_rest_naming_it(
    embedded: Backend, django_registry_pg: DjangoServer, pg_cleanup: list[str]
) -> None:
    """Importing onto PostgreSQL an export whose one record holds a NUL reports that one
    blocked naming it and the key, creates every other record, and exits 1."""
    dtype = unique_name("dtnul")
    pg_cleanup.append(dtype)
    embedded.registry.add_datatype(dtype, "application/octet-stream")
    odd, fine = unique_name("oddnul"), unique_name("finenul")
    embedded.registry.add_resource(dtype=dtype, archive=None, name=odd, metadata={})
    embedded.registry.add_resource(dtype=dtype, archive=None, name=fine, metadata={"k": 1})
    _store_raw_metadata(embedded, odd, {"deep": {"note": "a\x00b"}})
    out = embedded.tmp / "export.jsonl"
    embedded.ctl("registry", "export", "-o", str(out))
    pg_cleanup.append(embedded.dtype)
    django_registry_pg.write_netrc(embedded.tmp / "home" / ".netrc")
    proc = embedded.ctl("registry", "import", str(out), "--to", django_registry_pg.url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert odd in said and "deep.note" in said and "NUL" in said, said
    reg = HttpRegistry(django_registry_pg.url, django_registry_pg.auth)
    try:
        assert reg.get_resource(odd) is None
        assert reg.get_resource(fine).metadata == {"k": 1}  # type: ignore[union-attr]
    finally:
        reg.close()


# --- NUL in metadata: both backends, every way in ----------------------------------------


@pytest.fixture(params=["embedded", "django_registry_pg"])
def registry_dtype(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Registry, str]]:
    """(a registry, a datatype of this test): a fresh embedded one, or the session's
    django on PostgreSQL (its records of this datatype removed after)."""
    yield from registry_with_dtype(request, request.param, tmp_path)


@pytest.mark.parametrize(
    "metadata,key",
    [
        ({"takes": ["ok", "a\x00b"]}, "takes"),
        ({"a": [{"b\x00c": 1}]}, "a"),
    ],
)
def test_a_nul_anywhere_is_refused_by_both_backends_naming_the_key(
    registry_dtype: tuple[Registry, str], metadata: dict[str, object], key: str
) -> None:
    """A NUL in a list item or a nested key is refused by either backend as a rejection
    naming the key; nothing is created."""
    reg, dtype = registry_dtype
    name = unique_name("nul")
    with pytest.raises(errors.RegistryRejected, match=key):
        reg.add_resource(dtype=dtype, archive=None, name=name, metadata=metadata)
    assert reg.get_resource(name) is None


@pytest.mark.parametrize("key", ["experimenter", "animal"])
def test_the_embedded_registry_refuses_a_nul_in_experimenter_or_animal_as_django_does(
    tmp_path: Path, key: str
) -> None:
    """An experimenter or animal holding a NUL is refused by the embedded registry naming
    the key, as HttpRegistry refuses it; nothing is created."""
    reg = EmbeddedRegistry(tmp_path / "registry.sqlite3")
    try:
        dtype = reg.add_datatype("wav", "audio/wav", "wav").name
        with pytest.raises(errors.RegistryRejected, match=key):
            reg.add_resource(dtype=dtype, archive=None, name="nul", metadata={key: "x\x00y"})
        assert reg.get_resource("nul") is None
    finally:
        reg.close()


@pytest.mark.parametrize("key", ["experimenter", "animal"])
def test_the_embedded_registry_refuses_a_nul_in_experimenter_or_animal_on_update(
    tmp_path: Path, key: str
) -> None:
    """A metadata update setting an experimenter or animal holding a NUL is refused
    naming the key; the record keeps what it had."""
    reg = EmbeddedRegistry(tmp_path / "registry.sqlite3")
    try:
        dtype = reg.add_datatype("wav", "audio/wav", "wav").name
        reg.add_resource(dtype=dtype, archive=None, name="r", metadata={key: "xy", "k": 1})
        with pytest.raises(errors.RegistryRejected, match=key):
            reg.update_metadata("r", {key: "x\x00y", "k": 2})
        assert reg.get_resource("r").metadata == {key: "xy", "k": 1}  # type: ignore[union-attr]
    finally:
        reg.close()


def test_http_registry_refuses_a_nul_in_experimenter_before_it_is_sent(
    django_registry_pg: DjangoServer,
) -> None:
    """HttpRegistry refuses an experimenter holding a NUL naming the key (no 500 from
    PostgreSQL); nothing is created."""
    reg = HttpRegistry(django_registry_pg.url, django_registry_pg.auth)
    name = unique_name("nul")
    try:
        with pytest.raises(errors.RegistryRejected, match="experimenter"):
            reg.add_resource(
                dtype="no-such-dtype", archive=None, name=name, metadata={"experimenter": "x\x00"}
            )
        assert reg.get_resource(name) is None
    finally:
        reg.close()


@pytest.fixture
def pg_backend(tmp_path: Path, django_registry_pg: DjangoServer) -> Iterator[Backend]:
    """nbankctl pointed at the session's django-neurobank on PostgreSQL; this test's
    datatype and its records removed after."""
    env = base_env(tmp_path / "home")
    django_registry_pg.write_netrc(tmp_path / "home" / ".netrc")
    env["NBANKD_CONFIG"] = str(tmp_path / "no-such-config.yaml")
    registry = HttpRegistry(django_registry_pg.url, django_registry_pg.auth)
    url = django_registry_pg.url
    b = Backend("django", tmp_path, registry, env, ["-r", url], url=url)
    b.dtype = django_registry_pg.add_datatype()
    try:
        yield b
    finally:
        b.registry.close()
        django_registry_pg.shell(
            "from nbank_registry.models import DataType, Resource\n"
            f"Resource.objects.filter(dtype__name={b.dtype!r}).delete()\n"
            f"DataType.objects.filter(name={b.dtype!r}).delete()"
        )


def test_nbankctl_modify_with_a_nul_on_postgresql_is_refused_naming_the_key(
    pg_backend: Backend,
) -> None:
    """modify -k with a NUL value on PostgreSQL exits 1 naming the key (not 3, an
    outage), and the record keeps its metadata."""
    id = pg_backend.resource(b"m", None, metadata={"keep": 1})
    proc = pg_backend.ctl("modify", id, "-k", 'note="a\\u0000b"')
    assert proc.returncode == 1, proc.stderr
    assert "note" in proc.stderr and "NUL" in proc.stderr, proc.stderr
    assert pg_backend.registry.get_resource(id).metadata == {"keep": 1}  # type: ignore[union-attr]


def test_nbankctl_search_for_a_nul_value_on_postgresql_is_not_taken_for_an_outage(
    pg_backend: Backend,
) -> None:
    """search -k with a NUL value on PostgreSQL finds nothing or is refused (exit 0, 1 or
    2), never reported as the registry out of reach (exit 3)."""
    pg_backend.resource(b"s", None, metadata={"note": "ab"})
    proc = pg_backend.ctl("search", "-d", pg_backend.dtype, "-k", 'note="a\\u0000b"')
    assert proc.returncode in (0, 1, 2), proc.stdout + proc.stderr


@pytest.mark.parametrize("option", ["-k", "-K"])
def test_nbankctl_search_refuses_a_nul_filter_naming_the_key(
    embedded: Backend, option: str
) -> None:
    """search -k / -K with a NUL value is a usage error naming the option and key."""
    embedded.resource(b"s", None, metadata={"note": "ab"})
    proc = embedded.ctl("search", "-d", embedded.dtype, option, 'note="a\\u0000b"')
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{option} note:" in proc.stderr and "NUL" in proc.stderr, proc.stderr
