"""Hostile review of ``nbankctl deposit`` handed to a running daemon (`-c CONFIG`):
someone who can write the folder holding the files, an unlucky lab, a daemon that
stops. Each test names a problem the review found (fixed) or an attack that held."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from fixtures.cli_backends import NBANKCTL, Backend, store
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.users import TestUser


def rig(backend: Backend, name: str = "rig") -> Path:
    """A folder of the test, as a rig's session folder."""
    folder = backend.tmp / name
    folder.mkdir(exist_ok=True)
    return folder


# --- handed to the running daemon -----------------------------------------------------


def hand_over(h: DaemonHarness, *argv: str) -> subprocess.Popen[str]:
    """``nbankctl -c CONFIG deposit ARCHIVE -d DTYPE ARGV`` while the daemon runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    return subprocess.Popen(
        [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def sticky_folder(h: DaemonHarness) -> Path:
    """A world-writable sticky folder holding a root-owned file: the daemon's user can
    make .nbank there but cannot move the file (its claim fails, and is retried)."""
    folder = h.root / "session"
    folder.mkdir()
    folder.chmod(0o1777)
    (folder / "one.wav").write_bytes(b"a recording the daemon cannot move")
    return folder


def test_the_daemon_refuses_a_file_inside_its_state_dir(daemon_factory: Any) -> None:
    """Handed STATE_DIR/registry.sqlite3, the running daemon refuses it (exit 1, named)
    and the database stays in place."""
    h: DaemonHarness = daemon_factory()
    h.start()
    database = h.state_dir / "registry.sqlite3"
    before = database.stat().st_ino
    code, _, err = finished(hand_over(h, "--wait", "0", str(database)))
    h.stop()
    assert database.exists() and database.stat().st_ino == before
    assert code == 1 and str(database) in err


def test_a_hand_over_leaves_nothing_a_later_glob_trips_on(daemon_factory: Any) -> None:
    """After one file was handed to the daemon, ``deposit ARCHIVE FOLDER/*`` (as the
    shell expands it) for the next file exits 0."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    (folder / "one.wav").write_bytes(b"first")
    assert finished(hand_over(h, str(folder / "one.wav")))[0] == 0
    (folder / "two.wav").write_bytes(b"second")
    glob = sorted(str(p) for p in folder.iterdir() if not p.name.startswith("."))
    code, _, err = finished(hand_over(h, *glob))
    h.stop()
    assert not (folder / "two.wav").exists()
    assert code == 0, err


def test_a_folder_the_daemon_cannot_write_is_named_with_the_fix(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """A folder the daemon's user cannot write: exit 1, the file stays, and the message
    names the daemon's user and says it needs write permission on the folder."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    folder = h.root / "session"
    folder.mkdir()
    (folder / "one.wav").write_bytes(b"first")
    code, _, err = finished(hand_over(h, str(folder / "one.wav")))
    h.stop()
    assert code == 1 and (folder / "one.wav").exists()
    assert str(folder) in err and unpriv_user.name in err
    assert "start nbankd again" not in err and "write" in err


def test_an_unclaimed_file_is_not_said_to_be_kept_in_the_work_folder(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """When the daemon cannot move the file (sticky folder), the command exits 1 without
    claiming the file sits in .nbank/: it names the file where it still is."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    folder = sticky_folder(h)
    code, _, err = finished(hand_over(h, "--wait", "0", str(folder / "one.wav")))
    h.stop()
    assert code == 1 and (folder / "one.wav").exists()
    assert "kept safe as" not in err and str(folder / "one.wav") in err


def test_a_daemon_stopped_mid_wait_is_named_with_what_happens_next(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """Stopped while nbankctl waits, the command exits 3 naming the file and saying the
    daemon's next start finishes it."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    folder = sticky_folder(h)
    proc = hand_over(h, "--wait", "600", str(folder / "one.wav"))
    wait_for(lambda: "inbox-not-writable" in h.log_path.read_text(), 60, "the claim to fail")
    h.stop()
    code, _, err = finished(proc)
    assert code == 3
    assert str(folder / "one.wav") in err and "start" in err


def test_the_daemon_finishes_a_hand_over_whose_nbankctl_was_killed(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """nbankctl killed (-9) while waiting: the daemon still deposits the file once the
    folder is fixed, and the folder keeps no input."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    folder = sticky_folder(h)
    proc = hand_over(h, "--wait", "600", str(folder / "one.wav"))
    wait_for(lambda: "inbox-not-writable" in h.log_path.read_text(), 60, "the claim to fail")
    proc.kill()
    proc.communicate(timeout=60)
    os.chown(folder / "one.wav", unpriv_user.uid, unpriv_user.gid)
    stored_copy = h.archive / "resources" / "on" / "one.wav"
    wait_for(stored_copy.exists, 60, "the daemon to deposit the file")
    h.stop()
    assert stored_copy.read_bytes() == b"a recording the daemon cannot move"
    assert not (folder / "one.wav").exists()


def test_a_rejected_folder_swapped_for_a_link_pulls_nothing_out_of_the_archive(
    django_backend: Backend, fault_proxy: Any
) -> None:
    """While a run waits on another file, FOLDER/nbank-rejected is swapped for a link to
    a stub folder of the archive: handing the refused file back moves nothing out of
    the archive."""
    b = django_backend
    archive, name = b.archive()
    folder = rig(b)
    victim_data = b.blob("victim")
    victim = store(archive, b.resource(victim_data, name), victim_data)
    refused = folder / victim.name  # named like the stored file: its name is taken
    refused.write_bytes(b.blob("refused"))
    good = folder / f"{b.name('g')}.dat"
    good.write_bytes(b.blob("good"))
    fault_proxy.inject("error500", methods={"POST"})  # the good file waits to register
    proc = subprocess.Popen(
        [
            NBANKCTL,
            "-r",
            fault_proxy.url,
            "deposit",
            str(archive.path),
            "-d",
            b.dtype,
            "--wait",
            "600",
            str(refused),
            str(good),
        ],
        env=b.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: fault_proxy.count("error500") >= 1, 60, "the good file to wait")
    (folder / "nbank-rejected").rename(b.tmp / "moved-rejected")
    (folder / "nbank-rejected").symlink_to(victim.parent)
    fault_proxy.clear()
    proc.communicate(timeout=120)
    assert victim.read_bytes() == victim_data
    assert (b.tmp / "moved-rejected" / refused.name).exists() or refused.exists()


def test_a_file_in_an_inbox_is_not_handed_over_and_the_daemon_deposits_it(
    daemon_factory: Any,
) -> None:
    """A file of an inbox handed to the daemon is refused by name (the daemon deposits
    it by itself, exit 1), no work or rejected folder of a manual deposit appears in the
    inbox, and the daemon deposits the file as it would anyway."""
    h: DaemonHarness = daemon_factory(inbox_options={"directories": "zip"})
    h.start()
    h.inbox.mkdir(exist_ok=True)
    (h.inbox / "one.wav").write_bytes(b"first")
    code, _, err = finished(hand_over(h, str(h.inbox / "one.wav")))
    assert code == 1 and "inbox" in err
    h.wait_settled(1)
    h.stop()
    assert not (h.inbox / "nbank-rejected").exists()
    assert [r["id"] for r in h.receipts()] == ["one"]
