"""nbankctl registry export/import/switch against the real django-neurobank, no daemon:
conflicts, refusals, unreachable archives, altered records, unusable credentials."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from fixtures.cli_backends import NBANKCTL, base_env
from fixtures.django_server import DjangoServer, aliasing_server, unique_name
from fixtures.users import TestUser
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


def test_a_target_record_whose_metadata_is_a_list_is_a_conflict_in_the_plan(lab: Lab) -> None:
    """A target record whose metadata an admin made a list is planned as a conflict, not a crash."""
    data = os.urandom(16)
    name = lab.resource(unique_name("listed"), data, rig="r3")
    lab.server.add_datatype(lab.dtype, "audio/wav")
    lab.server.post("resources/", {"name": name, "dtype": lab.dtype, "sha1": sha1(data)})
    lab.server.shell(  # as its admin form stores a list typed there (the API refuses it)
        "from nbank_registry.models import Resource; "
        f"Resource.objects.filter(name={name!r}).update(metadata=['r3', 1])"
    )
    try:
        proc = lab.ctl("registry", "migrate", "--to", lab.server.url, "--dry-run")
        with HttpRegistry(lab.server.url) as reg:
            record = reg.get_resource(name)
    finally:  # a whole export of the session's server warns of it (and exits 1)
        lab.server.shell(
            f"from nbank_registry.models import Resource; Resource.objects.filter(name={name!r})"
            ".delete()"
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"resource {name}: conflict" in proc.stdout
    assert "metadata is a list on the target, an object in the export" in proc.stdout
    assert record is not None and record.metadata == ["r3", 1]


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


def test_switch_refuses_configurations_it_cannot_finish(lab: Lab) -> None:
    """On another server: refused; on the URL already but no recorded move: refused (exit 2)."""
    state = lab.tmp / "state"
    lab.config.write_text(f"registry: {lab.server.url}\nstate_dir: {state}\n")
    other = lab.ctl("registry", "switch", "--to", "http://127.0.0.1:9/neurobank/")
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"uses registry {lab.server.url}, not the embedded one" in other.stderr
    same = lab.ctl("registry", "switch", "--to", lab.server.url)
    assert same.returncode == 2, same.stdout + same.stderr
    assert "records no move to it: there is no switch to finish" in same.stderr
    assert not (state / "migration").exists()


def test_switch_stops_when_the_daemon_does_not_answer(lab: Lab) -> None:
    """A control socket that accepts but never answers is not 'not running': exit 3, no change."""
    ok = lab.resource(unique_name("ok"), os.urandom(8))
    path = lab.tmp / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.1)
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                server.accept()[0].close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    before = lab.config.read_text()
    try:
        proc = lab.ctl("registry", "switch", "--to", lab.server.url, "--socket", str(path))
    finally:
        stop.set()
        thread.join()
        server.close()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "nbankd closed the connection during 'status': not switching" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert lab.config.read_text() == before
    assert not (lab.tmp / "state" / "migration").exists()
    with HttpRegistry(lab.server.url) as reg:
        assert reg.get_resource(ok) is None


def test_export_and_target_usage_errors(lab: Lab) -> None:
    """export -o into a missing folder names that file; --to with user:password@ is refused."""
    target = lab.tmp / "missing" / "x.jsonl"
    proc = lab.ctl("registry", "export", "-o", str(target))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot write the export file {target}: No such file or directory" in proc.stderr
    assert ".tmp" not in proc.stderr
    url = lab.server.url.replace("http://", "http://someone:secret@")
    proc = lab.ctl("registry", "migrate", "--to", url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--registry-auth" in proc.stderr and "secret" not in proc.stderr


def test_switch_dry_run_exits_1_when_the_real_run_would_stop(lab: Lab) -> None:
    """A configuration the switch would not edit (a symlink) makes the dry run exit 1."""
    real = lab.tmp / "real.yaml"
    real.write_text(lab.config.read_text())
    lab.config.unlink()
    lab.config.symlink_to(real)
    proc = lab.ctl(
        "registry", "switch", "--to", lab.server.url, "--dry-run", "--socket", str(lab.tmp / "x")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not editing" in proc.stderr and "it is a symlink" in proc.stderr
    assert f"would stop here and ask for these edits: set 'registry: {lab.server.url}'" in (
        proc.stderr
    )
    assert lab.config.is_symlink() and real.read_text() == lab.config.read_text()


def test_datatype_differences_are_shown_without_verbose(lab: Lab) -> None:
    """A datatype the server has with another extension is printed (it renames every file)."""
    lab.server.post(
        "datatypes/", {"name": lab.dtype, "content_type": "audio/wav", "extension": "flac"}
    )
    lab.resource(unique_name("ok"), os.urandom(8))
    proc = lab.ctl("registry", "migrate", "--to", lab.server.url, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"= datatype {lab.dtype}: present (on the target with content type" in proc.stdout
    assert "extension 'flac'" in proc.stdout


def test_an_unreachable_archive_is_finished_by_running_the_switch_again(lab: Lab) -> None:
    """nbank.json naming the db's file: URL is switched; an unmounted one on the re-run."""
    state = lab.tmp / "state"
    old = "https://old.example/neurobank/"
    here, away = lab.tmp / "here", lab.tmp / "mnt" / "away"
    here.mkdir()
    db_url = (state / "registry.sqlite3").as_uri() + "/"
    (here / "nbank.json").write_text(json.dumps({"registry": db_url, "policy": {}}))
    archives = [{"path": str(here), "name": "here"}, {"path": str(away), "name": "away"}]
    config = {"registry": "embedded", "registry_url": old, "state_dir": str(state)}
    lab.config.write_text(yaml.safe_dump({**config, "archives": archives}))
    name = lab.resource(unique_name("ok"), os.urandom(8))
    switch = ["registry", "switch", "--to", lab.server.url, "--socket", str(lab.tmp / "none")]

    first = lab.ctl(*switch)
    assert first.returncode == 1, first.stdout + first.stderr
    assert json.loads((here / "nbank.json").read_text())["registry"] == lab.server.url
    assert f"{away / 'nbank.json'} does not exist (filesystem unmounted?)" in first.stderr
    assert f'set "registry": "{lab.server.url}" in it by hand' in first.stderr
    assert yaml.safe_load(lab.config.read_text())["registry"] == lab.server.url

    away.mkdir(parents=True)  # mounted again, still naming the old registry
    (away / "nbank.json").write_text(json.dumps({"registry": old, "policy": {}}))
    again = lab.ctl(*switch)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"finishing the switch from {old}" in again.stdout
    assert f"switched to {lab.server.url}" in again.stdout
    assert json.loads((away / "nbank.json").read_text())["registry"] == lab.server.url
    assert "names the new registry already" in again.stdout  # `here` is left as it is
    [line] = (state / "registry-moves.jsonl").read_text().splitlines()
    assert json.loads(line)["from"] == old
    with HttpRegistry(lab.server.url) as reg:
        assert reg.get_resource(name) is not None


def test_a_record_the_server_changes_is_reported_as_altered(lab: Lab) -> None:
    """A server moving metadata 'bird' into 'animal': the created record is 'altered', exit 1."""
    bird = lab.server.add_animal()
    name = lab.resource(unique_name("bird"), os.urandom(8), bird=bird)
    with aliasing_server(lab.server, lab.tmp) as url:
        proc = lab.ctl("registry", "migrate", "--to", url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"! resource {name}: altered (created, but the registry changed it: " in proc.stdout
    assert "resources: 1 altered" in proc.stdout
    with HttpRegistry(lab.server.url) as reg:
        record = reg.get_resource(name)
    assert record is not None and record.animal == bird and "bird" not in (record.metadata or {})


def test_switch_refuses_credentials_the_daemon_cannot_read(lab: Lab, unpriv_user: TestUser) -> None:
    """state_dir owned by nbankd's user, credentials readable by root only: stop, no change."""
    state = lab.tmp / "state"
    os.chown(state, unpriv_user.uid, unpriv_user.gid)
    auth = lab.server.write_netrc(lab.tmp / "auth")
    lab.resource(unique_name("ok"), os.urandom(8))
    before = lab.config.read_text()
    proc = lab.ctl(
        "registry", "switch", "--to", lab.server.url, "--registry-auth", str(auth),
        "--socket", str(lab.tmp / "none"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"the credentials file {auth} " in proc.stderr
    assert f"user {unpriv_user.name} may not" in proc.stderr
    assert lab.config.read_text() == before
    assert not (state / "registry-moves.jsonl").exists()


def test_an_nbank_json_that_cannot_be_written_is_reported_with_the_edit(
    django_registry: DjangoServer, unpriv_user: TestUser, user_tmp_path: Path
) -> None:
    """Run as a user who may not write an archive folder: that nbank.json is named, exit 1."""
    root = user_tmp_path
    lab = Lab(root, django_registry)
    name = lab.resource(unique_name("ok"), os.urandom(8))
    lab.embedded.close()
    archive = root / "archive"
    archive.mkdir()  # root's, mode 0755: the user cannot replace nbank.json in it
    db_url = (root / "state" / "registry.sqlite3").as_uri() + "/"
    (archive / "nbank.json").write_text(json.dumps({"registry": db_url}))
    state = {"registry": "embedded", "state_dir": str(root / "state")}
    lab.config.write_text(yaml.safe_dump({**state, "archives": [{"path": str(archive)}]}))
    auth = django_registry.write_netrc(root / "auth")
    for path in [lab.config, auth, *(root / "state").rglob("*"), root / "state"]:
        os.chown(path, unpriv_user.uid, unpriv_user.gid)
    proc = unpriv_user.run(
        [
            NBANKCTL,
            "-c",
            lab.config,
            "registry",
            "switch",
            "--to",
            django_registry.url,
            "--registry-auth",
            auth,
            "--socket",
            root / "none",
        ]
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{archive / 'nbank.json'} cannot be rewritten: Permission denied" in proc.stderr
    assert f'set "registry": "{django_registry.url}" in it by hand' in proc.stderr
    assert json.loads((archive / "nbank.json").read_text())["registry"] == db_url
    assert yaml.safe_load(lab.config.read_text())["registry"] == django_registry.url
    with HttpRegistry(django_registry.url) as reg:
        assert reg.get_resource(name) is not None


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


def test_switch_with_json_writes_only_json_lines_to_stdout(lab: Lab) -> None:
    """--json: every line on standard output is JSON, the last one what became of the
    switch; the progress lines go to standard error."""
    lab.resource(unique_name("ok"), os.urandom(8))
    proc = lab.ctl(
        "--json", "registry", "switch", "--to", lab.server.url, "--dry-run",
        "--socket", str(lab.tmp / "x"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1] == {
        "registry": lab.server.url,
        "previous": lines[-1]["previous"],
        "config": str(lab.config),
        "dry_run": True,
        "switched": False,
    }
    assert f"would edit {lab.config}" in proc.stderr
