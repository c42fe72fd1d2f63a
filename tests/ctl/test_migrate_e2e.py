"""Issue 9 end to end: a daemon's embedded registry moves to a real django-neurobank server.

The embedded registry is filled through the real daemon (metadata from the inbox and
a sidecar, an animal and an experimenter, automatic ids, a folder resource, a tape
location from ``nbankctl tape register``); a migration is killed after a few
creations (the ``migrate-after-create`` fault point: SIGKILL, as ``kill -9``); then
``nbankctl registry switch`` finishes it, rewrites ``nbank.json`` and the
configuration, and reloads the daemon. The real ``nbank`` client then checks the
archive against the server and reads every record back. Then the switch itself is
killed (its own ``switch-after-*`` fault points) or sees its daemon restarted
midway, and is run again: the inboxes come back, and no record stays behind.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import yaml

from fixtures.cli_backends import NBANK, NBANKCTL, base_env, json_stream
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.django_server import DjangoServer, unique_name
from nbankd.archive.opening import create_archive
from nbankd.control.client import ControlClient
from nbankd.migration import snapshot
from nbankd.registry.embedded import EmbeddedRegistry
from nbankd.registry.http import HttpRegistry

#: what `nbank info` shows that a migration must carry over (the server sets the rest)
COMPARED = ("name", "sha1", "dtype", "filename", "metadata", "experimenter", "animal")


def run(argv: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**env, **extra}, capture_output=True, text=True, timeout=180, check=False
    )


def fill_through_the_daemon(h: DaemonHarness, server: DjangoServer) -> dict[str, str]:
    """Deposits five inputs of every kind; returns {label: identifier}."""
    bird = server.add_animal()
    (h.inbox / "song1.wav.nbank.yaml").write_text(
        yaml.safe_dump({"metadata": {"animal": bird, "take": 2}})
    )
    h.drop("song1.wav", os.urandom(3000))
    h.drop("song2.wav", os.urandom(2000))
    folder = h.root / "session7"
    (folder / "probe").mkdir(parents=True)
    (folder / "probe" / "spikes.dat").write_bytes(os.urandom(1500))
    (folder / "notes.txt").write_bytes(b"session notes")
    os.rename(folder, h.inbox / "session7")
    auto = h.root / "inbox-auto"
    auto.mkdir(exist_ok=True)
    for name in ("take one.wav", "take two.wav"):
        (h.root / ".x").write_bytes(os.urandom(1000))
        os.rename(h.root / ".x", auto / name)
    h.wait_settled(5)
    ids = {Path(r["source"]).name: r["id"] for r in h.receipts()}
    assert len(ids) == 5, h.receipts()
    assert len(ids["take one.wav"]) == 8 and len(ids["take two.wav"]) == 8
    return ids


def tape_register(h: DaemonHarness, env: dict[str, str], song: str) -> str:
    """Registers a tar file holding song2 as written to tape; returns the tape archive name."""
    stored = h.archive / "resources" / song[:2] / f"{song}.wav"
    tar_path = h.root / "tape.tar"
    with tarfile.open(tar_path, "w") as tar:
        data = stored.read_bytes()
        info = tarfile.TarInfo(f"resources/{song[:2]}/{song}.wav")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tape = unique_name("tape", 28)
    proc = run(
        [NBANKCTL, "-c", str(h.config_path), "tape", "register", tape, "0", str(tar_path)], env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return f"{tape}-0"


def status(h: DaemonHarness) -> dict[str, Any]:
    result: dict[str, Any] = ControlClient(h.socket_path).call("status")
    return result


def paused(h: DaemonHarness) -> dict[str, bool]:
    """{inbox: paused} as the running daemon reports it."""
    return {i["path"]: i["paused"] for i in status(h)["inboxes"]}


def on_server(url: str, h: DaemonHarness) -> dict[str, str | None]:
    """{name: sha1} of every record of the embedded registry, as the server has them."""
    with EmbeddedRegistry(h.state_dir / "registry.sqlite3") as embedded:
        names = [r.name for r in embedded.search()]
    with HttpRegistry(url) as reg:
        return {n: (r.sha1 if (r := reg.get_resource(n)) else None) for n in names}


def embedded_sha1s(h: DaemonHarness) -> dict[str, str | None]:
    with EmbeddedRegistry(h.state_dir / "registry.sqlite3") as embedded:
        return {r.name: r.sha1 for r in embedded.search()}


def nbank_info(env: dict[str, str], url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    proc = run([NBANK, "-r", url, "info", *ids], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {d["name"]: d for d in json_stream(proc.stdout)}


def test_embedded_registry_moves_to_django_neurobank(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """Fill embedded via the daemon, migrate (killed, resumed), switch: nothing lost or doubled."""
    server = django_registry
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    inbox = {
        "archive": h.archive_name,
        "dtype": h.dtype,
        "settle_seconds": 0.3,
        "rescan_every": "2s",
    }
    h.extra_config = {
        "inboxes": [
            {
                **inbox,
                "path": str(h.inbox),
                "directories": "resources",
                "metadata": {"rig": "rig3", "experimenter": server.username},
            },
            {**inbox, "path": str(h.root / "inbox-auto"), "auto_id": True},
        ]
    }
    old_url = (h.state_dir / "registry.sqlite3").as_uri() + "/"
    create_archive(h.archive, old_url, allow_directories=True)
    h.start()
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "home" / ".netrc")
    ids = fill_through_the_daemon(h, server)
    tape = tape_register(h, env, ids["song2.wav"])
    with EmbeddedRegistry(h.state_dir / "registry.sqlite3") as embedded:
        before = {r.name: r for r in embedded.search()}
        before_locations = {n: embedded.get_locations(n) for n in before}
    assert set(before) == set(ids.values())
    assert before[ids["song1.wav"]].animal is not None

    # 1. a migration killed after 4 creations (datatype, 2 archives, 1 resource)
    ctl = [NBANKCTL, "-c", str(h.config_path), "registry"]
    killed = run(
        [*ctl, "migrate", "--to", server.url], env, NBANKD_CRASH_AT="migrate-after-create:4"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    with HttpRegistry(server.url) as reg:
        assert len(list(reg.search(archive=h.archive_name))) == 1

    # 2. the switch: pause, finish the migration, rewrite nbank.json and config, reload;
    # an inbox paused by hand beforehand stays paused, the other one is resumed
    auto = str(h.root / "inbox-auto")
    ControlClient(h.socket_path).call("pause", {"inbox": auto})
    switched = run(
        [*ctl, "switch", "--to", server.url, "--registry-auth", str(netrc), "--jobs", "2"], env
    )
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert f"inbox {auto} was paused already (not by this switch): it stays paused" in (
        switched.stdout
    )
    assert paused(h) == {str(h.inbox): False, auto: True}
    assert not (h.state_dir / "migration" / "paused.json").exists()
    assert "resources: 4 created, 1 present" in switched.stdout
    assert "locations: 1 created" in switched.stdout  # the tape location
    config = yaml.safe_load(h.config_path.read_text())
    assert config["registry"] == server.url and config["registry_auth"] == str(netrc)
    assert json.loads((h.archive / "nbank.json").read_text())["registry"] == server.url
    [nbank_backup] = h.archive.glob("nbank.json.bak-*")
    assert json.loads(nbank_backup.read_text())["registry"] == old_url
    [config_backup] = h.root.glob("config.yaml.bak-*")
    assert yaml.safe_load(config_backup.read_text())["registry"] == "embedded"

    # 3. a third run creates nothing: every record is present exactly once
    [export] = (h.state_dir / "migration").glob("export-*.jsonl")
    again = run([*ctl, "import", str(export), "--to", server.url], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "created" not in again.stdout and "resources: 5 present" in again.stdout
    assert snapshot.load(export).counts()["resource"] == 5

    # 4. nbank itself: the archive checks clean and every record reads back the same
    check = run([NBANK, "-r", server.url, "archive", "check", str(h.archive)], env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Resources in registry: 5" in check.stdout + check.stderr
    infos = nbank_info(env, server.url, sorted(before))
    for name, record in before.items():
        info = infos[name]
        assert {k: info[k] for k in COMPARED} == {k: record.to_json()[k] for k in COMPARED}
        assert sorted(info["locations"]) == sorted(record.locations)
    with HttpRegistry(server.url) as reg:
        for name, locs in before_locations.items():
            moved = {(x.archive_name, x.key) for x in reg.get_locations(name)}
            assert moved == {(x.archive_name, x.key) for x in locs}
        assert len(list(reg.search(archive=h.archive_name))) == 5
        assert len(list(reg.search(archive=tape))) == 1

    # 5. the reloaded daemon deposits against django-neurobank
    h.drop("after.wav", b"deposited after the switch")
    wait_for(
        lambda: any(r["id"] == "after" for r in h.receipts()), 60, "a deposit after the switch"
    )
    [after] = [r for r in h.receipts() if r["id"] == "after"]
    assert after["url"] == f"{server.url}resources/after/"
    with HttpRegistry(server.url) as reg:
        record = reg.get_resource("after")
    assert record is not None and record.locations == (h.archive_name,)

    # 6. receipts keep their old URLs; history shows where the records are now
    song = ids["song2.wav"]
    [receipt] = [r for r in h.receipts() if r["id"] == song]
    assert receipt["url"] == f"{old_url}resources/{song}/"
    shown = run([NBANKCTL, "-c", str(h.config_path), "history", "--json", "--id", song], env)
    [entry] = json.loads(shown.stdout)["receipts"]
    assert entry["url"] == f"{server.url}resources/{song}/"
    assert entry["receipt_url"] == receipt["url"]
    h.stop()


def simple_daemon(daemon_factory: Any) -> DaemonHarness:
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start()
    h.drop(f"{unique_name('one')}.wav", os.urandom(700))
    h.wait_settled(1)
    return h


def test_a_killed_switch_run_again_resumes_the_daemon_and_strands_no_record(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """Killed after nbank.json, daemon restarted and resumed by hand (the archive now names
    the server, so its input waits instead of going to the embedded registry), killed
    after the configuration: the re-run finishes, every record is on the server, the
    waiting input is deposited there, the inbox resumed."""
    server = django_registry
    h = simple_daemon(daemon_factory)
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "home" / ".netrc")
    switch = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", server.url]
    switch += ["--registry-auth", str(netrc)]
    marker = h.state_dir / "migration" / "paused.json"

    killed = run(switch, env, NBANKD_CRASH_AT="switch-after-nbank-json")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert json.loads((h.archive / "nbank.json").read_text())["registry"] == server.url
    assert yaml.safe_load(h.config_path.read_text())["registry"] == "embedded"
    assert paused(h) == {str(h.inbox): True} and marker.exists()
    # status says a switch is unfinished (degraded), and how to finish it
    [line] = [d for d in status(h)["degraded"] if "registry switch" in d]
    assert line.endswith(f"finish it with: {shlex.join(['nbankctl', *switch[1:]])}"), line
    assert status(h)["unfinished_switch"]["to"] == server.url

    h.stop()  # restarted on the old configuration: the pause is kept across the restart,
    h.start()
    assert paused(h) == {str(h.inbox): True}
    ControlClient(h.socket_path).call("resume", {})  # but someone resumes it by hand:
    assert paused(h) == {str(h.inbox): False}
    two = unique_name("two")
    h.drop(f"{two}.wav", os.urandom(600))
    wait_for(
        lambda: any(f"names the registry {server.url}" in d for d in status(h)["degraded"]),
        30,
        "the input to wait: the archive names the server, not the embedded registry",
    )
    assert [r["id"] for r in h.receipts()] != [two] and len(h.receipts()) == 1
    killed = run(switch, env, NBANKD_CRASH_AT="switch-after-config")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert yaml.safe_load(h.config_path.read_text())["registry"] == server.url
    assert status(h)["registry"]["url"] != server.url and paused(h) == {str(h.inbox): True}

    done = run(switch, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing the switch from file://" in done.stdout
    assert "1 inbox(es) paused by an earlier, unfinished switch" in done.stdout
    assert "resumed 1 inbox(es)" in done.stdout and f"switched to {server.url}" in done.stdout
    assert paused(h) == {str(h.inbox): False} and not marker.exists()
    assert status(h)["registry"]["url"] == server.url
    assert status(h)["unfinished_switch"] is None
    assert not any("registry switch" in d for d in status(h)["degraded"])
    assert on_server(server.url, h) == embedded_sha1s(h)  # the earlier deposit, same sha1
    h.wait_settled(2)  # the waiting input, deposited into the server
    [receipt2] = [r for r in h.receipts() if r["id"] == two]
    assert receipt2["url"] == f"{server.url}resources/{two}/"

    three = unique_name("three")
    h.drop(f"{three}.wav", b"after the switch")
    wait_for(lambda: any(r["id"] == three for r in h.receipts()), 60, "a deposit after it")
    [receipt] = [r for r in h.receipts() if r["id"] == three]
    assert receipt["url"] == f"{server.url}resources/{three}/"
    h.stop()


def test_nbankctl_status_exits_degraded_while_a_switch_is_unfinished(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """`nbankctl status` exits 1 (degraded) naming the switch's own command line while a
    killed switch is unfinished, and exits 0 again once the switch is run to its end."""
    server = django_registry
    h = simple_daemon(daemon_factory)
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "home" / ".netrc")
    switch = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", server.url]
    switch += ["--registry-auth", str(netrc)]
    show = [NBANKCTL, "-c", str(h.config_path), "status"]
    assert run(show, env).returncode == 0

    killed = run(switch, env, NBANKD_CRASH_AT="switch-after-nbank-json")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    unfinished = run(show, env)
    assert unfinished.returncode == 1, unfinished.stdout + unfinished.stderr
    config, auth = str(Path(h.config_path).absolute()), str(Path(netrc).absolute())
    words = ["nbankctl", "-c", config, "registry", "switch", "--to", server.url]
    again = shlex.join([*words, "--registry-auth", auth])
    assert f"finish it with: {again}" in unfinished.stdout, unfinished.stdout

    done = run(switch, env)
    assert done.returncode == 0, done.stdout + done.stderr
    finished = run(show, env)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "registry switch" not in finished.stdout
    h.stop()


def test_a_daemon_restarted_during_the_switch_is_paused_again_and_caught_up(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """nbankd restarts before nbank.json is rewritten, is resumed by hand and deposits:
    re-paused, imported."""
    server = django_registry
    h = simple_daemon(daemon_factory)
    env = base_env(tmp_path / "home")
    netrc = server.write_netrc(tmp_path / "home" / ".netrc")
    gate, out = tmp_path / "go", tmp_path / "switch.out"
    seam = {"NBANKD_PAUSE_AT": "switch-before-nbank-json", "NBANKD_PAUSE_UNTIL": str(gate)}
    argv = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", server.url]
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [*argv, "--registry-auth", str(netrc)],
            env={**env, **seam},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "may write to" in out.read_text() or proc.poll() is not None, 120, "seam")
        assert proc.poll() is None, out.read_text()
        assert paused(h) == {str(h.inbox): True}
        h.stop()  # systemd restarts it (still paused: pauses are kept), and someone
        h.start()  # resumes it by hand: running, on the embedded registry
        assert paused(h) == {str(h.inbox): True}
        ControlClient(h.socket_path).call("resume", {})
        h.drop(f"{unique_name('late')}.wav", os.urandom(500))
        h.wait_settled(2)
        gate.touch()
        assert proc.wait(timeout=180) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert "nbankd restarted during the switch (pid" in text
    assert "(1 new resource(s)): importing again" in text
    assert on_server(server.url, h) == embedded_sha1s(h) and len(embedded_sha1s(h)) == 2
    assert paused(h) == {str(h.inbox): False}
    assert status(h)["registry"]["url"] == server.url
    h.stop()


def test_a_wrong_socket_is_not_taken_for_a_stopped_daemon(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """No socket at --socket, but nbankd holds its journal open: exit 3, nothing changed."""
    from nbankd.daemon.service import JOURNAL_NAME
    from nbankd.migration import pausing

    assert pausing.JOURNAL_NAME == JOURNAL_NAME
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start()
    before = h.config_path.read_text()
    typo = tmp_path / "contro1.sock"
    argv = [NBANKCTL, "-c", str(h.config_path), "registry", "switch"]
    proc = run([*argv, "--to", django_registry.url, "--socket", str(typo)], base_env(tmp_path))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"nothing answers on {typo}, but process {h.proc.pid} holds" in proc.stderr
    assert h.config_path.read_text() == before
    assert not (h.state_dir / "migration").exists()
    assert paused(h) == {str(h.inbox): False}
    h.stop()


def test_a_daemon_gone_midway_stops_the_switch_and_the_resume_failure_is_shown(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """nbankd killed mid-switch: the original error ends the run (exit 3), after a line
    saying the inboxes could not be resumed; nothing was switched."""
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start()
    env = base_env(tmp_path / "home")
    netrc = django_registry.write_netrc(tmp_path / "home" / ".netrc")
    gate, out = tmp_path / "go", tmp_path / "switch.out"
    seam = {"NBANKD_PAUSE_AT": "switch-before-nbank-json", "NBANKD_PAUSE_UNTIL": str(gate)}
    argv = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", django_registry.url]
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [*argv, "--registry-auth", str(netrc)],
            env={**env, **seam},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "may write to" in out.read_text() or proc.poll() is not None, 120, "seam")
        h.kill9()
        gate.touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert proc.returncode == 3, text
    resume_line = text.index("nbankctl: could not resume nbankd's inboxes: nbankd is not running")
    assert text.index("nbankctl: nbankd is not running", resume_line + 1) > resume_line
    assert json.loads((h.archive / "nbank.json").read_text())["registry"].startswith("file:")
    assert yaml.safe_load(h.config_path.read_text())["registry"] == "embedded"


def test_a_switch_whose_daemon_cannot_write_stops_before_anything_irreversible(
    daemon_factory: Any, django_registry: DjangoServer, tmp_path: Path
) -> None:
    """The service reads its credentials from systemd's LoadCredential= (a reader's,
    which may not write) while the administrator switches with their own netrc: the
    switch stops before nbank.json and the configuration change, names the credential
    file, LoadCredential= and the restart, and the daemon goes on with the old registry.
    With the credential fixed and the service restarted, the same command finishes."""
    server = django_registry
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "registry").write_text(server.netrc_text(reader=True))
    h: DaemonHarness = daemon_factory(dtype=unique_name("dt"), archive_name=unique_name("ar"))
    h.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    h.drop(f"{unique_name('one')}.wav", os.urandom(500))
    h.wait_settled(1)
    env = base_env(tmp_path / "home")
    server.write_netrc(tmp_path / "home" / ".netrc")  # the administrator's own, may write
    switch = [NBANKCTL, "-c", str(h.config_path), "registry", "switch", "--to", server.url]

    first = run(switch, env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"{creds / 'registry'} (systemd LoadCredential=)" in first.stderr
    assert "systemctl restart nbankd" in first.stderr and "nothing irreversible" in first.stderr
    assert json.loads((h.archive / "nbank.json").read_text())["registry"] != server.url
    assert yaml.safe_load(h.config_path.read_text())["registry"] == "embedded"
    assert paused(h) == {str(h.inbox): False}  # resumed, still on the embedded registry
    assert "switched to" not in first.stdout

    (creds / "registry").write_text(server.netrc_text())
    h.stop()
    h.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    done = run(switch, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"nbankd's credentials ({creds / 'registry'} (systemd LoadCredential=))" in done.stdout
    assert f"switched to {server.url}" in done.stdout
    two = unique_name("two")
    h.drop(f"{two}.wav", b"after the switch, written with the service's credential")
    wait_for(lambda: any(r["id"] == two for r in h.receipts()), 60, "a deposit after it")
    [receipt] = [r for r in h.receipts() if r["id"] == two]
    assert receipt["url"] == f"{server.url}resources/{two}/"
    h.stop()
