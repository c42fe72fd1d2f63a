"""Hostile review of the registry migration (export, import, switch): records lost,
altered or resurrected on the way, pauses left behind, misleading outcomes.

Each test names the behaviour a user relies on; the ones marked "guard" pass today
and pin behaviour that held up under attack.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.cli_backends import NBANKCTL, base_env
from fixtures.daemon import DaemonHarness
from fixtures.django_server import DjangoServer, unique_name
from nbankd import errors
from nbankd.control.client import ControlClient
from nbankd.migration import execute, snapshot
from nbankd.migration.plan import Verdict, make_plan
from nbankd.registry.base import ArchiveRecord, DataType, ResourceRecord
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def run(argv: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**env, **extra}, capture_output=True, text=True, timeout=180, check=False
    )


class Lab:
    """An embedded registry (configuration + database) and the shared django server."""

    def __init__(self, tmp: Path, server: DjangoServer) -> None:
        self.tmp, self.server = tmp, server
        self.state = tmp / "state"
        self.config = tmp / "config.yaml"
        self.config.write_text(f"registry: embedded\nstate_dir: {self.state}\n")
        self.env = base_env(tmp / "home")
        server.write_netrc(tmp / "home" / ".netrc")
        self.embedded = EmbeddedRegistry(self.state / "registry.sqlite3")
        self.db_url = (self.state / "registry.sqlite3").as_uri() + "/"
        self.dtype = self.embedded.add_datatype(unique_name("dt"), "audio/wav", "wav").name

    def ctl(self, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run([NBANKCTL, "-c", str(self.config), *argv], self.env, **extra)

    def switch(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.ctl(
            "registry", "switch", "--to", self.server.url, "--socket", str(self.tmp / "none"),
            *extra,
        )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path, django_registry: DjangoServer) -> Lab:
    return Lab(tmp_path, django_registry)


# --- a re-run of the switch must not undo what was done on the server since ---------------


def test_rerunning_a_switch_does_not_resurrect_a_location_deleted_on_the_server(
    lab: Lab,
) -> None:
    """A location removed on the server after the switch stays removed when the switch is
    run again (as the docs ask, once an unmounted archive is back)."""
    here, away = lab.tmp / "here", lab.tmp / "mnt" / "away"
    here.mkdir()
    (here / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    arch = lab.embedded.add_archive(unique_name("ar"), "neurobank", str(here)).name
    tape = lab.embedded.add_archive(unique_name("tape"), "tape", unique_name("t") + ":0").name
    name = unique_name("song")
    lab.embedded.add_resource(dtype=lab.dtype, archive=arch, name=name, sha1=sha1(os.urandom(9)))
    lab.embedded.add_location(name, tape, key=f"resources/{name[:2]}/{name}.wav")
    lab.embedded.close()
    archives = [{"path": str(here), "name": "here"}, {"path": str(away), "name": "away"}]
    lab.config.write_text(
        yaml.safe_dump({"registry": "embedded", "state_dir": str(lab.state), "archives": archives})
    )

    first = lab.switch()
    assert first.returncode == 1, first.stdout + first.stderr  # `away` is not mounted
    assert "does not exist (filesystem unmounted?)" in first.stderr
    with HttpRegistry(lab.server.url, lab.server.auth) as reg:
        assert {x.archive_name for x in reg.get_locations(name)} == {arch, tape}
        reg.remove_location(name, tape)  # the tape is recycled: the copy is gone

    away.mkdir(parents=True)  # mounted again days later
    (away / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    again = lab.switch()
    assert again.returncode == 0, again.stdout + again.stderr
    with HttpRegistry(lab.server.url) as reg:
        assert {x.archive_name for x in reg.get_locations(name)} == {arch}, again.stdout


def test_rerunning_a_switch_accepts_metadata_corrected_on_the_server_since(lab: Lab) -> None:
    """After the switch the server is the registry: metadata corrected there since is not a
    'conflict' that stops the re-run (whose advice, 'fix them', means undoing the edit)."""
    here, away = lab.tmp / "here", lab.tmp / "mnt" / "away"
    here.mkdir()
    (here / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    arch = lab.embedded.add_archive(unique_name("ar"), "neurobank", str(here)).name
    name = unique_name("song")
    lab.embedded.add_resource(
        dtype=lab.dtype, archive=arch, name=name, sha1=sha1(os.urandom(9)), metadata={"q": "ok"}
    )
    lab.embedded.close()
    archives = [{"path": str(here), "name": "here"}, {"path": str(away), "name": "away"}]
    lab.config.write_text(
        yaml.safe_dump({"registry": "embedded", "state_dir": str(lab.state), "archives": archives})
    )
    first = lab.switch()
    assert first.returncode == 1, first.stdout + first.stderr  # `away` is not mounted
    with HttpRegistry(lab.server.url, lab.server.auth) as reg:
        reg.update_metadata(name, {"q": "bad electrode"})  # a correction, on the server

    away.mkdir(parents=True)
    (away / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    again = lab.switch()
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((away / "nbank.json").read_text())["registry"] == lab.server.url
    with HttpRegistry(lab.server.url) as reg:
        record = reg.get_resource(name)
    assert record is not None and record.metadata == {"q": "bad electrode"}


# --- what arrives on the server ---------------------------------------------------------


def test_a_tape_only_resource_keeps_its_tape_key_on_the_server(lab: Lab) -> None:
    """(guard, passes) A resource whose only location is a tape arrives with its key."""
    tape = lab.embedded.add_archive(unique_name("tape"), "tape", unique_name("t") + ":0").name
    name = unique_name("song")
    key = f"resources/{name[:2]}/{name}.wav"
    lab.embedded.add_resource(
        dtype=lab.dtype, archive=tape, name=name, sha1=sha1(os.urandom(9)), key=key
    )
    assert [(x.archive_name, x.key) for x in lab.embedded.get_locations(name)] == [(tape, key)]
    proc = lab.ctl("registry", "migrate", "--to", lab.server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with HttpRegistry(lab.server.url) as reg:
        assert [(x.archive_name, x.key) for x in reg.get_locations(name)] == [(tape, key)]


def test_an_archive_whose_root_differs_only_in_case_is_a_conflict(tmp_path: Path) -> None:
    """/data/Arch and /data/arch are different folders: an archive of the same name with
    the other one is a conflict, not 'present' (its locations would point elsewhere)."""
    source = EmbeddedRegistry(tmp_path / "src.sqlite3")
    source.add_datatype("wav", "audio/wav", "wav")
    source.add_archive("arch", "neurobank", "/data/arch")
    source.add_resource(dtype="wav", archive="arch", name="r1", sha1="a" * 40)
    target = EmbeddedRegistry(tmp_path / "dst.sqlite3")
    target.add_archive("arch", "neurobank", "/data/Arch")
    snap = snapshot.take(source)
    plan = make_plan(snap, execute.read_target(target, snap))
    [step] = [s for s in plan.steps if s.kind == "archive"]
    assert step.verdict is Verdict.CONFLICT, step
    assert isinstance(step.record, ArchiveRecord)


# --- pauses ----------------------------------------------------------------------------------


def _paused(h: DaemonHarness) -> dict[str, bool]:
    status: dict[str, Any] = ControlClient(h.socket_path).call("status")
    return {i["path"]: i["paused"] for i in status["inboxes"]}


def test_a_switch_finished_with_nbankd_stopped_does_not_leave_its_inboxes_paused(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """Killed mid-switch, nbankd then stopped, the switch run again to its end: when nbankd
    starts, the inboxes the switch paused run again (or the switch says to resume them)."""
    server = django_registry
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start()
    h.drop(f"{unique_name('one')}.wav", os.urandom(700))
    h.wait_settled(1)
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "home" / ".netrc")
    switch = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", server.url]
    switch += ["--registry-auth", str(netrc)]

    killed = run(switch, env, NBANKD_CRASH_AT="switch-after-nbank-json")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert _paused(h) == {str(h.inbox): True}
    h.stop()  # the admin stops nbankd, then finishes the switch as the status said

    done = run(switch, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"switched to {server.url}" in done.stdout
    h.start()
    try:
        told = "nbankctl resume" in done.stdout + done.stderr
        assert _paused(h) == {str(h.inbox): False} or told, done.stdout + done.stderr
    finally:
        h.stop()


# --- exporting from a live django-neurobank (registry migrate -r OLD --to NEW) ----------------


def test_an_export_from_a_live_server_misses_no_record_when_another_is_deleted_meanwhile(
    django_registry: DjangoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server export pages through resources by page number: one resource deleted by
    someone else during the export must not make another, untouched one go missing
    from an export that then claims to be complete."""
    from nbankd.registry import http_transport

    server = django_registry
    dtype = server.add_datatype()
    doomed = "00" + unique_name("gone", 30)  # sorts first: on the first page
    server.post("resources/", {"name": doomed, "dtype": dtype, "sha1": sha1(os.urandom(8))})
    kept = [unique_name("kept") for _ in range(101)]  # more than one page (PAGE_SIZE 100)
    for name in kept:
        server.post("resources/", {"name": name, "dtype": dtype, "sha1": sha1(os.urandom(8))})

    real = http_transport.HttpTransport.request
    pages: list[str] = []

    def request(self: Any, method: str, url: str, *args: Any, **kw: Any) -> Any:
        resp = real(self, method, url, *args, **kw)
        if method == "GET" and url.endswith("/resources/"):
            pages.append(url)
            if len(pages) == 1:  # another client deletes a record after the first page
                import requests

                gone = requests.delete(f"{server.url}resources/{doomed}/", auth=server.auth)
                assert gone.status_code == 204, gone.text
        return resp

    monkeypatch.setattr(http_transport.HttpTransport, "request", request)
    with HttpRegistry(server.url) as reg:
        snap = snapshot.take(reg)
    assert len(pages) >= 2
    exported = {r.name for r in snap.resources}
    assert set(kept) <= exported, sorted(set(kept) - exported)


# --- added with the fixes: what the re-run still does, and the edges of the fixes -----------


def test_rerunning_a_switch_still_imports_what_was_deposited_since(lab: Lab) -> None:
    """The re-run's purpose holds: a resource deposited into the embedded registry since
    the first run, and a tape copy added since to a resource corrected on the server, both
    reach the server; the correction stays."""
    here, away = lab.tmp / "here", lab.tmp / "mnt" / "away"
    here.mkdir()
    (here / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    arch = lab.embedded.add_archive(unique_name("ar"), "neurobank", str(here)).name
    tape = lab.embedded.add_archive(unique_name("tape"), "tape", unique_name("t") + ":0").name
    old, late = unique_name("song"), unique_name("late")
    lab.embedded.add_resource(
        dtype=lab.dtype, archive=arch, name=old, sha1=sha1(os.urandom(9)), metadata={"q": "ok"}
    )
    lab.embedded.close()
    archives = [{"path": str(here), "name": "here"}, {"path": str(away), "name": "away"}]
    lab.config.write_text(
        yaml.safe_dump({"registry": "embedded", "state_dir": str(lab.state), "archives": archives})
    )
    first = lab.switch()
    assert first.returncode == 1, first.stdout + first.stderr  # `away` is not mounted
    with HttpRegistry(lab.server.url, lab.server.auth) as reg:
        reg.update_metadata(old, {"q": "bad electrode"})
    with EmbeddedRegistry(lab.state / "registry.sqlite3") as embedded:  # registered late
        embedded.add_resource(dtype=lab.dtype, archive=arch, name=late, sha1=sha1(os.urandom(9)))
        embedded.add_location(old, tape, key=f"resources/{old[:2]}/{old}.wav")

    away.mkdir(parents=True)
    (away / "nbank.json").write_text(json.dumps({"registry": lab.db_url, "policy": {}}))
    again = lab.switch()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "importing what the embedded registry holds new since the export recorded" in (
        again.stdout
    )
    with HttpRegistry(lab.server.url) as reg:
        assert {x.archive_name for x in reg.get_locations(late)} == {arch}
        assert {x.archive_name for x in reg.get_locations(old)} == {arch, tape}
        record = reg.get_resource(old)
    assert record is not None and record.metadata == {"q": "bad electrode"}


def test_changes_since_an_export_hold_only_new_records_and_what_places_them(
    tmp_path: Path,
) -> None:
    """A new resource comes with its locations; a location added to an unchanged resource
    brings that resource as 'moved' (the target's record wins) and its archive."""
    reg = EmbeddedRegistry(tmp_path / "r.sqlite3")
    reg.add_datatype("wav", "audio/wav", "wav")
    reg.add_archive("arch", "neurobank", "/data/arch")
    reg.add_archive("tape1-0", "tape", "tape1:0", "offline")
    reg.add_resource(dtype="wav", archive="arch", name="r1", sha1="a" * 40)
    reg.add_resource(dtype="wav", archive="arch", name="r2", sha1="b" * 40)
    earlier = snapshot.take(reg)
    assert snapshot.changes(snapshot.take(reg), earlier).empty
    reg.add_resource(dtype="wav", archive="arch", name="r3", sha1="c" * 40)
    reg.add_location("r1", "tape1-0", key="resources/r1/r1.wav")
    new = snapshot.changes(snapshot.take(reg), earlier)
    snap = new.snapshot
    assert [r.name for r in snap.resources] == ["r1", "r3"] and new.moved == {"r1"}
    assert {(x.resource_name, x.archive_name) for x in snap.locations} == {
        ("r1", "tape1-0"),
        ("r3", "arch"),
    }
    assert {a.name for a in snap.archives} == {"arch", "tape1-0"} and snap.datatypes == ()


def test_a_moved_resource_keeps_the_targets_record_or_blocks_if_it_is_gone(
    tmp_path: Path,
) -> None:
    """For a resource moved earlier the target's metadata wins (a note, not a conflict);
    one deleted from the target since blocks its new location, saying what to do."""
    source = EmbeddedRegistry(tmp_path / "src.sqlite3")
    source.add_datatype("wav", "audio/wav", "wav")
    source.add_archive("arch", "neurobank", "/data/arch")
    source.add_resource(dtype="wav", archive="arch", name="r1", sha1="a" * 40, metadata={"q": 1})
    source.add_resource(dtype="wav", archive="arch", name="r2", sha1="b" * 40)
    target = EmbeddedRegistry(tmp_path / "dst.sqlite3")
    target.add_datatype("wav", "audio/wav", "wav")
    target.add_archive("arch", "neurobank", "/data/arch")
    target.add_resource(dtype="wav", archive=None, name="r1", sha1="a" * 40, metadata={"q": 2})
    snap = snapshot.take(source)
    plan = make_plan(snap, execute.read_target(target, snap), moved=frozenset({"r1", "r2"}))
    steps = {(s.kind, s.name): s for s in plan.steps}
    assert steps[("resource", "r1")].verdict is Verdict.PRESENT
    assert "is kept as it is" in steps[("resource", "r1")].message
    assert steps[("location", "r1@arch")].verdict is Verdict.CREATE
    gone = steps[("resource", "r2")]
    assert gone.verdict is Verdict.BLOCKED and "re-create it on the target" in gone.message
    assert steps[("location", "r2@arch")].verdict is Verdict.BLOCKED


class _Shrinking:
    """A registry whose resources someone deletes, one by one, throughout every listing."""

    url, backend = "https://busy.example/neurobank/", "django-neurobank"

    def __init__(self) -> None:
        self.names = [f"r{n:03d}" for n in range(20)]

    def list_datatypes(self) -> list[DataType]:
        return [DataType("wav", "audio/wav", "wav")]

    def list_archives(self) -> list[ArchiveRecord]:
        return []

    def search(self) -> list[ResourceRecord]:
        self.names.pop(0)
        return [ResourceRecord(name=n, sha1=None, dtype="wav") for n in self.names]

    def get_locations_bulk(self, names: Any) -> dict[str, list[Any]]:
        return {}


def test_an_export_gives_up_clearly_when_every_listing_loses_records() -> None:
    """Records deleted during every listing: no export claiming to be complete, but an
    error naming the registry, a record gone, and what to do."""
    registry = _Shrinking()
    with pytest.raises(errors.RegistryError, match=r"busy\.example.*'r004'") as caught:
        snapshot.take(registry)  # type: ignore[arg-type]
    assert "export again when no one deletes records" in str(caught.value)
    assert len(registry.names) == 20 - snapshot.LISTINGS


def test_unpausing_with_nbankd_stopped_keeps_pauses_made_by_someone_else(
    tmp_path: Path,
) -> None:
    """Only the inboxes the switch recorded leave nbankd's paused.json; the switch's record
    goes; an operator's pause stays."""
    from nbankd.daemon import pauses
    from nbankd.migration import pausing

    pauses.save(tmp_path, ["/in/switched", "/in/serviced"])
    assert pausing.unpause_stopped(tmp_path) is None  # no switch under way: untouched
    pausing.write_paused(tmp_path, ["/in/switched", "/in/gone"], tmp_path / "sock")
    assert pausing.unpause_stopped(tmp_path) == ["/in/switched"]
    assert pauses.load(tmp_path) == {"/in/serviced"}
    assert not pausing.paused_path(tmp_path).exists()
