"""``nbankctl locate URL`` and the configuration's ``registry_aliases``: an embedded
registry's aliases, and a configuration nobody asked for that cannot be read."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fixtures.cli_backends import NBANKCTL, base_env, store
from nbankd.archive.opening import create_archive
from nbankd.registry.embedded import EmbeddedRegistry

SERVED = "https://registry.lab.example/neurobank/"
ALIAS = "https://old-name.lab.example/neurobank/"


def test_locate_url_of_an_alias_of_the_configured_embedded_registry_is_looked_up(
    tmp_path: Path,
) -> None:
    """With `registry: embedded` (served at registry_url) and registry_aliases, a URL
    naming an alias is of the registry in use: located, not refused."""
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"registry: embedded\nregistry_url: {SERVED}\nregistry_aliases: [{ALIAS}]\n"
        f"state_dir: {state}\n"
    )
    registry = EmbeddedRegistry(state / "registry.sqlite3", url=SERVED)
    try:
        dtype = registry.add_datatype("dt", "application/octet-stream").name
        archive = create_archive(tmp_path / "arch", SERVED)
        registry.add_archive("arch", "neurobank", str(archive.path))
        record = registry.add_resource(dtype=dtype, archive="arch", name="rec1", sha1=None)
    finally:
        registry.close()
    path = store(archive, record.name, b"recorded bytes")
    env = {**base_env(tmp_path / "home"), "NBANKD_CONFIG": str(config)}
    proc = subprocess.run(
        [NBANKCTL, "locate", f"{ALIAS}resources/{record.name}/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [record.name, str(path)]


def test_locate_with_r_is_not_broken_by_a_configuration_that_crashes_its_parser(
    tmp_path: Path,
) -> None:
    """With -r, a URL of another registry is refused (a line on stdout,
    exit 1), even when $NBANKD_CONFIG, not asked for, is YAML nested too deep to parse."""
    config = tmp_path / "config.yaml"
    config.write_text("registry: " + "[" * 1000 + "]" * 1000 + "\n")
    env = {**base_env(tmp_path / "home"), "NBANKD_CONFIG": str(config)}
    other = "http://other.example/neurobank/resources/rec1/"
    proc = subprocess.run(
        [NBANKCTL, "-r", "http://127.0.0.1:9/neurobank/", "locate", other],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.split() == ["rec1", "(another", "registry)"]
