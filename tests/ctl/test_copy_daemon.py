"""nbankctl copy into an archive of a daemon configuration: handed to the running
daemon over its control socket (admins only), done by hand under the state
directory's lock while it is stopped, unchanged when DEST is not one of its archives."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANKCTL, json_stream
from fixtures.daemon import DaemonHarness, start_until_said
from fixtures.users import TestUser
from nbankd.archive.opening import create_archive
from nbankd.daemon import statelock
from nbankd.registry.embedded import EmbeddedRegistry


def two_archives(daemon_factory: Any, user: TestUser | None, **kwargs: Any) -> DaemonHarness:
    """A daemon run as ``user`` (root: None) whose inbox deposits into its first archive; its second
    archive (``h.root / "dest"``, named ``dest``) is the copies' destination."""
    h: DaemonHarness = daemon_factory(user=user, **kwargs)
    h.extra_config.setdefault(
        "archives",
        [
            {"path": str(h.archive), "name": h.archive_name, "create": True},
            {"path": str(h.root / "dest"), "name": "dest", "create": True},
        ],
    )
    return h


def deposited(h: DaemonHarness, data: bytes) -> str:
    """Drops a file into the running daemon's inbox; returns its identifier."""
    h.drop("rec.dat", data)
    h.wait_settled(1)
    [receipt] = h.receipts()
    return str(receipt["id"])


def ctl(h: DaemonHarness, *argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nbankctl -c CONFIG ARGV`` as root (an admin, not the archives' user)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    return subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), *argv],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_admin_not_the_archive_user_copies_through_the_running_daemon(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """While nbankd runs, root (an admin, not access.user) copies through it: the copy is
    stored by the daemon's user, located in the registry, and reported as by hand."""
    h = two_archives(daemon_factory, unpriv_user)
    h.start()
    id = deposited(h, b"one recording")
    r = ctl(h, "copy", str(h.root / "dest"), id)
    again = ctl(h, "--json", "copy", str(h.root / "dest"), id)
    h.stop()
    assert r.returncode == 0, r.stderr
    assert "nbankd is running: handing the copy to it" in r.stderr
    stored = h.root / "dest" / "resources" / id[:2] / "rec.dat"
    assert f"  - {id} -> {stored}" in r.stderr
    assert "Resources requested: 1; copied: 1" in r.stderr
    assert stored.read_bytes() == b"one recording"
    assert stored.stat().st_uid == unpriv_user.uid
    with h.open_registry() as reg:
        assert "dest" in reg.get_resource(id).locations
    assert again.returncode == 0, again.stderr
    lines = json_stream(again.stdout)
    assert lines[0] == {"id": id, "status": "already"}
    assert lines[-1]["summary"]["already"] == 1 and lines[-1]["archive"] == "dest"


def test_a_failed_resource_through_the_daemon_exits_1(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """An identifier the registry does not know fails in the daemon's copy: its ✗ line
    and JSON line are printed and the command exits 1, as by hand."""
    h = two_archives(daemon_factory, unpriv_user)
    h.start()
    r = ctl(h, "--json", "copy", str(h.root / "dest"), "no-such-id")
    h.stop()
    assert r.returncode == 1, r.stderr
    first, summary = json_stream(r.stdout)
    assert first["id"] == "no-such-id" and first["status"] == "failed"
    assert summary["summary"]["failed"] == 1


def test_a_user_who_is_not_an_admin_cannot_copy_through_the_daemon(
    daemon_factory: Any, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """The control socket refuses `copy` from a reader outside control.admins (exit 2),
    and nothing is copied."""
    readers = {"control": {"readers": [other_user.name]}}
    h = two_archives(daemon_factory, unpriv_user, extra_config=readers)
    h.start()
    h.socket_path.chmod(0o666)  # reachable: the peer's credentials must refuse it
    id = deposited(h, b"not for other users")
    r = other_user.run(
        [NBANKCTL, "-c", str(h.config_path), "copy", str(h.root / "dest"), id],
        env={"PATH": os.environ["PATH"]},
    )
    h.stop()
    assert r.returncode == 2, r.stderr
    assert f"user {other_user.name} may not" in r.stderr, r.stderr
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


def test_with_the_daemon_stopped_the_copy_must_run_as_the_archive_user(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """With nbankd stopped, root's copy is refused naming the archive's user (exit 2)."""
    h = two_archives(daemon_factory, unpriv_user)
    h.start()
    id = deposited(h, b"stays put")
    h.stop()
    r = ctl(h, "copy", str(h.root / "dest"), id)
    assert r.returncode == 2, r.stderr
    assert repr(unpriv_user.name) in r.stderr
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


def configured(tmp_path: Path, listed: bool) -> tuple[Path, Path, Path, str]:
    """A daemon configuration (never started) with a source and a destination archive,
    the destination among its archives when ``listed``; one resource stored in the
    source. Returns (config, state_dir, destination, identifier)."""
    state = tmp_path / "state"
    state.mkdir()
    reg = EmbeddedRegistry(state / "registry.sqlite3")
    src = create_archive(tmp_path / "src", reg.url)
    dest = create_archive(tmp_path / "dest", reg.url)
    reg.add_archive("src", "neurobank", str(src.path))
    reg.add_archive("dest", "neurobank", str(dest.path))
    reg.add_datatype("blob", "application/octet-stream")
    data = b"copied under the lock"
    rec = reg.add_resource(
        dtype="blob", archive="src", name="res1", sha1=hashlib.sha1(data).hexdigest()
    )
    reg.close()
    (src.resources_dir / "re").mkdir()
    (src.resources_dir / "re" / "res1.dat").write_bytes(data)
    archives = [{"path": str(src.path), "name": "src"}]
    if listed:
        archives.append({"path": str(dest.path), "name": "dest"})
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "registry": "embedded",
                "state_dir": str(state),
                "control_socket": str(tmp_path / "control.sock"),
                "archives": archives,
            }
        )
    )
    return config, state, dest.path, rec.name


def test_with_the_daemon_stopped_a_copy_waits_for_the_state_directory_lock(
    tmp_path: Path,
) -> None:
    """With no daemon answering and another process holding the state directory's lock,
    the copy says so and waits (nothing copied meanwhile), then copies."""
    config, state, dest, id = configured(tmp_path, listed=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    lock = statelock.acquire(state)
    try:
        argv = [NBANKCTL, "-c", str(config), "copy", str(dest), id]
        proc, said = start_until_said(argv, "waiting for it", env)
        assert not (dest / "resources" / "re").exists()  # nothing copied while it waits
    finally:
        lock.release()
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, said + rest
    assert (dest / "resources" / "re" / "res1.dat").read_bytes() == b"copied under the lock"


def test_a_copy_into_an_archive_the_configuration_does_not_list_takes_no_lock(
    tmp_path: Path,
) -> None:
    """Into an archive that is not one of the configuration's, the copy runs as before:
    it does not wait for the state directory's lock held by another process."""
    config, state, dest, id = configured(tmp_path, listed=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    lock = statelock.acquire(state)
    try:
        r = subprocess.run(
            [NBANKCTL, "-c", str(config), "copy", str(dest), id],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        lock.release()
    assert r.returncode == 0, r.stderr
    assert "waiting" not in r.stderr and "nbankd is running" not in r.stderr
    assert (dest / "resources" / "re" / "res1.dat").read_bytes() == b"copied under the lock"
