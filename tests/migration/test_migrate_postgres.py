"""Registry migration into django-neurobank on PostgreSQL, end to end, no daemon.

An embedded registry (``Lab`` of the CLI migration tests) is moved with ``nbankctl
registry switch`` or ``migrate`` into the session's django-neurobank served from the
private PostgreSQL cluster (``django_registry_pg``, several gunicorn workers), with
``--jobs`` creating records concurrently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ctl.test_migrate_cli import Lab
from ctl.test_migrate_e2e import COMPARED
from fixtures.django_server import DjangoServer, unique_name
from nbankd.registry.base import ResourceRecord
from nbankd.registry.http import HttpRegistry

RECORDS = 24


@pytest.fixture
def lab(tmp_path: Path, django_registry_pg: DjangoServer) -> Lab:
    """An embedded registry and the PostgreSQL-backed server."""
    return Lab(tmp_path, django_registry_pg)


def fill(lab: Lab) -> dict[str, ResourceRecord]:
    """Registers RECORDS resources (metadata, an experimenter, an animal); returns them by name."""
    bird = lab.server.add_animal()
    for i in range(RECORDS):
        metadata: dict[str, object] = {"take": i, "rig": f"rig{i % 3}", "zeta": None}
        if i % 4 == 0:
            metadata["experimenter"] = lab.server.reader_username
        if i % 5 == 0:
            metadata["animal"] = bird
        lab.resource(unique_name(f"pg{i}"), os.urandom(64), **metadata)
    return {r.name: r for r in lab.embedded.search()}


def switch(lab: Lab) -> str:
    """Runs ``registry switch --to`` the server (3 jobs, no daemon); returns its stdout."""
    proc = lab.ctl(
        "registry", "switch", "--to", lab.server.url, "--jobs", "3",
        "--socket", str(lab.tmp / "none"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def on_server(lab: Lab, names: list[str]) -> dict[str, ResourceRecord]:
    with HttpRegistry(lab.server.url) as reg:
        return {r.name: r for r in reg.get_resources(names)}


def test_the_target_stores_in_postgresql(django_registry_pg: DjangoServer) -> None:
    """The server these tests migrate into runs on PostgreSQL, not SQLite."""
    code = "from django.db import connection; print(connection.vendor)"
    assert django_registry_pg.shell(code).strip() == "postgresql"


def test_switch_moves_every_record_with_its_sha1(lab: Lab) -> None:
    """switch into the PostgreSQL-backed server: every record is there with the same sha1."""
    before = fill(lab)
    out = switch(lab)
    assert f"resources: {RECORDS} created" in out
    after = on_server(lab, list(before))
    assert {n: r.sha1 for n, r in after.items()} == {n: r.sha1 for n, r in before.items()}
    assert all(r.sha1 for r in after.values())


def test_switched_records_keep_metadata_and_locations(lab: Lab) -> None:
    """Metadata, experimenter, animal, filename and location arrive unchanged."""
    before = fill(lab)
    switch(lab)
    after = on_server(lab, list(before))
    for name, record in before.items():
        theirs, mine = after[name].to_json(), record.to_json()
        assert {k: theirs[k] for k in COMPARED} == {k: mine[k] for k in COMPARED}
        assert after[name].locations == (lab.archive,)


def test_switch_points_the_configuration_at_the_server(lab: Lab) -> None:
    """After the switch the configuration's registry is the PostgreSQL-backed server."""
    fill(lab)
    switch(lab)
    assert yaml.safe_load(lab.config.read_text())["registry"] == lab.server.url


def test_migrate_again_finds_every_record_present(lab: Lab) -> None:
    """A second ``registry migrate`` creates nothing: every resource is present once."""
    fill(lab)
    first = lab.ctl("registry", "migrate", "--to", lab.server.url, "--jobs", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    again = lab.ctl("registry", "migrate", "--to", lab.server.url, "--jobs", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resources: {RECORDS} present" in again.stdout
    assert "created" not in again.stdout
