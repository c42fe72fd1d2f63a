"""Behaviour of the embedded registry that the django server has no counterpart for:
concurrency, the database file, its URL and schema, and search edge cases beyond the
contract suite (tests/registry/test_contract.py)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.registry import Registry
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.embedded_rules import CHUNK
from nbankd.registry.embedded_schema import SCHEMA_VERSION

AUTO_ID = re.compile(r"^[0-9a-z]{8}$")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.sqlite3"


@pytest.fixture
def reg(db: Path) -> Iterator[EmbeddedRegistry]:
    """An embedded registry with datatype 'wav' (extension wav) and archives a1, a2."""
    with EmbeddedRegistry(db) as r:
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        r.add_archive("a2", "tape", "/tapes/a2")
        yield r


def names(reg: EmbeddedRegistry, **filters: object) -> list[str]:
    return [r.name for r in reg.search(**filters)]  # type: ignore[arg-type]


# --- concurrency -----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, sys
    from nbankd import errors
    from nbankd.registry.embedded import EmbeddedRegistry

    db, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reg = EmbeddedRegistry(db, busy_timeout=60)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go once every worker is ready
    won, taken = [], 0
    for i in range(count):
        reg.add_resource(dtype="wav", archive="a1", name=f"{tag}-{i}")
        try:
            won.append(reg.add_resource(dtype="wav", archive="a1", name=f"shared-{i}").name)
        except errors.NameTaken:
            taken += 1
        reg.add_resource(dtype="wav", archive=None)
    print(json.dumps({"won": won, "taken": taken}), flush=True)
    """
)


def test_two_processes_add_resources_at_once(reg: EmbeddedRegistry, db: Path) -> None:
    """Two processes writing at once: every record lands, contested names go to exactly one."""
    count = 60
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(db), tag, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p1", "p2")
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err  # a "database is locked" would end up here
        results.append(json.loads(out))
    won = [n for r in results for n in r["won"]]
    assert sorted(won) == sorted(f"shared-{i}" for i in range(count))
    assert sum(r["taken"] for r in results) == count
    everything = names(reg)
    assert len(everything) == len(set(everything)) == 4 * count + count
    for tag in ("p1", "p2"):
        assert {f"{tag}-{i}" for i in range(count)} <= set(everything)
    assert len([n for n in everything if AUTO_ID.match(n)]) == 2 * count


def test_threads_share_one_registry(reg: EmbeddedRegistry) -> None:
    """Threads using one registry object each get a working connection; nothing is lost."""
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(25):
                reg.add_resource(dtype="wav", archive="a1", name=f"t{t}-{i}")
                assert reg.get_resource(f"t{t}-{i}") is not None
        except BaseException as err:  # reported below
            failures.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(names(reg)) == 100


def test_forked_child_uses_its_own_connection(reg: EmbeddedRegistry, db: Path) -> None:
    """A child forked after the registry was used opens its own connection and can write."""
    reg.add_resource(dtype="wav", archive="a1", name="before-fork")
    parent_conn = reg._conn()
    pid = os.fork()
    if pid == 0:  # the child: exit status says whether it wrote on a connection of its own
        code = 1
        try:
            reg.add_resource(dtype="wav", archive="a1", name="from-child")
            code = 0 if reg._conn() is not parent_conn else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reg.get_resource("from-child") is not None
    reg.add_resource(dtype="wav", archive="a1", name="after-fork")
    assert names(reg) == ["after-fork", "before-fork", "from-child"]


def test_lock_held_too_long_is_transient(reg: EmbeddedRegistry, db: Path) -> None:
    """When another writer holds the lock past busy_timeout, the error is RegistryUnavailable."""
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        impatient = EmbeddedRegistry(db, busy_timeout=0.05)
        with pytest.raises(errors.RegistryUnavailable) as info:
            impatient.add_resource(dtype="wav", archive="a1", name="blocked")
        assert info.value.transient
        impatient.close()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert reg.get_resource("blocked") is None


def test_search_survives_writes_between_pages(reg: EmbeddedRegistry) -> None:
    """Iterating a search over several pages while adding resources yields each old name once."""
    for i in range(CHUNK + 20):
        reg.add_resource(dtype="wav", archive="a1", name=f"r{i:04d}")
    seen = []
    for rec in reg.search(archive="a1"):
        seen.append(rec.name)
        if len(seen) == CHUNK - 1:
            reg.add_resource(dtype="wav", archive="a1", name="a-early")  # sorts before: skipped
            reg.add_resource(dtype="wav", archive="a1", name="z-late")  # sorts after: seen
    assert seen == [f"r{i:04d}" for i in range(CHUNK + 20)] + ["z-late"]


# --- the database file -------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_database_files_are_mode_0640_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """The database and its -wal and -shm files are created 0640 under any umask."""
    db = tmp_path / "registry.sqlite3"
    old = os.umask(umask)
    try:
        reg = EmbeddedRegistry(db)
        reg.add_datatype("wav")
        modes = {p.name: _mode(p) for p in tmp_path.iterdir()}
        reg.close()
    finally:
        os.umask(old)
    assert modes == {
        "registry.sqlite3": 0o640,
        "registry.sqlite3-wal": 0o640,
        "registry.sqlite3-shm": 0o640,
    }


def test_existing_database_mode_is_kept(tmp_path: Path) -> None:
    """Opening an existing database never loosens its mode."""
    db = tmp_path / "registry.sqlite3"
    EmbeddedRegistry(db).close()
    db.chmod(0o600)
    with EmbeddedRegistry(db) as reg:
        reg.add_datatype("wav")
    assert _mode(db) == 0o600


def test_database_is_in_wal_mode(reg: EmbeddedRegistry, db: Path) -> None:
    """The database uses write-ahead logging, so readers never block the writer."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_state_directory_is_created(tmp_path: Path) -> None:
    """The database's folder is created when missing."""
    db = tmp_path / "a" / "b" / "registry.sqlite3"
    with EmbeddedRegistry(db) as reg:
        reg.add_datatype("wav")
    assert db.is_file()


# --- URL -------------------------------------------------------------------------------


def test_default_url_is_the_database_file_url(db: Path) -> None:
    """Without a URL, identifiers resolve under the file: URL of the database, with a slash."""
    with EmbeddedRegistry(db) as reg:
        assert reg.url == f"file://{db}/"
        assert reg.resource_url("abc") == f"file://{db}/resources/abc/"


def test_relative_database_path_gives_absolute_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative database path still gives an absolute file: URL."""
    monkeypatch.chdir(tmp_path)
    with EmbeddedRegistry(Path("registry.sqlite3")) as reg:
        assert reg.url == f"file://{tmp_path}/registry.sqlite3/"


@pytest.mark.parametrize(
    "given", ["https://lab.example.org/neurobank", "https://lab.example.org/neurobank/"]
)
def test_configured_url_is_used_with_one_trailing_slash(db: Path, given: str) -> None:
    """A configured URL is the base of identifiers, ending with exactly one slash."""
    with EmbeddedRegistry(db, url=given) as reg:
        assert reg.url == "https://lab.example.org/neurobank/"
        assert reg.resource_url("x1") == "https://lab.example.org/neurobank/resources/x1/"


def test_is_a_registry(reg: EmbeddedRegistry) -> None:
    """EmbeddedRegistry satisfies the Registry protocol and names itself."""
    assert isinstance(reg, Registry)
    assert reg.backend == "embedded"
    assert reg.info()["name"] == "nbankd-embedded"
    assert reg.info()["api_version"] == "1.2"


# --- schema and lifecycle ----------------------------------------------------------------


def test_schema_version_is_stored(reg: EmbeddedRegistry, db: Path) -> None:
    """The schema version is in PRAGMA user_version."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert reg.schema_version() == SCHEMA_VERSION


def test_reopening_keeps_everything(db: Path) -> None:
    """A database written by one registry object is read back by the next."""
    with EmbeddedRegistry(db) as reg:
        reg.add_datatype("wav", "audio/wav", "wav")
        reg.add_archive("a1", "neurobank", "/data/a1", "offline")
        first = reg.add_resource(dtype="wav", archive="a1", metadata={"k": [1, 2]})
    with EmbeddedRegistry(db) as reg:
        assert reg.get_resource(first.name) == first
        assert reg.get_archive("a1") is not None
        assert reg.get_archive("a1").accessibility == "offline"  # type: ignore[union-attr]
        assert reg.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(db: Path) -> None:
    """A database from a newer nbankd is refused rather than misread."""
    EmbeddedRegistry(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(errors.RegistryError, match="newer"):
        EmbeddedRegistry(db)


def test_closed_registry_refuses_use(db: Path) -> None:
    """After close() (or leaving the with block) the registry raises instead of reopening."""
    with EmbeddedRegistry(db) as reg:
        reg.add_datatype("wav")
    with pytest.raises(errors.RegistryError, match="closed"):
        reg.list_datatypes()


# --- records ----------------------------------------------------------------------------


def test_auto_ids_are_8_base36_characters_and_distinct(reg: EmbeddedRegistry) -> None:
    """Automatic names are 8 lowercase base-36 characters, all different."""
    made = [reg.add_resource(dtype="wav", archive="a1").name for _ in range(200)]
    assert all(AUTO_ID.match(n) for n in made)
    assert len(set(made)) == len(made)


def test_created_by_and_created_on(reg: EmbeddedRegistry) -> None:
    """created_by is the process's user; created_on is UTC ISO 8601 ending in Z, like DRF."""
    import pwd

    before = datetime.now(UTC)
    rec = reg.add_resource(dtype="wav", archive="a1", name="r1")
    assert rec.created_by == pwd.getpwuid(os.geteuid()).pw_name
    assert rec.created_on is not None and rec.created_on.endswith("Z")
    when = datetime.fromisoformat(rec.created_on)
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC)


def test_filename_takes_the_dtype_extension(reg: EmbeddedRegistry) -> None:
    """filename is the name plus the dtype's extension; a dtype without one gives the name."""
    reg.add_datatype("plain")
    assert reg.add_resource(dtype="wav", archive="a1", name="r1").filename == "r1.wav"
    assert reg.add_resource(dtype="plain", archive="a1", name="r2").filename == "r2"


def test_empty_location_key_is_no_key(reg: EmbeddedRegistry) -> None:
    """An empty location key is stored as None (django would store ""), so it never collides."""
    reg.add_resource(dtype="wav", archive="a1", name="r1", key="")
    reg.add_resource(dtype="wav", archive="a1", name="r2", key="")
    assert [loc.key for loc in reg.get_locations("r1")] == [None]
    assert [loc.key for loc in reg.get_locations("r2")] == [None]


def test_location_key_unique_per_archive(reg: EmbeddedRegistry) -> None:
    """A location key is unique within an archive, with the server's messages."""
    reg.add_resource(dtype="wav", archive="a2", name="r1", key="tape-7")
    with pytest.raises(errors.RegistryRejected) as info:
        reg.add_resource(dtype="wav", archive="a2", name="r2", key="tape-7")
    assert info.value.fields == {"locations": ["key 'tape-7' is already used in archive 'a2'"]}
    reg.add_resource(dtype="wav", archive=None, name="r3")
    with pytest.raises(errors.RegistryRejected) as info:
        reg.add_location("r3", "a2", key="tape-7")
    assert info.value.fields == {"key": ["another resource in this archive already has this key"]}
    assert reg.add_location("r3", "a1", key="tape-7").key == "tape-7"


def test_metadata_that_is_not_json_is_rejected(reg: EmbeddedRegistry) -> None:
    """Metadata that JSON cannot hold (NaN, sets) is rejected and nothing is stored."""
    for bad in ({"x": float("nan")}, {"x": {1, 2}}):
        with pytest.raises(errors.RegistryRejected) as info:
            reg.add_resource(dtype="wav", archive="a1", name="r1", metadata=bad)
        assert "metadata" in info.value.fields
    assert reg.get_resource("r1") is None


# --- search edge cases ---------------------------------------------------------------------


@pytest.fixture
def filled(reg: EmbeddedRegistry) -> EmbeddedRegistry:
    """Resources with varied metadata: numbers, strings, nested, arrays, none at all."""
    add = reg.add_resource
    add(dtype="wav", archive="a1", name="n1", metadata={"site": 3, "s": "abc", "nest": {"a": 1}})
    add(dtype="wav", archive="a1", name="n2", metadata={"site": "3", "s": "ABCdef"})
    add(dtype="wav", archive="a2", name="n3", metadata={"site": 10, "arr": [1, "x"], "b": True})
    add(dtype="wav", archive=None, name="n4")
    add(dtype="wav", archive="a1", name="n5", metadata={"s": "Ünïcode", "experimenter": "alice"})
    add(dtype="wav", archive="a1", name="n6", metadata={"animal": "Bird7", "experimenter": "bob"})
    return reg


def test_isnull_bad_value_is_rejected_before_iteration(filled: EmbeddedRegistry) -> None:
    """metadata__K__isnull=maybe raises RegistryRejected at the call, with the server's body."""
    with pytest.raises(errors.RegistryRejected) as info:
        filled.search(metadata__site__isnull="maybe")
    assert info.value.fields == {"metadata__site__isnull": ["must be true or false"]}
    assert info.value.message == "metadata__site__isnull: must be true or false"


def test_isnull_accepts_case_insensitive_words(filled: EmbeddedRegistry) -> None:
    """metadata__K__isnull takes TRUE/False/1/0 like the server."""
    assert names(filled, metadata__site__isnull="TRUE") == ["n4", "n5", "n6"]
    assert names(filled, metadata__site__isnull="0") == ["n1", "n2", "n3"]


def test_neq_keeps_resources_without_metadata(filled: EmbeddedRegistry) -> None:
    """metadata__K__neq keeps resources with no metadata at all but drops those lacking K."""
    assert names(filled, metadata__site__neq="3") == ["n2", "n3", "n4"]


def test_exclusions_apply_together(filled: EmbeddedRegistry) -> None:
    """Several __neq filters form one NOT (a AND b) in SQL logic, as Django builds it."""
    # n1 matches site=3 but not s=ABCdef: kept; n6 lacks both keys (unknown AND unknown)
    assert names(filled, metadata__site__neq="3", metadata__s__neq="ABCdef") == [
        "n1",
        "n2",
        "n3",
        "n4",
        "n5",
    ]
    assert names(filled, metadata__site__neq="3", metadata__s__neq="abc") == [
        "n2",
        "n3",
        "n4",
        "n5",
    ]


def test_core_field_exclusions_keep_nulls(filled: EmbeddedRegistry) -> None:
    """experimenter__neq and metadata__animal__neq keep resources with no value."""
    assert names(filled, experimenter__neq="alice") == ["n1", "n2", "n3", "n4", "n6"]
    assert names(filled, metadata__animal__neq="Bird7") == ["n1", "n2", "n3", "n4", "n5"]


def test_core_field_lookups(filled: EmbeddedRegistry) -> None:
    """isnull, istartswith and metadata__experimenter__icontains search the fields."""
    assert names(filled, experimenter__isnull="false") == ["n5", "n6"]
    assert names(filled, animal__istartswith="bird") == ["n6"]
    assert names(filled, metadata__experimenter__icontains="LIC") == ["n5"]
    assert names(filled, metadata__experimenter="alice") == ["n5"]


def test_json_values_are_typed(filled: EmbeddedRegistry) -> None:
    """'3' finds the number, '"3"' the string, 'true' the boolean."""
    assert names(filled, metadata__site="3") == ["n1"]
    assert names(filled, metadata__site='"3"') == ["n2"]
    assert names(filled, metadata__b="true") == ["n3"]


def test_nested_keys_and_array_indexes(filled: EmbeddedRegistry) -> None:
    """metadata__a__b reaches nested keys; a number part indexes an array."""
    assert names(filled, metadata__nest__a="1") == ["n1"]
    assert names(filled, metadata__arr__1="x") == ["n3"]
    assert names(filled, metadata__nest='{"a": 1}') == ["n1"]


def test_text_lookups_on_metadata(filled: EmbeddedRegistry) -> None:
    """icontains/startswith/iexact compare text, case-folding beyond ASCII."""
    assert names(filled, metadata__s__icontains="BC") == ["n1", "n2"]
    assert names(filled, metadata__s__startswith="abc") == ["n1"]
    assert names(filled, metadata__s__iexact="üNÏCODE") == ["n5"]


def test_comparisons_and_containment(filled: EmbeddedRegistry) -> None:
    """__gt compares numbers with numbers; __contains is JSON containment; __in a JSON list."""
    assert names(filled, metadata__site__gt="2") == ["n1", "n3"]
    assert names(filled, metadata__site__lte="3") == ["n1"]
    assert names(filled, metadata__arr__contains='"x"') == ["n3"]
    assert names(filled, metadata__site__in='[10, "3"]') == ["n2", "n3"]


def test_plain_filter_values_are_cleaned(filled: EmbeddedRegistry) -> None:
    """Values are stripped, empty ones and unknown filters are ignored, like django-filter."""
    assert names(filled, name=" N1 ") == ["n1"]
    assert names(filled, name="", bogus="x") == ["n1", "n2", "n3", "n4", "n5", "n6"]


def test_has_location(filled: EmbeddedRegistry) -> None:
    """has_location true/false picks resources with/without a location; other values are ignored."""
    assert names(filled, has_location="false") == ["n4"]
    assert "n4" not in names(filled, has_location="1")
    assert len(names(filled, has_location="perhaps")) == 6


def test_location_filters(filled: EmbeddedRegistry) -> None:
    """archive is exact, location a substring of the archive name, scheme a prefix."""
    assert names(filled, archive="a2") == ["n3"]
    assert names(filled, archive="A2") == []
    assert names(filled, location="A") == ["n1", "n2", "n3", "n5", "n6"]
    assert names(filled, scheme="TAP") == ["n3"]


def test_created_on_filters(filled: EmbeddedRegistry) -> None:
    """created_on exact, __year and __range use the stored UTC time."""
    rec = filled.get_resource("n1")
    assert rec is not None and rec.created_on is not None
    year = rec.created_on[:4]
    assert names(filled, created_on=rec.created_on) == ["n1"]
    assert len(names(filled, created_on__year=year)) == 6
    assert names(filled, created_on__year=str(int(year) - 1)) == []
    assert len(names(filled, created_on__range=f"{year}-01-01,{int(year) + 1}-01-01")) == 6
    assert names(filled, created_on__range=f"{year}-01-01,") == []


def test_bad_dates_are_rejected_together(filled: EmbeddedRegistry) -> None:
    """Bad created_on values give the form errors the server sends, all at once."""
    with pytest.raises(errors.RegistryRejected) as info:
        filled.search(created_on="soon", created_on__year="x", created_on__range="a")
    assert info.value.fields == {
        "created_on": ["Enter a valid date/time."],
        "created_on__year": ["Enter a number."],
        "created_on__range": ["Range query expects two values."],
    }


def test_a_thread_that_ends_can_close_its_connection(reg: EmbeddedRegistry) -> None:
    """release_thread() closes the calling thread's connection and forgets it, so a
    thread per audit run does not leave one open connection behind per run."""
    before = len(reg._connections)
    seen: list[int] = []

    def one_run() -> None:
        reg.list_archives()
        seen.append(len(reg._connections))
        reg.release_thread()

    for _ in range(3):
        thread = threading.Thread(target=one_run)
        thread.start()
        thread.join()
    assert seen == [before + 1] * 3 and len(reg._connections) == before
    assert reg.list_archives() == reg.list_archives()  # other threads' connections still work
