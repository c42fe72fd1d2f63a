"""nbankctl registry export/import/switch against the real django-neurobank: conflicts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, base_env
from fixtures.django_server import DjangoServer, unique_name
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class Lab:
    """An embedded registry (configuration + database) and the shared django server."""

    def __init__(self, tmp: Path, server: DjangoServer) -> None:
        self.tmp, self.server = tmp, server
        self.config = tmp / "config.yaml"
        self.config.write_text(f"registry: embedded\nstate_dir: {tmp / 'state'}\n")
        self.env = base_env(tmp / "home")
        server.write_netrc(tmp / "home" / ".netrc")
        self.embedded = EmbeddedRegistry(tmp / "state" / "registry.sqlite3")
        self.dtype = self.embedded.add_datatype(unique_name("dt"), "audio/wav", "wav").name
        self.archive = self.embedded.add_archive(unique_name("ar"), "neurobank", str(tmp)).name

    def resource(self, name: str, data: bytes, **metadata: object) -> str:
        self.embedded.add_resource(
            dtype=self.dtype,
            archive=self.archive,
            name=name,
            sha1=sha1(data),
            metadata=metadata or None,
        )
        return name

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NBANKCTL, "-c", str(self.config), *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture
def lab(tmp_path: Path, django_registry: DjangoServer) -> Lab:
    return Lab(tmp_path, django_registry)


def test_conflicts_are_reported_and_left_untouched(lab: Lab) -> None:
    """Same name/other sha1, same sha1/other name, unknown user: reported, exit 1, untouched."""
    server = lab.server
    theirs_dtype = server.add_datatype()
    theirs_archive = server.add_archive(str(lab.tmp / "elsewhere"))
    clash, other = unique_name("clash"), unique_name("other")
    taken = os.urandom(16)
    server.post("resources/", {"name": clash, "dtype": theirs_dtype, "sha1": sha1(b"x" + taken)})
    server.post("resources/", {"name": other, "dtype": theirs_dtype, "sha1": sha1(taken)})
    ok = lab.resource(unique_name("ok"), os.urandom(16), rig="r3")
    lab.resource(clash, os.urandom(16))
    dupe = lab.resource(unique_name("dupe"), taken)
    ghost = lab.resource(unique_name("ghost"), os.urandom(16), experimenter="no-such-user")
    export = lab.tmp / "export.jsonl"
    made = lab.ctl("registry", "export", "-o", str(export))
    assert made.returncode == 0, made.stderr
    assert "4 resource(s)" in made.stderr

    dry = lab.ctl("registry", "import", str(export), "--to", server.url, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert f"✗ resource {clash}: conflict" in dry.stdout
    assert f"is {other!r} on the target" in dry.stdout
    assert "resources: 2 to create, 2 conflict" in dry.stdout
    with HttpRegistry(server.url) as reg:
        assert reg.get_resource(ok) is None  # a dry run changes nothing

    done = lab.ctl("registry", "import", str(export), "--to", server.url, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    status = {(x["kind"], x["name"]): x["status"] for x in lines if "kind" in x}
    assert status[("resource", ok)] == "created"
    assert status[("resource", clash)] == "conflict"
    assert status[("resource", dupe)] == "conflict"
    assert status[("resource", ghost)] == "failed"
    assert "create this user" in next(x["message"] for x in lines if x.get("name") == ghost)
    with HttpRegistry(server.url) as reg:
        created = reg.get_resource(ok)
        assert created is not None and created.locations == (lab.archive,)
        assert created.metadata == {"rig": "r3"}
        kept = reg.get_resource(clash)
        assert kept is not None and kept.sha1 == sha1(b"x" + taken)
        assert kept.locations == () and reg.get_resource(dupe) is None
        assert reg.get_archive(theirs_archive) is not None
        [dtype] = [d for d in reg.list_datatypes() if d.name == lab.dtype]
        assert (dtype.content_type, dtype.extension) == ("audio/wav", "wav")
        assert created.filename == f"{ok}.wav"


def test_switch_stops_before_changing_anything_when_the_import_conflicts(lab: Lab) -> None:
    """A conflicting import leaves the configuration and nbank.json files as they were."""
    clash = unique_name("clash")
    dtype = lab.server.add_datatype()
    lab.server.post("resources/", {"name": clash, "dtype": dtype, "sha1": sha1(os.urandom(8))})
    lab.resource(clash, os.urandom(8))
    before = lab.config.read_text()
    proc = lab.ctl("registry", "switch", "--to", lab.server.url, "--socket", str(lab.tmp / "none"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nbankd is not running" in proc.stdout
    assert "nothing was switched" in proc.stderr
    assert lab.config.read_text() == before
    assert sorted(p.name for p in lab.tmp.glob("config.yaml*")) == ["config.yaml"]
    assert not (lab.tmp / "state" / "registry-moves.jsonl").exists()


def test_switch_dry_run_changes_nothing(lab: Lab) -> None:
    """--dry-run shows the plan and the edits, and leaves the server and the files alone."""
    ok = lab.resource(unique_name("ok"), os.urandom(8))
    before = lab.config.read_text()
    proc = lab.ctl(
        "registry", "switch", "--to", lab.server.url, "--dry-run", "--socket", str(lab.tmp / "x")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resources: 1 to create" in proc.stdout
    assert f"would edit {lab.config}: set 'registry: {lab.server.url}'" in proc.stdout
    assert lab.config.read_text() == before
    assert not (lab.tmp / "state" / "migration").exists()
    with HttpRegistry(lab.server.url) as reg:
        assert reg.get_resource(ok) is None


def test_switch_refuses_a_configuration_already_on_a_server(lab: Lab) -> None:
    """switch moves an embedded registry only; a configuration on a URL is a usage error."""
    lab.config.write_text(f"registry: {lab.server.url}\nstate_dir: {lab.tmp / 'state'}\n")
    proc = lab.ctl("registry", "switch", "--to", lab.server.url)
    assert proc.returncode == 2
    assert "the switch is done" in proc.stderr


def test_import_refuses_embedded_as_target(lab: Lab) -> None:
    """--to must be a django-neurobank URL."""
    proc = lab.ctl("registry", "migrate", "--to", "embedded")
    assert proc.returncode == 2 and "not 'embedded'" in proc.stderr


def test_config_option_before_a_nested_command_is_kept() -> None:
    """`nbankctl -c FILE registry export` (and tape, dtype...) keep -c; after the command too."""
    from nbankctl.cli import build_parser

    parser = build_parser()
    for argv in (
        ["-c", "/x.yaml", "registry", "export"],
        ["-c", "/x.yaml", "tape", "register", "T", "0", "f.tar"],
        ["-c", "/x.yaml", "dtype", "list"],
        ["registry", "switch", "-c", "/x.yaml", "--to", "https://h/neurobank/"],
    ):
        assert parser.parse_args(argv).config == "/x.yaml", argv
    assert parser.parse_args(["dtype", "list"]).config is None
