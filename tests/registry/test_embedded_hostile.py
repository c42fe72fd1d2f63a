"""Hostile review of the embedded SQLite registry and the registry query commands.

Each test names the behaviour expected; the ones marked "guard" pass today and pin
behaviour that held up under attack. The contract-style tests run the same question
against the embedded registry and django-neurobank (on SQLite and on PostgreSQL): the
django variants show what the answer must be.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cli_backends import NBANKCTL
from fixtures.django_server import DjangoServer, unique_name
from fixtures.users import TestUser
from nbankctl import render
from nbankd import errors
from nbankd.archive.opening import create_archive
from nbankd.daemon import setup
from nbankd.deposit.outcomes import outcome_for
from nbankd.registry import embedded_schema
from nbankd.registry.base import Registry
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.embedded_json import register_functions
from nbankd.registry.http import HttpRegistry

SERVERS = {"django": "django_registry", "django-pg": "django_registry_pg"}


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[EmbeddedRegistry]:
    """An embedded registry with datatype 'wav' and archive a1."""
    with EmbeddedRegistry(tmp_path / "state" / "registry.sqlite3") as r:
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        yield r


# --- group members read the registry (SPEC guarantee 10) ----------------------------


@pytest.fixture
def shared_state(lab_group: str) -> Iterator[Path]:
    """A state folder as nbankd's service user keeps it: owned by it (root here), its
    group the lab's (setgid), group may read and enter but not write (2750)."""
    top = Path(tempfile.mkdtemp(prefix="nbankd-hostile-", dir="/tmp"))
    top.chmod(0o755)
    state = top / "state"
    state.mkdir()
    shutil.chown(state, group=lab_group)
    state.chmod(0o2750)
    try:
        yield state
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_group_member_can_search_embedded_registry_while_nbankd_is_stopped(
    shared_state: Path, unpriv_user: TestUser, lab_group: str
) -> None:
    """A member of the registry's group reads it with nbankctl (owner writes, group
    reads) also when no nbankd holds it open, i.e. when no -wal/-shm file exists."""
    db = shared_state / "registry.sqlite3"
    with EmbeddedRegistry(db) as r:  # the daemon's last run
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        r.add_resource(dtype="wav", archive="a1", name="rec1")
    # nbankd stopped cleanly: SQLite removed its -wal and -shm files
    assert sorted(p.name for p in shared_state.iterdir()) == ["registry.sqlite3"]
    assert db.stat().st_mode & 0o777 == 0o640 and db.group() == lab_group
    config = shared_state.parent / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {shared_state}\n")
    config.chmod(0o644)

    searched = unpriv_user.run([NBANKCTL, "search", "-c", str(config), "rec"])
    assert searched.returncode == 0, searched.stderr
    assert searched.stdout.split() == ["rec1"]
    shown = unpriv_user.run([NBANKCTL, "info", "-c", str(config), "rec1"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "rec1"


def test_group_member_can_check_an_archive_against_the_embedded_registry_while_stopped(
    shared_state: Path, unpriv_user: TestUser
) -> None:
    """`nbankctl archive check` by a member of the registry's group, nbankd stopped (no
    -wal/-shm): the registry's listing is read as every other read of theirs, and the
    archive found in order."""
    db = shared_state / "registry.sqlite3"
    archive = create_archive(shared_state.parent / "arch", (db.as_uri() + "/"))
    with EmbeddedRegistry(db) as r:  # the daemon's last run
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", str(archive.path))
        r.add_resource(dtype="wav", archive="a1", name="rec1", sha1=hashlib.sha1(b"x").hexdigest())
    stored = archive.resource_path("rec1").with_suffix(".wav")
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(b"x")
    stored.chmod(0o444)  # the archive's policy (its folders: as created)
    stored.parent.chmod(0o2775)
    assert sorted(p.name for p in shared_state.iterdir()) == ["registry.sqlite3"]
    config = shared_state.parent / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {shared_state}\n")
    config.chmod(0o644)

    checked = unpriv_user.run(
        [NBANKCTL, "archive", "check", "-c", str(config), "--json", str(archive.path)]
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["ok"] is True, checked.stdout


def test_group_member_cannot_write_the_registry_while_nbankd_is_stopped(
    shared_state: Path, unpriv_user: TestUser
) -> None:
    """Reading without -wal/-shm opens the registry read-only: a write is refused as
    read-only for this user, and no file appears beside the database."""
    db = shared_state / "registry.sqlite3"
    with EmbeddedRegistry(db) as r:
        r.add_datatype("wav")
    code = (
        "import sys\n"
        "from nbankd import errors\n"
        "from nbankd.registry.embedded import EmbeddedRegistry\n"
        "with EmbeddedRegistry(sys.argv[1]) as r:\n"
        "    print(r.read_only, [d.name for d in r.list_datatypes()])\n"
        "    try:\n"
        "        r.add_datatype('x')\n"
        "    except errors.RegistryAuthError as err:\n"
        "        print('refused', err)\n"
    )
    proc = unpriv_user.python(code, str(db))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "True ['wav']"
    assert "refused" in proc.stdout and "read-only for this user" in proc.stdout
    assert sorted(p.name for p in shared_state.iterdir()) == ["registry.sqlite3"]


def test_a_snapshot_read_is_discarded_when_a_writer_comes(tmp_path: Path) -> None:
    """A read of the file as it is (no -wal) during which a writer opens and commits is
    not answered (Changed: read again); the writer's commit lands, and its -wal stays
    (the reader's SHARED lock keeps SQLite from deleting it), so the next read goes
    through SQLite."""
    db = tmp_path / "registry.sqlite3"
    with EmbeddedRegistry(db) as r:
        r.add_datatype("wav")
    writer = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute(\"INSERT INTO datatype (name) VALUES ('late')\")\n"
        "c.close()\n"
    )

    def read(conn: sqlite3.Connection) -> int:
        before = conn.execute("SELECT count(*) FROM datatype").fetchone()[0]
        subprocess.run([sys.executable, "-c", writer, str(db)], check=True, timeout=60)
        return int(before)

    with pytest.raises(embedded_schema.Changed):
        embedded_schema.read_snapshot(db, 5.0, read, register_functions)
    assert (tmp_path / "registry.sqlite3-wal").exists()
    assert embedded_schema.read_snapshot(db, 5.0, read, register_functions) is None
    with EmbeddedRegistry(db) as r:
        assert [d.name for d in r.list_datatypes()] == ["late", "wav"]


def test_guard_group_member_can_search_while_the_owner_holds_it_open(
    shared_state: Path, unpriv_user: TestUser
) -> None:
    """Guard: while the owner has the database open (its -wal and -shm exist, mode
    0640), a group member reads it."""
    db = shared_state / "registry.sqlite3"
    with EmbeddedRegistry(db) as r:
        r.add_datatype("wav", "audio/wav", "wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        r.add_resource(dtype="wav", archive="a1", name="rec1")
        code = (
            "import sys\n"
            "from nbankd.registry.embedded import EmbeddedRegistry\n"
            "with EmbeddedRegistry(sys.argv[1]) as r:\n"
            "    print(' '.join(x.name for x in r.search(name='rec')))\n"
        )
        proc = unpriv_user.python(code, str(db))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["rec1"]


# --- text the database cannot hold: a field error, never a crash ---------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"dtype": "wav\udcff"}, id="dtype-from-a-sidecar"),
        pytest.param({"metadata": {"animal": "bird\udce9"}}, id="animal-from-path-metadata"),
        pytest.param({"metadata": {"experimenter": "\udcffx"}}, id="experimenter"),
        pytest.param({"name": "rec\udcff"}, id="name"),
        pytest.param({"key": "k\udcff"}, id="location-key"),
    ],
)
def test_undecodable_text_in_a_field_is_a_permanent_rejection(
    reg: EmbeddedRegistry, kwargs: dict[str, Any]
) -> None:
    """A lone surrogate (a non-UTF-8 byte of a file or folder name, or a sidecar's
    JSON escape) in a field is refused as a field error, as it already is for sha1 and
    root, so the daemon rejects the input instead of retrying an 'internal' error forever."""
    args: dict[str, Any] = {"dtype": "wav", "archive": "a1", **kwargs}
    with pytest.raises(Exception) as caught:
        reg.add_resource(**args)
    err = caught.value
    assert isinstance(err, errors.RegistryRejected), repr(err)
    assert outcome_for(err).kind == "permanent"
    assert list(reg.search(dtype="wav")) == []


def test_guard_surrogates_already_refused_in_sha1_and_root(reg: EmbeddedRegistry) -> None:
    """Guard: sha1 and archive roots with lone surrogates are field errors."""
    with pytest.raises(errors.RegistryRejected):
        reg.add_resource(dtype="wav", archive="a1", sha1="\udcff" * 40)
    with pytest.raises(errors.RegistryRejected):
        reg.add_archive("a9", "neurobank", "/data/\udcff")


def test_lookups_by_an_undecodable_name_answer_not_found(reg: EmbeddedRegistry) -> None:
    """A resource name that is not UTF-8 (nbankctl modify/search given a non-UTF-8
    argument) names no record: NotFound or no match, as get_resource already answers,
    never a UnicodeEncodeError traceback."""
    reg.add_resource(dtype="wav", archive="a1", name="rec1")
    bad = "rec\udcff"
    assert reg.get_resource(bad) is None  # already so
    with pytest.raises(errors.NotFound):
        reg.update_metadata(bad, {"a": 1})
    with pytest.raises(errors.NotFound):
        reg.add_location(bad, "a1")
    with pytest.raises(errors.NotFound):
        reg.remove_location(bad, "a1")
    assert list(reg.search(name=bad)) == []
    assert list(reg.search(metadata__site=bad)) == []


def test_nbankctl_search_with_a_superscript_digit_key_is_no_traceback(tmp_path: Path) -> None:
    """`nbankctl search -k ²=1` (a key str.isdigit() calls a digit, int() refuses)
    searches that key like django (which tries int() and falls back to the key) instead
    of dying with a ValueError traceback."""
    state = tmp_path / "state"
    with EmbeddedRegistry(state / "registry.sqlite3") as r:
        r.add_datatype("wav")
        r.add_archive("a1", "neurobank", "/data/a1")
        r.add_resource(dtype="wav", archive="a1", name="rec1", metadata={"²": 1})
        r.add_resource(dtype="wav", archive="a1", name="rec2", metadata={"x": 1})
    config = tmp_path / "c.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {state}\n")
    proc = subprocess.run(
        [NBANKCTL, "search", "-c", str(config), "-k", "²=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 and proc.stdout.split() == ["rec1"]


# --- terminal output -----------------------------------------------------------------


def test_status_shows_an_archive_problem_without_terminal_escapes(tmp_path: Path) -> None:
    """`nbankctl status` prints an archive problem through printable(): a lab member who
    rewrites the group-writable nbank.json with escape sequences in "registry" cannot
    retitle, clear or rewrite the administrator's terminal (or fake 'healthy')."""
    root = tmp_path / "arch"
    ours = "file:///var/lib/nbankd/registry.sqlite3/"
    archive = create_archive(root, ours)
    cfg = json.loads(archive.config_path.read_text())
    cfg["registry"] = "https://x/\x1b]0;owned\x07\x1b[2K\rnbankd 1: healthy\n"
    archive.config_path.write_text(json.dumps(cfg))
    problem = setup.archive_usable(root, ours)
    assert problem is not None and "\x1b" in problem  # what the daemon reports
    inbox = {"path": "/srv/inbox", "archive": "arch", "watch": "auto"}
    result = {
        "version": "1",
        "pid": 1,
        "uptime": 5,
        "degraded": [f"archive for /srv/inbox: {problem}"],
        "registry": {"backend": "embedded", "url": ours},
        "inboxes": [{**inbox, "archive_problem": problem}],
    }
    text = render.status(result)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "archive problem" in text


# --- the same question, the same answer as django-neurobank ------------------------


@pytest.fixture(params=["embedded", *SERVERS])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """A fresh embedded registry, or the session's django-neurobank (SQLite, PostgreSQL)."""
    r: Registry
    if request.param == "embedded":
        r = EmbeddedRegistry(tmp_path / "registry.sqlite3")
    else:
        server: DjangoServer = request.getfixturevalue(SERVERS[request.param])
        r = HttpRegistry(server.url, (server.username, server.password))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def scoped(registry: Registry, tmp_path: Path) -> tuple[Registry, str, str]:
    """(registry, a fresh dtype, a fresh archive)."""
    dtype = registry.add_datatype(unique_name("dt"), "application/octet-stream").name
    root = tmp_path / "archive"
    root.mkdir()
    archive = registry.add_archive(unique_name("ar"), "neurobank", str(root)).name
    return registry, dtype, archive


def test_boolean_filters_take_any_case_like_django(scoped: tuple[Registry, str, str]) -> None:
    """has_location=TRUE and experimenter__isnull=FALSE filter as django-filter's
    BooleanWidget does (it lower-cases the value), instead of being skipped and
    answering every record."""
    reg, dtype, archive = scoped
    located = reg.add_resource(dtype=dtype, archive=archive, name=unique_name("r")).name
    homeless = reg.add_resource(dtype=dtype, archive=None, name=unique_name("r")).name
    assert [r.name for r in reg.search(dtype=dtype, has_location="true")] == [located]
    assert [r.name for r in reg.search(dtype=dtype, has_location="TRUE")] == [located]
    assert [r.name for r in reg.search(dtype=dtype, has_location="False")] == [homeless]
    assert [r.name for r in reg.search(dtype=dtype, has_location="FALSE")] == [homeless]
    assert list(reg.search(dtype=dtype, experimenter__isnull="FALSE")) == []


def test_name_search_does_not_expand_sharp_s(scoped: tuple[Registry, str, str]) -> None:
    """name=ß matches like django (PostgreSQL's UPPER and SQLite's LIKE map one
    character to one): not every name holding 'ss', as Python's full case mapping
    ('ß'.upper() == 'SS') makes it."""
    reg, dtype, archive = scoped
    reg.add_resource(dtype=dtype, archive=archive, name=unique_name("glass"))
    assert [r.name for r in reg.search(dtype=dtype, name="ß")] == []
    assert [r.name for r in reg.search(dtype=dtype, name="ﬀ")] == []  # 'FF' in Python


def test_metadata_iexact_does_not_expand_sharp_s(scoped: tuple[Registry, str, str]) -> None:
    """metadata__K__iexact=STRASSE does not match "Straße" (django on PostgreSQL and on
    SQLite both answer nothing)."""
    reg, dtype, archive = scoped
    reg.add_resource(dtype=dtype, archive=archive, metadata={"place": "Straße"})
    assert list(reg.search(dtype=dtype, metadata__place__iexact="STRASSE")) == []
    assert list(reg.search(dtype=dtype, metadata__place__icontains="ss")) == []


# --- guards: what held up ------------------------------------------------------------


def test_guard_like_and_glob_characters_are_literal(reg: EmbeddedRegistry) -> None:
    """Guard: '_' and '%' in a name search are literal (no LIKE wildcard), as on django."""
    for name in ("a_b", "axb", "a-b"):
        reg.add_resource(dtype="wav", archive="a1", name=name)
    assert [r.name for r in reg.search(name="a_b")] == ["a_b"]
    assert list(reg.search(name="%")) == []
    assert list(reg.search(name="*")) == []
    assert [r.name for r in reg.search(metadata__x__contains="_")] == []


def test_guard_a_write_waits_for_another_process_lock_and_lands(reg: EmbeddedRegistry) -> None:
    """Guard: another process holding the write lock makes a write wait (busy timeout),
    and the write lands once the lock is released: no lost registration."""
    code = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('COMMIT')\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(reg.db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = threading.Event()
        done: dict[str, Any] = {}

        def write() -> None:
            started.set()
            try:
                done["record"] = reg.add_resource(dtype="wav", archive="a1", name="waited")
            except Exception as err:  # pragma: no cover - reported below
                done["error"] = err

        t = threading.Thread(target=write)
        t.start()
        started.wait()
        assert "record" not in done
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        t.join(60)
    finally:
        holder.wait(60)
    assert "error" not in done, done
    conn = sqlite3.connect(reg.db_path)
    try:
        assert conn.execute("SELECT count(*) FROM resource WHERE name='waited'").fetchone() == (1,)
    finally:
        conn.close()


def test_guard_corrupt_database_is_a_registry_error(tmp_path: Path) -> None:
    """Guard: a file that is not a database, or a malformed one, is a RegistryError
    naming the file (the daemon waits), never a crash or a silent fresh registry."""
    db = tmp_path / "registry.sqlite3"
    db.write_bytes(b"not a database at all " * 100)
    with pytest.raises(errors.RegistryError) as caught:
        EmbeddedRegistry(db)
    assert str(db) in str(caught.value)
    assert db.read_bytes().startswith(b"not a database")
