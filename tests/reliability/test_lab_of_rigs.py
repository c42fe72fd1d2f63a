"""A lab of rigs (issue #18, item 2): four real daemons, each with its own state
directory, inbox and registry user, deposit at the same time into ONE shared archive
and ONE django-neurobank registry on PostgreSQL.

The inputs that meet one identifier follow the same rules as inside one daemon: the
same content under two names ends as one record and one file, the other rejected
``duplicate`` naming the winner; the same name and content is one record, one file
and an ``already-deposited`` receipt; one identifier with two contents has one
winner, the other rejected ``name-taken``. Afterwards ``nbank archive check`` is clean
and every record is attributable: its registry user is ``created_by`` and the rig's
name is in its metadata.

Outages mid-burst (issue #18, item 4) lose and double nothing, and the rigs' retries
are spread by their jitter: PostgreSQL stopped and started again; gunicorn (a server
of the lab's own, on the same database and address) killed with SIGKILL while each
worker holds a POST whose record is committed, or stopped with SIGTERM while they do,
and started again once every rig has seen the outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from fixtures.cli_backends import NBANK
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.django_server import (
    DjangoServer,
    RestartableGunicorn,
    restartable_twin,
    unique_name,
)
from fixtures.postgres import PostgresDatabase
from nbankd.archive.opening import create_archive
from nbankd.deposit.policy import auto_identifier, replacement_identifier

RIGS = 4
TWIN_WORKERS = 3  # gunicorn workers of the restartable server of gunicorn_lab


@dataclass
class Lab:
    server: DjangoServer
    archive: Path
    archive_name: str
    dtype: str
    rigs: list[DaemonHarness]
    users: list[tuple[str, str]]

    def outcome(self, name: str) -> list[tuple[int, str, dict[str, Any]]]:
        """(rig, "receipt" or "reason", document) of every input named ``name``."""
        out = []
        for n, h in enumerate(self.rigs):
            out += [(n, "receipt", r) for r in h.receipts() if r["source"].endswith("/" + name)]
            out += [(n, "reason", r) for r in h.reasons() if r["original_path"].endswith(name)]
        return out

    def stored(self, stem: str) -> list[Path]:
        return sorted(self.archive.joinpath("resources").rglob(f"{stem}*"))

    def record(self, name: str) -> dict[str, Any]:
        resp = requests.get(f"{self.server.url}resources/{name}/", timeout=30)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result


def _superuser(server: DjangoServer, name: str, password: str) -> None:
    server.shell(
        "from django.contrib.auth.models import User\n"
        f"User.objects.create_superuser({name!r}, 'rig@example.org', {password!r})\n"
    )


def _rigs(
    server: DjangoServer, root: Path, options: list[dict[str, Any]]
) -> tuple[Path, str, str, list[DaemonHarness], list[tuple[str, str]]]:
    """One daemon per entry of ``options`` (its inbox options) on ``server``'s registry
    and one new archive under ``root``, each rig with its own registry user and its
    name in its inbox's metadata; (archive, its name, datatype, rigs, users)."""
    dtype = server.add_datatype(unique_name("rigdt"))
    archive_name = unique_name("shared")
    archive = root / "archive"
    create_archive(archive, server.url)
    server.post("archives/", {"name": archive_name, "scheme": "neurobank", "root": str(archive)})
    rigs, users = [], []
    for n, extra in enumerate(options):
        user = (unique_name(f"rig{n}"), secrets.token_urlsafe(12))
        _superuser(server, *user)
        (root / f"rig{n}").mkdir()
        h = DaemonHarness(
            root=root / f"rig{n}",
            registry=server.url,
            auth=user,
            dtype=dtype,
            archive_name=archive_name,
            inbox_options={"metadata": {"rig": f"rig{n}"}, **extra},
        )
        h.archive = archive  # one archive shared by every rig
        rigs.append(h)
        users.append(user)
    return archive, archive_name, dtype, rigs, users


@contextlib.contextmanager
def _open_lab(server: DjangoServer) -> Iterator[Lab]:
    """Four daemons on ``server``'s registry and one archive, each rig with its own
    registry user and its name in its inbox's metadata; stopped on exit."""
    root = Path(tempfile.mkdtemp(prefix="nbankd-lab-"))
    archive, archive_name, dtype, rigs, users = _rigs(server, root, [{} for _ in range(RIGS)])
    try:
        for h in rigs:
            h.start()
        yield Lab(server, archive, archive_name, dtype, rigs, users)
    finally:
        for h in rigs:
            if h.proc is not None and h.proc.poll() is None:
                h.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(django_registry_pg: DjangoServer) -> Iterator[Lab]:
    """Four daemons on one PostgreSQL-backed registry and one archive, each rig with
    its own registry user and its name in its inbox's metadata."""
    with _open_lab(django_registry_pg) as opened:
        yield opened


@pytest.fixture(scope="module")
def gunicorn_lab(
    django_registry_pg: DjangoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Lab, RestartableGunicorn]]:
    """A lab whose rigs reach the PostgreSQL-backed registry through a gunicorn of its
    own, which the test may kill and start again (the session's server stays up)."""
    log_path = tmp_path_factory.mktemp("gunicorn-lab") / "gunicorn.log"
    with (
        restartable_twin(django_registry_pg, log_path, TWIN_WORKERS) as twin,
        _open_lab(twin.server) as opened,
    ):
        yield opened, twin


def _drop_together(lab: Lab, drops: list[tuple[int, str, bytes]]) -> None:
    """Writes every input beside its inbox first, then renames them all in at once."""
    staged = []
    for rig, name, data in drops:
        h = lab.rigs[rig]
        tmp = h.root / f".{secrets.token_hex(4)}"
        tmp.write_bytes(data)
        staged.append((tmp, h.inbox / name))
    for tmp, dest in staged:
        os.rename(tmp, dest)


def _settled(lab: Lab, names: list[str]) -> None:
    wait_for(
        lambda: all(lab.outcome(n) for n in names) and all(len(lab.outcome(n)) == 1 for n in names),
        120,
        f"the inputs {names} to be deposited or rejected",
    )


def test_same_content_two_names_on_two_rigs_is_one_record(lab: Lab) -> None:
    """a.wav on rig 0 and b.wav on rig 1 with equal bytes, at the same moment: one
    record and one file; the other rejected duplicate naming the winner."""
    data = os.urandom(50_000)
    a, b = unique_name("same-a"), unique_name("same-b")
    _drop_together(lab, [(0, f"{a}.wav", data), (1, f"{b}.wav", data)])
    _settled(lab, [f"{a}.wav", f"{b}.wav"])
    [(_, kind_a, doc_a)] = lab.outcome(f"{a}.wav")
    [(_, kind_b, doc_b)] = lab.outcome(f"{b}.wav")
    assert sorted([kind_a, kind_b]) == ["reason", "receipt"]
    receipt, reason = (doc_a, doc_b) if kind_a == "receipt" else (doc_b, doc_a)
    assert reason["code"] == "duplicate" and receipt["id"] in reason["message"]
    assert len(lab.stored(a)) + len(lab.stored(b)) == 1


def test_same_name_and_content_on_two_rigs_is_already_deposited(lab: Lab) -> None:
    """The same name and bytes on rigs 2 and 3: one record, one file, and the second
    receipt already-deposited."""
    data = os.urandom(40_000)
    name = unique_name("twin")
    _drop_together(lab, [(2, f"{name}.wav", data), (3, f"{name}.wav", data)])
    wait_for(lambda: len(lab.outcome(f"{name}.wav")) == 2, 120, "both inputs settled")
    outcomes = sorted(doc["outcome"] for _, kind, doc in lab.outcome(f"{name}.wav"))
    assert outcomes == ["already-deposited", "deposited"]
    assert len(lab.stored(name)) == 1
    assert lab.record(name)["sha1"] == hashlib.sha1(data).hexdigest()


def test_one_identifier_two_contents_has_one_winner(lab: Lab) -> None:
    """take.wav with other bytes on rigs 0 and 3: one wins, the other is name-taken."""
    name = unique_name("take")
    _drop_together(lab, [(0, f"{name}.wav", b"first take"), (3, f"{name}.wav", b"second take")])
    wait_for(lambda: len(lab.outcome(f"{name}.wav")) == 2, 120, "both inputs settled")
    kinds = sorted((kind, doc.get("code")) for _, kind, doc in lab.outcome(f"{name}.wav"))
    assert kinds == [("reason", "name-taken"), ("receipt", None)]
    [stored] = lab.stored(name)
    assert lab.record(name)["sha1"] == hashlib.sha1(stored.read_bytes()).hexdigest()


def test_a_burst_from_every_rig_lands_once_and_is_attributable(lab: Lab) -> None:
    """Ten files per rig at once: each deposited once, by its rig's registry user, with
    its rig's name in the metadata; no staging leftovers; nbank archive check is clean."""
    drops = [(n, f"{unique_name(f'burst{n}')}.dat", os.urandom(4096)) for n in range(RIGS)
             for _ in range(10)]  # fmt: skip
    _drop_together(lab, drops)
    _settled(lab, [name for _, name, _ in drops])
    for rig, name, data in drops:
        [(got_rig, kind, receipt)] = lab.outcome(name)
        assert (got_rig, kind) == (rig, "receipt")
        record = lab.record(receipt["id"])
        assert record["sha1"] == hashlib.sha1(data).hexdigest()
        assert record["metadata"]["rig"] == f"rig{rig}"
        assert record.get("created_by") == lab.users[rig][0]
    wait_for(
        lambda: not any(p.name.startswith(".nbankd-") for p in (lab.archive / "staging").iterdir()),
        30,
        "no staged copy left",
    )
    env = {**os.environ, "NBANK_REGISTRY": lab.server.url}
    check = subprocess.run(
        [NBANK, "archive", "check", str(lab.archive)], env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    summary = check.stderr + check.stdout
    assert "missing from archive: 0; missing from registry: 0; read/verify errors: 0" in summary


def _retries(h: DaemonHarness) -> list[dict[str, Any]]:
    """The 'step failed; will retry' log events of a rig for an unusable registry."""
    out = []
    for line in h.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "step failed; will retry" and event.get("code") in (
            "registry-unavailable",
            "registry-error",
        ):
            out.append(event)
    return out


def test_registry_database_down_mid_burst_loses_and_doubles_nothing(
    lab: Lab, postgres_database: Any
) -> None:
    """PostgreSQL stopped as a burst from every rig begins, started again once every
    rig has seen the outage: each input is deposited exactly once, none rejected, each
    record holds its bytes; the rigs' retries are spread out by their jitter, not in
    lockstep."""
    before = {n: len(_retries(h)) for n, h in enumerate(lab.rigs)}
    drops = [(n, f"{unique_name(f'pgdown{n}')}.dat", os.urandom(2048)) for n in range(RIGS)
             for _ in range(6)]  # fmt: skip
    postgres_database.stop()
    try:
        _drop_together(lab, drops)
        wait_for(
            lambda: all(len(_retries(h)) > before[n] for n, h in enumerate(lab.rigs)),
            120,
            "every rig to retry against the unusable registry",
        )
    finally:
        postgres_database.start()
    _settled(lab, [name for _, name, _ in drops])
    for rig, name, data in drops:
        [(got_rig, kind, receipt)] = lab.outcome(name)
        assert (got_rig, kind) == (rig, "receipt")
        assert lab.record(receipt["id"])["sha1"] == hashlib.sha1(data).hexdigest()
        found = requests.get(
            f"{lab.server.url}resources/", params={"sha1": hashlib.sha1(data).hexdigest()},
            timeout=30,
        ).json()  # fmt: skip
        assert len(found) == 1, f"{name} registered {len(found)} times"
    first_waits = [float(_retries(h)[before[n]]["retry_in"]) for n, h in enumerate(lab.rigs)]
    assert max(first_waits) - min(first_waits) > 0.05, first_waits  # jittered, not lockstep


_LOCK_WAITERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
)

_UNLOCATED = (
    "SELECT count(*) FROM nbank_registry_resource r WHERE r.name = ANY(%s) AND NOT EXISTS "
    "(SELECT 1 FROM nbank_registry_location l WHERE l.resource_id = r.id)"
)


@contextlib.contextmanager
def _locations_locked(db: PostgresDatabase) -> Iterator[psycopg.Connection[Any]]:
    """Holds django-neurobank's location table against writes (SHARE lock) while open;
    yields a second connection to watch and end the sessions waiting for it.

    django-neurobank creates a resource, committed at once, then its locations: a
    registering POST meanwhile has its record committed and waits for the lock."""
    connect = {"host": db.host, "port": db.port, "dbname": db.name, "user": db.user}
    with (
        psycopg.connect(**connect, password=db.password) as holder,
        psycopg.connect(**connect, password=db.password, autocommit=True) as watcher,
    ):
        holder.execute("LOCK TABLE nbank_registry_location IN SHARE MODE")
        try:
            yield watcher
        finally:
            holder.rollback()


def _answer_lost_after_commit(
    lab: Lab, twin: RestartableGunicorn, db: PostgresDatabase, drops: list[tuple[int, str, bytes]]
) -> None:
    """Drops the burst; once every gunicorn worker holds a POST whose resource is
    committed, SIGKILLs gunicorn and ends those POSTs' database sessions (their
    locations never written, their answers never sent)."""
    with _locations_locked(db) as watcher:
        _drop_together(lab, drops)
        wait_for(
            lambda: len(watcher.execute(_LOCK_WAITERS).fetchall()) >= TWIN_WORKERS,
            60,
            "every gunicorn worker in a registering POST with its resource committed",
        )
        twin.kill()
        for (pid,) in watcher.execute(_LOCK_WAITERS).fetchall():
            watcher.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: not watcher.execute(_LOCK_WAITERS).fetchall(), 30, "sessions ended")
        names = [name.removesuffix(".dat") for _, name, _ in drops]
        (orphans,) = watcher.execute(_UNLOCATED, (names,)).fetchone() or (0,)
        assert orphans >= TWIN_WORKERS, f"{orphans} records committed without their answer"


def _posts(twin: RestartableGunicorn) -> int:
    """How many registering POSTs this gunicorn has answered (its access log)."""
    return sum('"POST /neurobank/resources/ HTTP' in line for line in twin.log_lines())


def _deposited_once(lab: Lab, drops: list[tuple[int, str, bytes]]) -> None:
    """Each input has one receipt, from its rig, and the registry one record of its
    bytes, under its name, located in the lab's archive."""
    for rig, name, data in drops:
        [(got_rig, kind, receipt)] = lab.outcome(name)
        assert (got_rig, kind) == (rig, "receipt"), (name, kind, receipt)
        record = lab.record(receipt["id"])
        assert record["sha1"] == hashlib.sha1(data).hexdigest()
        assert lab.archive_name in record["locations"], record
        found = requests.get(
            f"{lab.server.url}resources/", params={"sha1": hashlib.sha1(data).hexdigest()},
            timeout=30,
        ).json()  # fmt: skip
        assert len(found) == 1, f"{name} registered {len(found)} times"


def _gunicorn_down_mid_burst(
    lab: Lab, twin: RestartableGunicorn, stop: Callable[[list[tuple[int, str, bytes]]], None]
) -> None:
    """A burst of eight inputs per rig; ``stop(drops)`` drops them and stops gunicorn;
    gunicorn starts again on its address once every rig has retried; then each input is
    deposited exactly once, in the lab's archive, and the first retries are jittered."""
    before = {n: len(_retries(h)) for n, h in enumerate(lab.rigs)}
    drops = [(n, f"{unique_name(f'gdown{n}')}.dat", os.urandom(2048)) for n in range(RIGS)
             for _ in range(8)]  # fmt: skip
    try:
        stop(drops)
        wait_for(
            lambda: all(len(_retries(h)) > before[n] for n, h in enumerate(lab.rigs)),
            60,
            "every rig to retry against the stopped gunicorn",
        )
    finally:
        if twin.proc is not None and twin.proc.poll() is not None:
            twin.start()
    assert twin.server.url == lab.server.url  # the same address as before
    _settled(lab, [name for _, name, _ in drops])
    _deposited_once(lab, drops)
    first_waits = [float(_retries(h)[before[n]]["retry_in"]) for n, h in enumerate(lab.rigs)]
    assert max(first_waits) - min(first_waits) > 0.05, first_waits  # jittered, not lockstep


def test_gunicorn_killed_with_answers_lost_after_commit_doubles_nothing(
    gunicorn_lab: tuple[Lab, RestartableGunicorn], postgres_database: PostgresDatabase
) -> None:
    """gunicorn SIGKILLed while each worker holds a POST whose resource is committed
    (answer lost, location unwritten), restarted once every rig has retried: each input
    is deposited once, in the archive, none rejected; first retries are jittered."""
    lab, twin = gunicorn_lab
    _gunicorn_down_mid_burst(
        lab, twin, lambda drops: _answer_lost_after_commit(lab, twin, postgres_database, drops)
    )


def test_gunicorn_stopped_gracefully_mid_burst_loses_and_doubles_nothing(
    gunicorn_lab: tuple[Lab, RestartableGunicorn], postgres_database: PostgresDatabase
) -> None:
    """gunicorn SIGTERMed while each worker holds a POST (those finish and answer,
    queued ones are cut), restarted once every rig has retried: each input deposited
    once, in the archive, none rejected; first retries are jittered."""
    lab, twin = gunicorn_lab
    posts = _posts(twin)

    def stop(drops: list[tuple[int, str, bytes]]) -> None:
        seen = len(twin.log_lines())
        with _locations_locked(postgres_database) as watcher:
            _drop_together(lab, drops)
            wait_for(
                lambda: len(watcher.execute(_LOCK_WAITERS).fetchall()) >= TWIN_WORKERS,
                60,
                "every gunicorn worker in a registering POST",
            )
            twin.terminate()
            wait_for(
                lambda: any("Handling signal: term" in x for x in twin.log_lines()[seen:]),
                30,
                "gunicorn to begin its graceful stop",
            )
        twin.wait_exit()
        assert _posts(twin) - posts >= TWIN_WORKERS  # the POSTs in flight were answered

    _gunicorn_down_mid_burst(lab, twin, stop)


# --- identifiers and staging names across rigs -------------------------------------------


def _rig_pair(server: DjangoServer, root: Path, **first: Any) -> tuple[DaemonHarness, ...]:
    """Two rigs on ``server`` sharing one archive, each with its own registry user;
    ``first`` holds inbox options of the first rig."""
    return tuple(_rigs(server, root, [first, {}])[3])


def _journaled_tokens(h: DaemonHarness) -> list[str]:
    """The tokens of the items in a rig's journal, read without writing to it."""
    path = h.state_dir / "journal.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT token FROM items")]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        db.close()


def test_an_automatic_identifier_another_rig_takes_first_is_replaced(
    django_registry_pg: DjangoServer, tmp_path: Path
) -> None:
    """Rig A's automatic identifier, registered by rig B for other bytes between A's
    intent and A's claim, is replaced: A's input is deposited under a new identifier,
    never rejected, and B's record keeps B's bytes."""
    a, b = _rig_pair(django_registry_pg, tmp_path, auto_id=True)
    go = tmp_path / "go"
    a.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    b.start()
    try:
        a_data, b_data = os.urandom(3000), os.urandom(3000)
        a.drop("take.dat", a_data)
        wait_for(lambda: _journaled_tokens(a), 30, "rig A to journal its intent")
        [token] = _journaled_tokens(a)
        planned = auto_identifier(bytes.fromhex(token), None)
        b.drop(f"{planned}.dat", b_data)  # rig B registers A's identifier first
        b.wait_settled(1)
        go.touch()
        a.wait_settled(1)
    finally:
        go.touch()
        a.stop()
        b.stop()
    assert a.reasons() == [] and b.reasons() == []
    [receipt] = a.receipts()
    assert receipt["id"] == replacement_identifier(bytes.fromhex(token), planned, None)
    assert receipt["sha1"] == hashlib.sha1(a_data).hexdigest()
    [taken] = b.receipts()
    assert taken["id"] == planned and taken["sha1"] == hashlib.sha1(b_data).hexdigest()
    record = requests.get(f"{django_registry_pg.url}resources/{planned}/", timeout=30).json()
    assert record["sha1"] == hashlib.sha1(b_data).hexdigest()


def test_two_rigs_staging_at_once_never_share_a_staging_name(
    django_registry_pg: DjangoServer, tmp_path: Path
) -> None:
    """Two rigs held just after copying into the shared archive's staging/ hold two
    staged files under names of their own; released, both deposit."""
    rigs = _rig_pair(django_registry_pg, tmp_path)
    go = tmp_path / "go"
    staging = rigs[0].archive / "staging"
    try:
        for n, h in enumerate(rigs):
            h.start(env={"NBANKD_PAUSE_AT": "stage-copied", "NBANKD_PAUSE_UNTIL": str(go)})
            h.drop(f"same{n}.dat", b"the same bytes on two rigs? no: " + bytes([n]) * 2000)
        wait_for(
            lambda: len([p for p in staging.iterdir() if p.name.startswith(".nbankd-")]) == 2,
            30,
            "both rigs to hold a staged copy",
        )
        names = sorted(p.name for p in staging.iterdir() if p.name.startswith(".nbankd-"))
        instances = {name.rsplit("-", 1)[-1] for name in names}
        go.touch()
        for h in rigs:
            h.wait_settled(1)
    finally:
        go.touch()
        for h in rigs:
            if h.proc is not None and h.proc.poll() is None:
                h.stop()
    assert len(set(names)) == 2 and len(instances) == 2  # each rig's own instance in its name
    assert all(len(h.receipts()) == 1 for h in rigs)
