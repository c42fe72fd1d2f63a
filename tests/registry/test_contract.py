"""One contract: the embedded SQLite registry behaves like django-neurobank.

Every test runs against three backends: the embedded registry, and django-neurobank
on SQLite (``django``) and on PostgreSQL (``django-pg``). The django servers are
shared by the session, so each test makes its own uniquely named datatype and
archive (``ctx``) and scopes its searches by them; nothing counts global totals.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures.django_server import DjangoServer, unique_name
from nbankd import errors
from nbankd.registry.base import LocationRecord, Registry, ResourceRecord
from nbankd.registry.http import HttpRegistry

AUTO_ID = re.compile(r"^[0-9a-z]{8}$")


def new_sha1() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


#: the django-neurobank session fixture behind each server backend
SERVERS = {"django": "django_registry", "django-pg": "django_registry_pg"}


@pytest.fixture(params=["embedded", *SERVERS])
def server(request: pytest.FixtureRequest) -> DjangoServer | None:
    """The session's django-neurobank on SQLite or on PostgreSQL; None for embedded."""
    if request.param == "embedded":
        return None
    found: DjangoServer = request.getfixturevalue(SERVERS[request.param])
    return found


@pytest.fixture
def registry(server: DjangoServer | None, tmp_path: Path) -> Iterator[Registry]:
    """A registry of each backend: a fresh embedded database, or a session's django."""
    reg: Registry
    if server is None:
        from nbankd.registry.embedded import EmbeddedRegistry

        reg = EmbeddedRegistry(tmp_path / "registry.sqlite3", url=None)
    else:
        reg = HttpRegistry(server.url, (server.username, server.password))
    try:
        yield reg
    finally:
        reg.close()


def is_django(reg: Registry) -> bool:
    return reg.backend == "http"


@dataclass(frozen=True)
class Ctx:
    reg: Registry
    dtype: str
    archive: str
    root: Path

    def add(self, **kw: Any) -> ResourceRecord:
        kw.setdefault("dtype", self.dtype)
        kw.setdefault("archive", self.archive)
        return self.reg.add_resource(**kw)

    def names(self, **filters: str) -> list[str]:
        return [r.name for r in self.reg.search(dtype=self.dtype, **filters)]


@pytest.fixture
def ctx(registry: Registry, tmp_path: Path) -> Ctx:
    """A fresh datatype and archive on the registry under test."""
    dtype = registry.add_datatype(unique_name("dt"), "application/octet-stream").name
    root = tmp_path / "archive"
    root.mkdir()
    archive = registry.add_archive(unique_name("ar"), "neurobank", str(root)).name
    return Ctx(registry, dtype, archive, root)


@pytest.fixture
def experimenter(server: DjangoServer | None) -> str:
    """A username the registry accepts as experimenter (django: an existing user)."""
    return server.reader_username if server is not None else "dmeliza"


@pytest.fixture
def animal(server: DjangoServer | None) -> str:
    """An animal the registry accepts (django: a row of its Animal table)."""
    return server.add_animal() if server is not None else unique_name("bird")


# --- identity and basics -------------------------------------------------------------


def test_backend_and_url(registry: Registry) -> None:
    """Each backend names itself, and its URL ends with a slash."""
    assert registry.backend == ("http" if is_django(registry) else "embedded")
    assert registry.url.endswith("/")


def test_resource_url_format(registry: Registry) -> None:
    """resource_url is <url>resources/<name>/."""
    assert registry.resource_url("abc123") == registry.url + "resources/abc123/"


def test_add_resource_returns_record(ctx: Ctx) -> None:
    """A new resource comes back with its name, dtype, lowercase sha1 and location."""
    name, sha1 = unique_name("r"), new_sha1()
    rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive, name=name, sha1=sha1.upper())
    assert (rec.name, rec.dtype, rec.sha1, rec.locations) == (name, ctx.dtype, sha1, (ctx.archive,))
    assert ctx.reg.get_resource(name) == rec


def test_resource_without_metadata_has_null_metadata(ctx: Ctx) -> None:
    """A resource registered without metadata has metadata None and no experimenter."""
    rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive, name=unique_name("r"))
    assert (rec.metadata, rec.experimenter, rec.animal, rec.sha1) == (None, None, None, None)


def test_add_resource_without_archive(ctx: Ctx) -> None:
    """archive=None registers a resource with no location."""
    rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=None, name=unique_name("r"))
    assert rec.locations == ()


def test_auto_id(ctx: Ctx) -> None:
    """Without a name the registry picks 8 lowercase base-36 characters."""
    rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive)
    assert AUTO_ID.match(rec.name), rec.name
    assert ctx.reg.get_resource(rec.name) == rec


def test_get_resource_unknown_is_none(registry: Registry) -> None:
    """get_resource gives None for an unknown or impossible name."""
    assert registry.get_resource(unique_name("missing")) is None
    assert registry.get_resource("no such/name") is None


# --- uniqueness and validation --------------------------------------------------------


def test_name_taken(ctx: Ctx) -> None:
    """A second resource with the same name is NameTaken."""
    name = unique_name("r")
    ctx.add(name=name)
    with pytest.raises(errors.NameTaken):
        ctx.add(name=name)


def test_sha1_taken(ctx: Ctx) -> None:
    """A second resource with the same sha1 is Sha1Taken."""
    sha1 = new_sha1()
    ctx.add(sha1=sha1)
    with pytest.raises(errors.Sha1Taken):
        ctx.add(sha1=sha1)


def test_sha1_taken_case_insensitive(ctx: Ctx) -> None:
    """sha1 uniqueness ignores case."""
    sha1 = new_sha1()
    ctx.add(sha1=sha1.upper())
    with pytest.raises(errors.Sha1Taken):
        ctx.add(sha1=sha1.lower())


def test_several_null_sha1(ctx: Ctx) -> None:
    """Any number of resources may have no sha1."""
    a = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive)
    b = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive)
    assert a.sha1 is None and b.sha1 is None and a.name != b.name


def test_invalid_sha1_rejected(ctx: Ctx) -> None:
    """A sha1 that is not 40 hex digits is rejected."""
    with pytest.raises(errors.RegistryRejected) as exc:
        ctx.add(sha1="not-a-sha1")
    assert "sha1" in exc.value.fields


@pytest.mark.parametrize(
    "name", ["has space", "tilde~name", "caf\u00e9", "a" * 256, "dot.ted"], ids=repr
)
def test_invalid_name(ctx: Ctx, name: str) -> None:
    """Names break the slug rule (spaces, '~', unicode, '.', over 255 chars): InvalidName."""
    with pytest.raises(errors.InvalidName):
        ctx.add(name=name)


def test_name_of_255_chars_allowed(ctx: Ctx) -> None:
    """A 255-character slug is a valid name."""
    name = (unique_name("long") + "x" * 255)[:255]
    assert ctx.add(name=name).name == name


def test_unknown_dtype(ctx: Ctx) -> None:
    """A resource's dtype must exist: UnknownDatatype."""
    with pytest.raises(errors.UnknownDatatype):
        ctx.add(dtype=unique_name("nodt"))


def test_unknown_archive(ctx: Ctx) -> None:
    """A resource's location archive must exist: UnknownArchive."""
    with pytest.raises(errors.UnknownArchive):
        ctx.add(archive=unique_name("noar"))


def test_rejected_resource_not_registered(ctx: Ctx) -> None:
    """A rejected registration leaves no record behind."""
    name = unique_name("r")
    with pytest.raises(errors.UnknownArchive):
        ctx.add(name=name, archive=unique_name("noar"))
    assert ctx.reg.get_resource(name) is None


# --- datatypes and archives -----------------------------------------------------------


def test_datatype_listed(registry: Registry) -> None:
    """A new datatype is listed with its content type."""
    name = unique_name("dt")
    dt = registry.add_datatype(name, "audio/wav")
    assert dt.name == name and dt.content_type == "audio/wav"
    assert dt in registry.list_datatypes()


def test_datatype_taken(registry: Registry) -> None:
    """A datatype name is unique: DatatypeTaken."""
    name = unique_name("dt")
    registry.add_datatype(name)
    with pytest.raises(errors.DatatypeTaken):
        registry.add_datatype(name)


def test_archive_name_taken(ctx: Ctx, tmp_path: Path) -> None:
    """An archive name is unique: ArchiveTaken."""
    with pytest.raises(errors.ArchiveTaken):
        ctx.reg.add_archive(ctx.archive, "neurobank", str(tmp_path / "other"))


def test_archive_root_taken(ctx: Ctx) -> None:
    """(scheme, root) is unique: ArchiveTaken."""
    with pytest.raises(errors.ArchiveTaken):
        ctx.reg.add_archive(unique_name("ar"), "neurobank", str(ctx.root))


def test_archive_same_root_other_scheme(ctx: Ctx) -> None:
    """The same root under another scheme is a different archive."""
    rec = ctx.reg.add_archive(unique_name("ar"), "tape", str(ctx.root))
    assert (rec.scheme, rec.root, rec.accessibility) == ("tape", str(ctx.root), "local")


def test_get_archive(ctx: Ctx) -> None:
    """get_archive returns the record, or None for an unknown name."""
    rec = ctx.reg.get_archive(ctx.archive)
    assert rec is not None and (rec.name, rec.scheme, rec.root) == (
        ctx.archive,
        "neurobank",
        str(ctx.root),
    )
    assert ctx.reg.get_archive(unique_name("noar")) is None


def test_list_archives(ctx: Ctx) -> None:
    """list_archives includes a registered archive."""
    assert ctx.archive in [a.name for a in ctx.reg.list_archives()]


def test_find_archive_by_root(ctx: Ctx) -> None:
    """find_archive_by_root matches (scheme, root) as written."""
    found = ctx.reg.find_archive_by_root(str(ctx.root))
    assert found is not None and found.name == ctx.archive
    assert ctx.reg.find_archive_by_root(str(ctx.root), scheme="tape") is None
    assert ctx.reg.find_archive_by_root(str(ctx.root / "sub")) is None


def test_find_archive_by_root_never_answers_another_folder_differing_in_case(ctx: Ctx) -> None:
    """A root differing only in case names the archive only when it is the same folder
    here (as on a filesystem ignoring case), never another folder."""
    other = ctx.root.parent / "ARCHIVE"
    other.mkdir()
    assert ctx.reg.find_archive_by_root(str(other)) is None
    upper = ctx.reg.add_archive(unique_name("up"), "neurobank", str(other))
    assert ctx.reg.find_archive_by_root(str(other)) == upper
    found = ctx.reg.find_archive_by_root(str(ctx.root))
    assert found is not None and found.name == ctx.archive
    alias = ctx.root.parent / "Archive"  # the same folder under a name in other case
    alias.symlink_to(ctx.root)
    found = ctx.reg.find_archive_by_root(str(alias))
    assert found is not None and found.name == ctx.archive


def test_find_archive_by_root_of_a_tape_is_exact(registry: Registry) -> None:
    """A tape's root differing only in case is another tape."""
    tape = unique_name("tp")
    registry.add_archive(unique_name("ar"), "tape", f"{tape}:1", "offline")
    assert registry.find_archive_by_root(f"{tape}:1", scheme="tape") is not None
    assert registry.find_archive_by_root(f"{tape.upper()}:1", scheme="tape") is None


def test_archive_accessibility(registry: Registry, tmp_path: Path) -> None:
    """An archive keeps its accessibility."""
    rec = registry.add_archive(unique_name("ar"), "tape", str(tmp_path / "t"), "offline")
    assert rec.accessibility == "offline"
    assert registry.get_archive(rec.name) == rec


# --- metadata -------------------------------------------------------------------------


def test_metadata_stored(ctx: Ctx) -> None:
    """Metadata given at registration comes back on read."""
    name = unique_name("r")
    ctx.add(name=name, metadata={"rig": "rig3", "site": 3, "nested": {"a": [1, 2]}})
    rec = ctx.reg.get_resource(name)
    assert rec is not None and rec.metadata == {"rig": "rig3", "site": 3, "nested": {"a": [1, 2]}}


def test_metadata_null_kept_on_create(ctx: Ctx) -> None:
    """A null value given at registration is stored as null (deleting is for updates)."""
    rec = ctx.reg.add_resource(
        dtype=ctx.dtype, archive=ctx.archive, name=unique_name("r"), metadata={"a": None}
    )
    assert rec.metadata == {"a": None}


def test_update_metadata_merges(ctx: Ctx) -> None:
    """update_metadata merges keys into the existing metadata."""
    name = unique_name("r")
    ctx.add(name=name, metadata={"a": 1, "b": 2})
    rec = ctx.reg.update_metadata(name, {"b": 3, "c": "x"})
    assert rec.metadata == {"a": 1, "b": 3, "c": "x"}
    assert ctx.reg.get_resource(name) == rec


def test_update_metadata_null_deletes(ctx: Ctx) -> None:
    """update_metadata with a None value deletes the key (absent keys are ignored)."""
    name = unique_name("r")
    ctx.add(name=name, metadata={"a": 1, "b": 2})
    rec = ctx.reg.update_metadata(name, {"a": None, "zz": None})
    assert rec.metadata == {"b": 2}


def test_update_metadata_on_null_metadata(ctx: Ctx) -> None:
    """Updating a record without metadata gives a dict, even if only deleting."""
    name = unique_name("r")
    ctx.add(name=name)
    assert ctx.reg.update_metadata(name, {"a": None}).metadata == {}


def test_update_metadata_unknown(registry: Registry) -> None:
    """update_metadata on an unknown resource is NotFound."""
    with pytest.raises(errors.NotFound):
        registry.update_metadata(unique_name("missing"), {"a": 1})


def test_experimenter_moved_to_field(ctx: Ctx, experimenter: str) -> None:
    """experimenter in metadata becomes the field and is copied back into metadata."""
    rec = ctx.reg.add_resource(
        dtype=ctx.dtype,
        archive=ctx.archive,
        name=unique_name("r"),
        metadata={"experimenter": experimenter, "rig": "r1"},
    )
    assert rec.experimenter == experimenter
    assert rec.metadata == {"experimenter": experimenter, "rig": "r1"}


def test_animal_moved_to_field(ctx: Ctx, animal: str) -> None:
    """animal in metadata becomes the field and is copied back into metadata."""
    name = unique_name("r")
    ctx.add(name=name, metadata={"animal": animal})
    rec = ctx.reg.get_resource(name)
    assert rec is not None and rec.animal == animal and rec.metadata == {"animal": animal}


def test_experimenter_cleared_by_null(ctx: Ctx, experimenter: str) -> None:
    """update_metadata with experimenter None clears the field."""
    name = unique_name("r")
    ctx.add(name=name, metadata={"experimenter": experimenter, "rig": "r1"})
    rec = ctx.reg.update_metadata(name, {"experimenter": None})
    assert rec.experimenter is None and rec.metadata == {"rig": "r1"}


def test_unknown_experimenter(ctx: Ctx) -> None:
    """django rejects an unknown experimenter (InvalidUser); embedded stores it as given."""
    nobody = unique_name("nobody")
    if is_django(ctx.reg):
        with pytest.raises(errors.InvalidUser):
            ctx.add(metadata={"experimenter": nobody})
    else:  # documented difference: the embedded registry has no user table
        rec = ctx.reg.add_resource(
            dtype=ctx.dtype, archive=ctx.archive, metadata={"experimenter": nobody}
        )
        assert rec.experimenter == nobody


def test_unknown_animal(ctx: Ctx) -> None:
    """django rejects an unknown animal (InvalidUser); embedded stores it as given."""
    bird = unique_name("nobird")
    if is_django(ctx.reg):
        with pytest.raises(errors.InvalidUser):
            ctx.add(metadata={"animal": bird})
    else:  # documented difference: the embedded registry has no animal table
        rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive, metadata={"animal": bird})
        assert rec.animal == bird


# --- bulk reads -----------------------------------------------------------------------


def test_get_resources_omits_unknown(ctx: Ctx) -> None:
    """get_resources returns the known names' records and omits unknown ones."""
    made = [ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive) for _ in range(3)]
    got = ctx.reg.get_resources([m.name for m in made] + [unique_name("missing")])
    assert sorted(got, key=lambda r: r.name) == sorted(made, key=lambda r: r.name)


def test_get_resources_empty(registry: Registry) -> None:
    """get_resources of no names is an empty list."""
    assert registry.get_resources([]) == []


def test_get_locations_bulk(ctx: Ctx) -> None:
    """get_locations_bulk maps each known name to its locations, omitting unknown names."""
    a = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive, name=unique_name("r"))
    b = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive, name=unique_name("r"))
    got = ctx.reg.get_locations_bulk([a.name, b.name, unique_name("missing")])
    assert set(got) == {a.name, b.name}
    loc = got[a.name]
    assert loc == [LocationRecord(ctx.archive, "neurobank", str(ctx.root), a.name, None)]


def test_get_locations_bulk_omits_unlocated(ctx: Ctx) -> None:
    """get_locations_bulk omits a known resource that has no location (as django does)."""
    a = ctx.add(name=unique_name("r"), archive=None).name
    assert ctx.reg.get_locations_bulk([a]) == {}


# --- locations ------------------------------------------------------------------------


def test_get_locations(ctx: Ctx) -> None:
    """get_locations gives the archive's scheme, root and the key."""
    name = unique_name("r")
    ctx.add(name=name, key="tape/member-1")
    assert ctx.reg.get_locations(name) == [
        LocationRecord(ctx.archive, "neurobank", str(ctx.root), name, "tape/member-1")
    ]


def test_get_locations_unknown(registry: Registry) -> None:
    """get_locations of an unknown resource is NotFound."""
    with pytest.raises(errors.NotFound):
        registry.get_locations(unique_name("missing"))


def test_add_location(ctx: Ctx, tmp_path: Path) -> None:
    """add_location adds a second archive to a resource."""
    name = unique_name("r")
    ctx.add(name=name)
    other = ctx.reg.add_archive(unique_name("ar"), "tape", str(tmp_path / "tape"), "offline")
    loc = ctx.reg.add_location(name, other.name, key="7:member")
    assert loc == LocationRecord(other.name, "tape", str(tmp_path / "tape"), name, "7:member")
    rec = ctx.reg.get_resource(name)
    assert rec is not None and set(rec.locations) == {ctx.archive, other.name}


def test_location_taken(ctx: Ctx) -> None:
    """A resource has at most one location per archive: LocationTaken."""
    name = unique_name("r")
    ctx.add(name=name)
    with pytest.raises(errors.LocationTaken):
        ctx.reg.add_location(name, ctx.archive)


def test_add_location_unknown_archive(ctx: Ctx) -> None:
    """add_location to an unknown archive is UnknownArchive."""
    name = unique_name("r")
    ctx.add(name=name)
    with pytest.raises(errors.UnknownArchive):
        ctx.reg.add_location(name, unique_name("noar"))


def test_add_location_unknown_resource(ctx: Ctx) -> None:
    """add_location for an unknown resource is NotFound."""
    with pytest.raises(errors.NotFound):
        ctx.reg.add_location(unique_name("missing"), ctx.archive)


def test_remove_location(ctx: Ctx) -> None:
    """remove_location removes the resource from the archive."""
    name = unique_name("r")
    ctx.add(name=name)
    ctx.reg.remove_location(name, ctx.archive)
    assert ctx.reg.get_locations(name) == []
    rec = ctx.reg.get_resource(name)
    assert rec is not None and rec.locations == ()


def test_set_location_key(ctx: Ctx, tmp_path: Path) -> None:
    """set_location_key gives an existing location a key, in place."""
    name = unique_name("r")
    ctx.add(name=name)
    tape = ctx.reg.add_archive(unique_name("ar"), "tape", str(tmp_path / "tape"), "offline")
    ctx.reg.add_location(name, tape.name)
    loc = ctx.reg.set_location_key(name, tape.name, "resources/ab/member.wav")
    assert loc == LocationRecord(tape.name, "tape", str(tmp_path / "tape"), name, loc.key)
    assert loc.key == "resources/ab/member.wav"
    [again] = [x for x in ctx.reg.get_locations(name) if x.archive_name == tape.name]
    assert again.key == "resources/ab/member.wav"


def test_set_location_key_taken_by_another_resource(ctx: Ctx, tmp_path: Path) -> None:
    """A key another resource's location in that archive holds is refused; nothing changes."""
    first, second = unique_name("r"), unique_name("r")
    ctx.add(name=first)
    ctx.add(name=second)
    tape = ctx.reg.add_archive(unique_name("ar"), "tape", str(tmp_path / "tape"), "offline")
    ctx.reg.add_location(first, tape.name, key="resources/k")
    ctx.reg.add_location(second, tape.name)
    with pytest.raises(errors.RegistryRejected):
        ctx.reg.set_location_key(second, tape.name, "resources/k")
    [loc] = [x for x in ctx.reg.get_locations(second) if x.archive_name == tape.name]
    assert loc.key is None


def test_set_key_of_a_missing_location(ctx: Ctx) -> None:
    """Setting the key of a location that does not exist is NotFound."""
    name = unique_name("r")
    ctx.add(name=name, archive=None)
    with pytest.raises(errors.NotFound):
        ctx.reg.set_location_key(name, ctx.archive, "k")


def test_remove_missing_location(ctx: Ctx) -> None:
    """Removing a location that does not exist is NotFound."""
    name = unique_name("r")
    ctx.add(name=name, archive=None)
    with pytest.raises(errors.NotFound):
        ctx.reg.remove_location(name, ctx.archive)


# --- search ---------------------------------------------------------------------------


def test_search_by_name_substring(ctx: Ctx) -> None:
    """name= matches a substring of the name, case-insensitively."""
    token = uuid.uuid4().hex[:10]
    a = ctx.add(name=f"x-{token}-a").name
    ctx.add(name=unique_name("other"))
    assert [r.name for r in ctx.reg.search(name=token.upper())] == [a]


def test_search_by_dtype_substring(ctx: Ctx) -> None:
    """dtype= matches a substring of the datatype name."""
    a = ctx.add(name=unique_name("r")).name
    assert [r.name for r in ctx.reg.search(dtype=ctx.dtype[2:])] == [a]


def test_search_by_archive_exact(ctx: Ctx, tmp_path: Path) -> None:
    """archive= matches the archive name exactly."""
    longer = ctx.reg.add_archive(ctx.archive + "x", "neurobank", str(tmp_path / "x")).name
    a = ctx.add(name=unique_name("r")).name
    ctx.add(name=unique_name("r"), archive=longer)
    assert [r.name for r in ctx.reg.search(archive=ctx.archive)] == [a]
    assert list(ctx.reg.search(archive=ctx.archive[:-1])) == []


def test_search_by_location_substring(ctx: Ctx) -> None:
    """location= matches a substring of an archive name."""
    a = ctx.add(name=unique_name("r")).name
    ctx.add(name=unique_name("r"), archive=None)
    assert ctx.names(location=ctx.archive[3:]) == [a]


def test_search_by_scheme(ctx: Ctx, tmp_path: Path) -> None:
    """scheme= matches the scheme of a location's archive."""
    scheme = unique_name("s", 16)
    other = ctx.reg.add_archive(unique_name("ar"), scheme, str(tmp_path / "s")).name
    a = ctx.add(name=unique_name("r"), archive=other).name
    ctx.add(name=unique_name("r"))
    assert ctx.names(scheme=scheme) == [a]


def test_search_by_sha1(ctx: Ctx) -> None:
    """sha1= matches exactly, case-insensitively."""
    sha1 = new_sha1()
    a = ctx.add(sha1=sha1).name
    ctx.add(sha1=new_sha1())
    assert [r.name for r in ctx.reg.search(sha1=sha1.upper())] == [a]
    assert list(ctx.reg.search(sha1=sha1[:20])) == []


def test_search_by_experimenter(ctx: Ctx, experimenter: str) -> None:
    """experimenter= matches the experimenter field."""
    a = ctx.add(name=unique_name("r"), metadata={"experimenter": experimenter}).name
    ctx.add(name=unique_name("r"))
    assert ctx.names(experimenter=experimenter) == [a]


def test_search_metadata_experimenter(ctx: Ctx, experimenter: str) -> None:
    """metadata__experimenter= searches the experimenter field."""
    a = ctx.add(name=unique_name("r"), metadata={"experimenter": experimenter}).name
    ctx.add(name=unique_name("r"), metadata={"rig": "x"})
    assert ctx.names(metadata__experimenter=experimenter) == [a]


def test_search_by_animal(ctx: Ctx, animal: str) -> None:
    """animal= matches the animal field."""
    a = ctx.add(name=unique_name("r"), metadata={"animal": animal}).name
    ctx.add(name=unique_name("r"))
    assert ctx.names(animal=animal) == [a]


def test_search_metadata_number(ctx: Ctx) -> None:
    """metadata__K=3 matches the number 3 (values parse as JSON), not the string "3"."""
    num = ctx.add(name=unique_name("r"), metadata={"site": 3}).name
    text = ctx.add(name=unique_name("r"), metadata={"site": "3"}).name
    assert ctx.names(metadata__site="3") == [num]
    assert ctx.names(metadata__site='"3"') == [text]


def test_search_metadata_string(ctx: Ctx) -> None:
    """metadata__K=text matches a string value exactly."""
    a = ctx.add(name=unique_name("r"), metadata={"rig": "rig3"}).name
    ctx.add(name=unique_name("r"), metadata={"rig": "rig33"})
    assert ctx.names(metadata__rig="rig3") == [a]


def test_search_metadata_neq(ctx: Ctx) -> None:
    """metadata__K__neq drops the value and, as django does, metadata lacking the key.

    django-neurobank 0.12 (SQL NULL logic) keeps records whose metadata is null but
    drops those whose metadata lacks the key; the embedded registry does the same.
    """
    ctx.add(name="a-" + unique_name("r"), metadata={"site": 3})
    b = ctx.add(name="b-" + unique_name("r"), metadata={"site": 4}).name
    ctx.add(name="c-" + unique_name("r"), metadata={"other": 1})
    d = ctx.add(name="d-" + unique_name("r")).name
    assert ctx.names(metadata__site__neq="3") == [b, d]


def test_search_metadata_isnull(ctx: Ctx) -> None:
    """metadata__K__isnull=true finds records without the key; false those with it."""
    a = ctx.add(name="a-" + unique_name("r"), metadata={"site": 3}).name
    b = ctx.add(name="b-" + unique_name("r"), metadata={"rig": 1}).name
    c = ctx.add(name="c-" + unique_name("r")).name
    assert ctx.names(metadata__site__isnull="true") == [b, c]
    assert ctx.names(metadata__site__isnull="False") == [a]


def test_search_metadata_isnull_bad_value(ctx: Ctx) -> None:
    """metadata__K__isnull with a value other than true/false/1/0 is rejected."""
    with pytest.raises(errors.RegistryRejected):
        ctx.names(metadata__site__isnull="maybe")


def test_search_created_on_year(ctx: Ctx) -> None:
    """created_on__year matches the year the resource was registered."""
    rec = ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive)
    assert rec.created_on is not None
    year = int(rec.created_on[:4])
    assert ctx.names(created_on__year=str(year)) == [rec.name]
    assert ctx.names(created_on__year=str(year - 1)) == []


def test_search_combines_filters(ctx: Ctx) -> None:
    """Several filters are combined with AND."""
    a = ctx.add(name=unique_name("r"), metadata={"site": 1, "rig": "x"}).name
    ctx.add(name=unique_name("r"), metadata={"site": 1, "rig": "y"})
    ctx.add(name=unique_name("r"), metadata={"site": 2, "rig": "x"})
    assert ctx.names(metadata__site="1", metadata__rig="x") == [a]


def test_search_ordered_by_name(ctx: Ctx) -> None:
    """Search results come in name order, not registration order."""
    base = unique_name("r")
    for suffix in ("c", "a", "d", "b"):
        ctx.add(name=f"{base}-{suffix}")
    assert ctx.names() == [f"{base}-{s}" for s in "abcd"]


def test_search_paginates(ctx: Ctx) -> None:
    """A search over more than one page (100) returns every record once, in order."""
    made = [ctx.reg.add_resource(dtype=ctx.dtype, archive=ctx.archive).name for _ in range(150)]
    assert ctx.names(archive=ctx.archive) == sorted(made)
