"""Hostile review of ``nbankctl copy`` and ``nbankctl tape import`` handed to the running
daemon (admin commands ``copy``, ``tape-import``, ``job-status``): an admin who is not
the daemon's user sending requests of their own, and an unlucky lab (a daemon stopped
or killed during a job, two jobs into one archive, a client that stops reading)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ctl.test_copy_daemon import ctl, deposited, two_archives
from fixtures.cli_backends import NBANKCTL, make_tar
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.users import TestUser
from nbankd.control import job_handlers, tar_pin
from nbankd.control.client import ControlError, call
from nbankd.control.peers import Peer
from nbankd.control.protocol import ProtocolError


def request(h: DaemonHarness, cmd: str, **args: Any) -> Any:
    """One control request of the test's own (root: an admin), as a hostile client
    could send it."""
    return call(h.socket_path, cmd, args)


def finished(h: DaemonHarness, job: str) -> dict[str, Any]:
    """The job's last job-status answer, read from its first event without
    acknowledging any (``since`` 0), once no job is under way."""
    wait_for(lambda: request(h, "job-status")["running"] == 0, 120, "the jobs to end")
    state: dict[str, Any] = request(h, "job-status", job=job, since=0)
    return state


def started_copy(h: DaemonHarness, *argv: str, stderr: Path) -> subprocess.Popen[str]:
    """``nbankctl -c CONFIG copy ARGV`` in the background, its stderr into a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    with open(stderr, "w") as err:
        return subprocess.Popen(
            [NBANKCTL, "-c", str(h.config_path), "copy", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env=env,
        )


def paused_daemon(daemon_factory: Any, data: bytes) -> tuple[DaemonHarness, str, Path]:
    """A root daemon with one deposited resource, restarted so that every thread reaching
    the publish's link into resources/ waits there until the returned file exists."""
    h = two_archives(daemon_factory, None)
    h.start()
    id = deposited(h, data)
    h.stop()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-publish-link", "NBANKD_PAUSE_UNTIL": str(release)})
    return h, id, release


# --- the tar file: only what the admin who asked could read, and that very file ----------


def test_a_tar_path_through_a_link_is_refused_and_nothing_imported(daemon_factory: Any) -> None:
    """A request naming the tar through a symbolic link is refused (exit 2) naming the
    link and what to do; nothing is imported (nbankctl itself sends the resolved path)."""
    h = two_archives(daemon_factory, None)
    h.start()
    id = deposited(h, b"behind a link")
    tar = make_tar(h.root / "tape.tar", [(f"{id}.dat", b"behind a link")])
    (h.root / "link.tar").symlink_to(tar)
    with pytest.raises(ControlError) as refused:
        request(h, "tape-import", archive=str(h.root / "dest"), tar=str(h.root / "link.tar"))
    through_ctl = ctl(h, "tape", "import", str(h.root / "link.tar"), str(h.root / "dest"))
    h.stop()
    assert refused.value.exit_code == 2
    assert f"nbankd will not read {h.root / 'link.tar'}: it is a link" in refused.value.message
    assert "give the tar file's real path" in refused.value.message
    assert through_ctl.returncode == 0, through_ctl.stderr  # resolved by nbankctl
    assert f"source: {tar}" in through_ctl.stderr


def test_a_tar_swapped_for_a_link_after_the_check_is_never_read(daemon_factory: Any) -> None:
    """A tar path checked with the job's first part and swapped for a link to another tar
    before the last part starts the job: the job refuses it (exit 2 from job-status's
    error) and imports nothing from the link's target."""
    h = two_archives(daemon_factory, None)
    h.start()
    id = deposited(h, b"the private recording")
    private = make_tar(h.root / "private.tar", [(f"{id}.dat", b"the private recording")])
    tar = make_tar(h.root / "tape.tar", [("other.dat", b"nothing registered")])
    dest = str(h.root / "dest")
    first = request(h, "tape-import", archive=dest, tar=str(tar), ids=[id], more=True)
    tar.unlink()
    tar.symlink_to(private)
    request(h, "tape-import", job=first["job"], ids=[], more=False)
    state = finished(h, first["job"])
    h.stop()
    assert state["error"] is not None and state["error"]["exit"] == 2
    assert "it is a link" in state["error"]["message"]
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


def test_an_admin_cannot_import_a_tar_only_the_daemon_user_can_read(
    daemon_factory: Any, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """An admin who is not the daemon's user names a tar only the daemon's user may read
    (mode 0600): refused (exit 2) naming the file and the admin; nothing imported."""
    admins = {"control": {"admins": [other_user.name]}}
    h = two_archives(daemon_factory, unpriv_user, extra_config=admins)
    h.start()
    h.socket_path.chmod(0o666)  # reachable by the admin; peer credentials decide
    id = deposited(h, b"the daemon's own bytes")
    tar = make_tar(h.root / "private.tar", [(f"{id}.dat", b"the daemon's own bytes")])
    os.chown(tar, unpriv_user.uid, unpriv_user.gid)
    tar.chmod(0o600)
    r = other_user.run(
        [NBANKCTL, "-c", str(h.config_path), "tape", "import", str(tar), str(h.root / "dest")],
        env={"PATH": os.environ["PATH"]},
    )
    h.stop()
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"nbankd will not read {tar}: '{other_user.name}' may not read it" in r.stderr
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


# --- the job table: ids, bounds -------------------------------------------------------


def test_another_admin_cannot_reach_a_job_by_guessing_its_id(daemon_factory: Any) -> None:
    """A job waiting for more identifiers is not reached through any id made of the
    daemon's pid and a small number (job ids are random), so nobody can add to it."""
    h = two_archives(daemon_factory, None)
    h.start()
    assert h.proc is not None
    job = request(h, "copy", archive=str(h.root / "dest"), ids=["a"], more=True)["job"]
    hits = []
    for n in range(1, 20):
        guess = f"copy-{h.proc.pid}-{n}"
        try:
            request(h, "copy", job=guess, ids=["b"], more=True)
        except ControlError as err:
            assert err.code == "not-found"
        else:
            hits.append(guess)
    h.stop()
    assert hits == [] and len(job) >= len("copy-") + 16


def test_jobs_that_never_start_are_bounded(daemon_factory: Any) -> None:
    """Jobs left waiting for more identifiers count against a bound: the one past it is
    answered busy (exit 3) naming what to do, and one job's identifiers are bounded too
    (exit 2, saying to split the list)."""
    h = two_archives(daemon_factory, None)
    h.start()
    dest = str(h.root / "dest")
    for _ in range(job_handlers.MAX_UNFINISHED):
        request(h, "copy", archive=dest, ids=["a"], more=True)
    with pytest.raises(ControlError) as busy:
        request(h, "copy", archive=dest, ids=["a"], more=True)
    h.stop()
    h.start()
    job = request(h, "copy", archive=dest, ids=["x"], more=True)["job"]
    batch = [f"i{n}" for n in range(5000)]
    with pytest.raises(ControlError) as too_many:
        for _ in range(job_handlers.MAX_IDS // len(batch) + 1):
            request(h, "copy", job=job, ids=batch, more=True)
    h.stop()
    assert busy.value.code == "busy" and busy.value.exit_code == 3
    assert "copies or imports under way or waiting" in busy.value.message
    assert too_many.value.exit_code == 2
    assert f"more than {job_handlers.MAX_IDS} identifiers" in too_many.value.message


def test_events_nobody_reads_are_bounded_and_the_tallies_stay_exact(
    daemon_factory: Any,
) -> None:
    """An import whose nbankctl never reads keeps at most MAX_PENDING of its lines; the
    dropped ones are counted (``skipped``) and its tallies still count every member."""
    h = two_archives(daemon_factory, None)
    h.start()
    members = job_handlers.MAX_PENDING + 500
    tar = make_tar(h.root / "many.tar", [(f"m{n}.dat", b"x") for n in range(members)])
    job = request(h, "tape-import", archive=str(h.root / "dest"), tar=str(tar))["job"]
    state = finished(h, job)
    h.stop()
    assert state["skipped"] == 500
    assert state["events"][0][1]["item"] == "m500.dat"
    assert state["counts"] == {"skipped": members} and state["failures"] == 0


# --- an unlucky lab: two jobs into one archive, a stop or a kill during a job -----------


def test_a_second_job_into_the_same_archive_waits_for_the_first(daemon_factory: Any) -> None:
    """While one copy into an archive is under way, a second one into it says it waits
    and does nothing until the first has ended; then both succeed (exit 0)."""
    h, id, release = paused_daemon(daemon_factory, b"one at a time")
    dest = h.root / "dest"
    first = started_copy(h, str(dest), id, stderr=h.root / "first.err")
    stored = dest / "resources" / id[:2] / "rec.dat"
    try:
        wait_for(stored.exists, 60, "the first copy to link its file")
        second = started_copy(h, str(dest), id, stderr=h.root / "second.err")
        said = h.root / "second.err"
        wait_for(lambda: "waiting for it" in said.read_text(), 60, "the second to wait")
        assert f"another copy or import into {dest} is under way" in said.read_text()
    finally:
        release.touch()
    assert first.wait(120) == 0, (h.root / "first.err").read_text()
    assert second.wait(120) == 0, said.read_text()
    h.stop()
    assert stored.read_bytes() == b"one at a time"
    assert "already in the destination archive" in said.read_text()


@pytest.mark.parametrize("how", ["stop", "kill9"])
def test_a_copy_cut_short_by_the_daemon_is_finished_by_running_it_again(
    daemon_factory: Any, how: str
) -> None:
    """A daemon stopped (SIGTERM, which ends it promptly) or killed (-9) while a copy's
    file is linked but not located: nbankctl exits 3 saying to run it again;
    resources/ holds only whole files; the re-run exits 0 and locates the copy."""
    data = b"cut short " * 1000
    if how == "stop":
        h, id, _ = paused_daemon(daemon_factory, data)
    else:
        h = two_archives(daemon_factory, None)
        h.start()
        id = deposited(h, data)
        h.stop()  # the deposit was its first publish: crash at the copy's
        h.start(env={"NBANKD_CRASH_AT": "after-publish-link"})
    dest = h.root / "dest"
    copy = started_copy(h, str(dest), id, stderr=h.root / "copy.err")
    if how == "stop":
        wait_for((dest / "resources" / id[:2] / "rec.dat").exists, 60, "the link")
        assert h.stop(signal.SIGTERM, timeout=30) == 0
    else:
        h.wait_exit(60)
    assert copy.wait(120) == 3, (h.root / "copy.err").read_text()
    assert "run the same command again" in (h.root / "copy.err").read_text()
    for path in (dest / "resources").rglob("*"):
        if path.is_file():
            assert hashlib.sha1(path.read_bytes()).digest() == hashlib.sha1(data).digest()
    h.start()
    again = ctl(h, "copy", str(dest), id)
    h.stop()
    assert again.returncode == 0, again.stderr
    assert (dest / "resources" / id[:2] / "rec.dat").read_bytes() == data
    with h.open_registry() as reg:
        assert "dest" in reg.get_resource(id).locations


def test_the_tar_check_refuses_what_the_peer_could_not_read(
    user_tmp_path: Path, other_user: TestUser
) -> None:
    """pin_tar, given the peer the control server saw: a 0600 file, or a readable file in
    a folder the peer may not enter, is refused naming the peer; a readable file on a
    searchable path is pinned, and read through the pin whatever its path names since."""
    peer = Peer.lookup(0, other_user.uid, other_user.gid)
    shut = user_tmp_path / "shut"
    shut.mkdir(mode=0o700)
    inside = make_tar(shut / "in.tar", [("a.dat", b"a")])
    private = make_tar(user_tmp_path / "private.tar", [("b.dat", b"private bytes")])
    private.chmod(0o600)
    readable = make_tar(user_tmp_path / "open.tar", [("a.dat", b"open bytes")])
    readable.chmod(0o644)
    expected = readable.read_bytes()
    refusals = []
    for path in (private, inside):
        with pytest.raises(ProtocolError) as refused:
            tar_pin.pin_tar(path, peer)
        refusals.append(refused.value.message)
    pinned = tar_pin.pin_tar(readable, peer)
    try:
        readable.unlink()
        readable.symlink_to(private)
        with open(pinned, "rb") as f:
            read = f.read()
    finally:
        pinned.close()
    assert f"'{other_user.name}' may not read it" in refusals[0]
    assert f"'{other_user.name}' may not enter the folder {shut}" in refusals[1]
    assert str(pinned) == str(user_tmp_path / "open.tar")
    assert read == expected
