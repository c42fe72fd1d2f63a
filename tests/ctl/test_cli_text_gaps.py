"""Text nbankctl prints that it does not write itself (a registry's roots and messages,
nbankd's, a tar member's or a resource's name) reaches the terminal with its control
characters shown as text, as everywhere else in nbankctl (``nbankd.names``); and
``deposit -d`` refuses bytes that are not UTF-8 as ``-k`` does.

Findings (a hostile review, fixed): the import's and the switch's progress lines, the
lines of fetch, export and tape prune printed such text raw (an escape sequence
reached the terminal, a newline made a line of its own); ``deposit -d`` with bytes
that are not UTF-8 was looked up as a datatype, and said to be one to add.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, base_env, make_backend
from fixtures.django_server import DjangoServer, unique_name
from nbankctl import migrate_credentials, migrate_switch
from nbankd.registry.embedded import EmbeddedRegistry

#: what a registry's or a file's text may hold: clear the screen, then a new line
HOSTILE = "x\x1b[2J\ny"
SHOWN = "x\\x1b[2J\\x0ay"


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("embedded", tmp_path, request)


def test_import_lines_show_a_registry_root_with_its_controls_as_text(
    tmp_path: Path, django_registry: DjangoServer
) -> None:
    """A conflict quoting the target's archive root prints its escape and newline as text."""
    server = django_registry
    name = unique_name("ar")
    server.post("archives/", {"name": name, "scheme": "neurobank", "root": f"/data/{HOSTILE}"})
    try:
        _import_dry_run_shows_the_root(tmp_path, server, name)
    finally:  # other tests list every archive of the session's server (nbank parity)
        server.shell(
            f"from nbank_registry.models import Archive; Archive.objects.filter(name={name!r})"
            ".delete()"
        )


def _import_dry_run_shows_the_root(tmp_path: Path, server: DjangoServer, name: str) -> None:
    state = tmp_path / "state"
    source = EmbeddedRegistry(state / "registry.sqlite3")
    source.add_archive(name, "neurobank", "/data/elsewhere")
    source.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {state}\n")
    export = tmp_path / "export.jsonl"
    backend = Backend("embedded", tmp_path, source, make_env(tmp_path, server), ["-c", str(config)])
    assert backend.ctl("registry", "export", "-o", str(export)).returncode == 0
    proc = backend.ctl("registry", "import", str(export), "--to", server.url, "--dry-run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if f"archive {name}: conflict" in x]
    assert f"/data/{SHOWN}" in line
    assert "\x1b" not in proc.stdout


def make_env(tmp: Path, server: DjangoServer) -> dict[str, str]:
    """An environment whose HOME holds a netrc for the server."""
    env = base_env(tmp / "home")
    server.write_netrc(tmp / "home" / ".netrc")
    return env


def test_switch_progress_and_warnings_show_controls_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A switch's progress line and warning quoting nbankd's or a registry's text keep to
    their own lines, the quoted controls shown as text."""
    migrate_switch.note(f"nbankd now uses {HOSTILE}")
    migrate_credentials.warn(f"nbankd: {HOSTILE}\n  run it again")
    out, err = capsys.readouterr()
    assert out == f"nbankd now uses {SHOWN}\n"
    assert err == "nbankctl: nbankd: x\\x1b[2J\ny\n  run it again\n"


def test_fetch_and_export_show_a_given_name_with_its_controls_as_text(embedded: Backend) -> None:
    """fetch's line (stdout) and export's (stderr) for an unknown id show its controls as text."""
    archive, _ = embedded.archive()
    fetched = embedded.ctl("fetch", "-d", str(embedded.tmp), HOSTILE)
    assert fetched.returncode == 1
    assert "\x1b" not in fetched.stdout and SHOWN in fetched.stdout
    exported = embedded.ctl("export", str(archive.path), str(embedded.tmp / "o.tar"), HOSTILE)
    assert exported.returncode != 0
    assert "\x1b" not in exported.stderr and SHOWN in exported.stderr


def test_tape_prune_shows_an_id_with_its_controls_as_text(embedded: Backend) -> None:
    """tape prune's line for an id of its list that the registry lacks shows its escape
    as text."""
    _, arch = embedded.archive()
    ids = embedded.tmp / "ids"
    ids.write_text("x\x1b[2Jy\n")
    proc = embedded.ctl("tape", "prune", arch, str(ids))
    assert proc.returncode == 1, proc.stderr
    assert "\x1b" not in proc.stderr
    assert "✗ x\\x1b[2Jy -> not in registry" in proc.stderr


def test_deposit_refuses_a_dtype_that_is_not_utf8(embedded: Backend) -> None:
    """deposit -d with bytes that are not UTF-8 is refused naming -d, the file left alone."""
    archive, _ = embedded.archive()
    data = embedded.tmp / "song.wav"
    data.write_bytes(os.urandom(64))
    proc = embedded.ctl("deposit", str(archive.path), str(data), "-d", "wav\udcff")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "-d 'wav\\xff' holds bytes that are not UTF-8" in proc.stderr
    assert data.exists()
