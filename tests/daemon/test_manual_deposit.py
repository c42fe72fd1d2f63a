"""nbankctl deposit with a daemon's configuration: handed to the running daemon over
its control socket, and finished by its start when an interrupted manual deposit left
work in its state directory."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANKCTL, deposit_while_its_name_is_reused, json_stream
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.users import TestUser
from nbankd.names import MANUAL_INBOX_PREFIX
from test_metadata_readers import reader_package


def manual_deposit(h: DaemonHarness, *files: str, env: dict[str, str] | None = None) -> Any:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    full.update(env or {})
    return subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype, *files],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def killed_manual_deposit(h: DaemonHarness, name: str, data: bytes, crash_at: str) -> Path:
    """A manual deposit of ``data`` as ``session/NAME`` (the daemon stopped) killed (-9)
    at ``crash_at``; the path the file was at."""
    h.start()  # creates the archive and the registry
    h.stop()
    folder = h.root / "session"
    folder.mkdir()
    src = folder / name
    src.write_bytes(data)
    crashed = manual_deposit(h, str(src), env={"NBANKD_CRASH_AT": crash_at})
    assert crashed.returncode == -9, crashed.stderr
    assert not src.exists()
    return src


def test_a_running_daemon_deposits_the_files_handed_to_it(daemon_factory: Any) -> None:
    """While nbankd runs, `nbankctl -c ITS_CONFIG deposit` hands the files to it over
    the control socket and waits: deposited, gone from their folder, -j lines printed."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    (folder / "one.wav").write_bytes(b"first recording")
    (folder / "two.wav").write_bytes(b"second recording")
    r = manual_deposit(h, "-j", str(folder / "one.wav"), str(folder / "two.wav"))
    h.stop()
    assert r.returncode == 0, r.stderr
    assert "handing 2 file(s)" in r.stderr
    assert sorted(json_stream(r.stdout), key=str) == sorted(
        [{"source": str(folder / n), "id": n[:-4]} for n in ("one.wav", "two.wav")], key=str
    )
    assert (h.archive / "resources" / "on" / "one.wav").read_bytes() == b"first recording"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) in (
        [],
        ["nbank-rejected"],
    )


def test_a_file_the_daemon_refuses_is_put_back_in_place(daemon_factory: Any) -> None:
    """A duplicate handed to the running daemon is rejected, put back where it was, and
    the command exits 1 naming the resource that holds the bytes."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    (folder / "first.wav").write_bytes(b"same bytes")
    assert manual_deposit(h, str(folder / "first.wav")).returncode == 0
    (folder / "again.wav").write_bytes(b"same bytes")
    r = manual_deposit(h, "-j", str(folder / "again.wav"))
    h.stop()
    assert r.returncode == 1
    [line] = json_stream(r.stdout)
    assert line["source"] == str(folder / "again.wav") and "first" in line["error"]
    assert (folder / "again.wav").read_bytes() == b"same bytes"


def test_a_refusal_whose_place_was_taken_says_where_the_daemon_keeps_the_file(
    daemon_factory: Any,
) -> None:
    """A duplicate handed to the daemon, its name reused while it was claimed, stays
    held with its bytes; the command names where (kept_at) and says what to do."""
    h: DaemonHarness = daemon_factory()
    release = h.root / "release"
    release.touch()  # the first deposit goes through the pause point freely
    h.start(env={"NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(release)})
    folder = h.root / "session"
    folder.mkdir()
    (folder / "first.wav").write_bytes(b"same bytes")
    assert manual_deposit(h, str(folder / "first.wav")).returncode == 0
    release.unlink()
    again = folder / "again.wav"
    again.write_bytes(b"same bytes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    argv = [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype]
    try:
        deposit_while_its_name_is_reused(
            [*argv, "-j", str(again)], env, again, release, b"same bytes"
        )
    finally:
        h.stop()


def test_a_user_who_is_not_an_admin_cannot_hand_files_to_the_daemon(
    daemon_factory: Any, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """The control socket refuses `deposit` from a user outside control.admins (exit 2);
    the file stays."""
    h: DaemonHarness = daemon_factory(
        user=unpriv_user, extra_config={"control": {"readers": [other_user.name]}}
    )
    h.start()
    folder = Path(tempfile.mkdtemp(prefix="nbankd-manual-", dir="/tmp"))
    os.chown(folder, other_user.uid, other_user.gid)
    src = folder / "mine.wav"
    src.write_bytes(b"not for the daemon")
    os.chown(src, other_user.uid, other_user.gid)
    try:
        r = other_user.run(
            [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), str(src)],
            env={"PATH": os.environ["PATH"]},
        )
        h.stop()
        assert r.returncode == 2, r.stderr
        assert "admin" in r.stderr
        assert src.read_bytes() == b"not for the daemon"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_daemon_start_finishes_an_interrupted_manual_deposit(daemon_factory: Any) -> None:
    """A manual deposit killed after registering is finished when the daemon starts."""
    h: DaemonHarness = daemon_factory()
    src = killed_manual_deposit(h, "song.wav", b"interrupted manual deposit", "after-register")
    folder = src.parent
    h.start()
    stored = h.archive / "resources" / "so" / "song.wav"
    wait_for(stored.exists, 30, "the daemon to finish the manual deposit")
    wait_for(lambda: not any((folder / ".nbank").iterdir()), 30, "the claimed input to be released")
    h.stop()
    assert stored.read_bytes() == b"interrupted manual deposit"


def test_the_daemon_start_puts_back_a_manual_deposit_it_must_refuse(daemon_factory: Any) -> None:
    """A manual deposit killed after its claim, whose folder's rejected folder was tidied
    away and whose name another record took meanwhile: the daemon's start refuses it and
    puts the file back where it was, unchanged."""
    h: DaemonHarness = daemon_factory()
    src = killed_manual_deposit(h, "taken.wav", b"a manual deposit refused later", "after-claim")
    (src.parent / "nbank-rejected").rmdir()  # as a later run's tidy leaves it: gone
    with h.open_registry() as reg:
        reg.add_resource(dtype=h.dtype, archive=None, name="taken", sha1="0" * 40, metadata=None)
    h.start()
    wait_for(src.exists, 30, "the daemon to put the refused file back")
    h.stop()
    assert src.read_bytes() == b"a manual deposit refused later"
    assert not list((h.archive / "resources").rglob("taken*"))


def test_a_dry_run_while_the_daemon_runs_reads_the_files_and_hands_nothing_over(
    daemon_factory: Any,
) -> None:
    """-y while nbankd runs reads the files here, as without it, and hands nothing over."""
    h: DaemonHarness = daemon_factory(dtype="wav-rec")
    plugins = {"PYTHONPATH": str(reader_package(h.root / "plugins"))}
    h.start(env=plugins)
    folder = h.root / "session"
    folder.mkdir()
    (folder / "good.wav").write_bytes(b"RIFFzf12")
    (folder / "bad.wav").write_bytes(b"junk")
    files = [str(folder / "good.wav"), str(folder / "bad.wav")]
    r = manual_deposit(h, "-y", "-j", *files, env=plugins)
    h.stop()
    assert r.returncode == 1, r.stderr
    assert "handing" not in r.stderr
    good, bad = json_stream(r.stdout)
    assert good == {
        "source": files[0],
        "id": "good",
        "dry_run": True,
        "metadata": {"sampling_rate": 20000, "channels": 2, "bird": "zf12"},
    }
    assert bad["source"] == files[1] and "no RIFF header" in bad["error"]
    assert sorted(p.name for p in folder.iterdir()) == ["bad.wav", "good.wav"]
    assert (folder / "good.wav").read_bytes() == b"RIFFzf12"
    assert not any((h.archive / "resources").iterdir())
    db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        query = "SELECT count(*) FROM items WHERE inbox LIKE ?"
        assert db.execute(query, (MANUAL_INBOX_PREFIX + "%",)).fetchone() == (0,)
    finally:
        db.close()


def test_a_folder_the_daemon_deposits_as_its_zip_is_reported_zipped(daemon_factory: Any) -> None:
    """A folder the daemon deposits as its zip prints {"source", "id", "zipped": true}."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.root / "session"
    (folder / "take1").mkdir(parents=True)
    (folder / "take1" / "a.txt").write_bytes(b"a zipped take")
    r = manual_deposit(h, "-j", "--zip-directories", str(folder / "take1"))
    h.stop()
    assert r.returncode == 0, r.stderr
    assert "handing 1 file(s)" in r.stderr
    assert json_stream(r.stdout) == [
        {"source": str(folder / "take1"), "id": "take1", "zipped": True}
    ]
    assert (h.archive / "resources" / "ta" / "take1.zip").is_file()


def test_metadata_that_is_not_utf8_is_refused_before_anything_is_handed_over(
    daemon_factory: Any,
) -> None:
    """A -k that is not UTF-8 while nbankd runs: exit 2 naming it, nothing handed over."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    (folder / "take.wav").write_bytes(b"a take")
    r = manual_deposit(h, "-k", "rig=\udcff", str(folder / "take.wav"))
    assert r.returncode == 2, r.stderr
    assert "-k 'rig=\\xff'" in r.stderr and "not UTF-8" in r.stderr
    assert "handing" not in r.stderr
    h.stop()
    with h.open_registry() as reg:
        assert reg.get_resource("take") is None
    assert sorted(p.name for p in folder.iterdir()) == ["take.wav"]
    assert not any((h.archive / "resources").iterdir())
