"""Second hostile review of the lost-state_dir fixes: ``nbankd --adopt-archives``
(skips, resumable through its marker, copies in a second archive) and the check of
an archive mounted after the start (late_archives). Real daemon subprocesses, real
archives and embedded registries, kill -9; polling with deadlines, never sleeps.

Findings, all fixed: a resource rewritten while adoption hashes it was registered
with the SHA-1 of bytes it no longer holds; a conflict the lab fixed could not be
picked up (a re-run was refused); a folder at the marker's path ended adoption in a
traceback; a long adoption logged no progress; an nbankctl deposit into a held late
archive went through and lifted the hold."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fixtures.adoption import plant
from fixtures.daemon import (
    NBANKD,
    DaemonHarness,
    more_scans,
    nbankctl,
    status_json,
    wait_for,
)

Factory = Callable[..., DaemonHarness]
MARKER = "adoption-unfinished.json"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def lost_state(daemon_factory: Factory) -> DaemonHarness:
    """A daemon whose archive was made by a first start, then its state_dir lost."""
    h = daemon_factory()
    h.start()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.socket_path.unlink(missing_ok=True)
    return h


def two_archives(daemon_factory: Factory) -> tuple[DaemonHarness, Path]:
    """A daemon with a second archive "mirror" (an inbox deposits into it), both made
    by a first start, then its state_dir lost."""
    h = daemon_factory()
    h.write_config()
    mirror = h.root / "mirror"

    def add(cfg: dict[str, Any]) -> None:
        cfg["archives"].append({"path": str(mirror), "name": "mirror", "create": True})
        cfg["inboxes"].append(
            {
                "path": str(h.root / "inbox2"),
                "archive": "mirror",
                "dtype": h.dtype,
                "settle_seconds": 0.3,
            }
        )

    h.edit_config(add)
    h.start()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.socket_path.unlink(missing_ok=True)
    return h, mirror


def spawn(h: DaemonHarness, *args: str) -> subprocess.Popen[str]:
    if not h.config_path.exists():
        h.write_config()
    h.socket_path.unlink(missing_ok=True)
    return subprocess.Popen(
        [NBANKD, "-c", str(h.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def finish(
    h: DaemonHarness, proc: subprocess.Popen[str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Waits until ``proc`` exits or serves its control socket (then SIGTERM)."""
    try:
        wait_for(
            lambda: proc.poll() is not None or h.socket_path.exists(),
            timeout,
            "nbankd to exit or serve",
        )
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_nbankd(h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return finish(h, spawn(h, *args))


def registered(h: DaemonHarness) -> dict[str, str | None]:
    db = sqlite3.connect(f"file:{h.state_dir / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT name, sha1 FROM resource"))
    finally:
        db.close()


def count_registered(h: DaemonHarness) -> int:
    try:
        return len(registered(h))
    except sqlite3.Error:
        return 0


def locations(h: DaemonHarness) -> dict[str, set[str]]:
    """name -> archives the embedded registry locates it in."""
    with h.open_registry() as reg:
        return {r.name: set(r.locations) for r in reg.search()}


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    """kill -9 ``proc`` once ``ready()`` (it must still be running then)."""
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 120, what)
        assert proc.poll() is None, f"ended before {what}"
    finally:
        proc.kill()
        proc.communicate()


# --- adoption: what it hashes ------------------------------------------------------------


def _reading_offset(pid: int, path: Path) -> tuple[int, int] | None:
    """(fd, file offset) of process ``pid``'s descriptor open on ``path``, if any."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) != str(path):
                    continue
                info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
            except OSError:
                continue
            pos = next(int(v.split()[1]) for v in info.splitlines() if v.startswith("pos:"))
            return int(fd.name), pos
    except OSError:
        return None
    return None


def test_a_resource_changed_while_adoption_hashes_it_is_not_registered_with_stale_bytes(
    daemon_factory: Factory,
) -> None:
    """A stored resource rewritten while adoption is hashing it is never registered
    with a SHA-1 of bytes it no longer holds (re-hashed, or named and left unfinished)."""
    h = lost_state(daemon_factory)
    path = plant(h.archive, "aa01.wav")
    size = 1 << 30
    os.truncate(path, size)  # sparse: hashing it takes a few seconds
    proc = spawn(h, "--adopt-archives")

    def mid_read() -> bool:
        seen = _reading_offset(proc.pid, path)
        return seen is not None and seen[1] > 0

    try:
        wait_for(lambda: mid_read() or proc.poll() is not None, 60, "adoption to hash aa01")
        seen = _reading_offset(proc.pid, path)
        assert seen is not None and seen[1] < size // 2, "hashed too fast to test"
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"rewritten by a restore still running", 0)  # bytes already hashed
        finally:
            os.close(fd)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    done = finish(h, proc)
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    have = registered(h).get("aa01")
    assert have in (None, sha1_of(path)), done.stdout[-3000:]


# --- adoption: a re-run after the lab fixed what it reported ----------------------------


def test_a_conflict_fixed_by_the_lab_is_picked_up_by_a_rerun(daemon_factory: Factory) -> None:
    """A conflict adoption reported (a second archive's copy with other bytes) that the
    lab then fixes is located by running --adopt-archives again, as the report invites."""
    h, mirror = two_archives(daemon_factory)
    plant(h.archive, "aa01.wav", b"the lab's recording")
    copy = plant(mirror, "aa01.wav", b"a corrupted copy")
    first = run_nbankd(h, "--adopt-archives")
    assert first.returncode == 0 and "conflict" in first.stdout, first.stdout[-3000:]
    copy.chmod(0o644)
    copy.write_bytes(b"the lab's recording")  # the lab restores the good copy
    again = run_nbankd(h, "--adopt-archives")
    assert again.returncode == 0, again.stdout[-3000:]
    assert locations(h)["aa01"] == {h.archive_name, "mirror"}


# --- adoption: the marker -------------------------------------------------------------


def _garbage(marker: Path) -> None:
    marker.write_bytes(b"\x00\xff{not json")


def _fifo(marker: Path) -> None:
    os.mkfifo(marker)


def _folder(marker: Path) -> None:
    marker.mkdir()
    (marker / "x").write_bytes(b"x")


def kill_adoption_half_way(h: DaemonHarness, n: int = 3000) -> dict[str, bytes]:
    """Plants ``n`` resources, kills (-9) nbankd --adopt-archives once it registered
    some; returns what is stored."""
    stored = {f"r{i:05d}": os.urandom(64) for i in range(n)}
    for name, data in stored.items():
        plant(h.archive, name, data)
    proc = spawn(h, "--adopt-archives")
    kill_when(proc, lambda: count_registered(h) > 0, "adoption to begin registering")
    assert 0 < count_registered(h) < n
    return stored


@pytest.mark.parametrize("spoil", [_garbage, _fifo, _folder], ids=lambda f: f.__name__)
def test_a_spoiled_marker_still_refuses_a_plain_start_and_adoption_finishes(
    daemon_factory: Factory, spoil: Callable[[Path], None]
) -> None:
    """The unfinished-adoption marker replaced by garbage, a FIFO or a folder: a plain
    start still refuses (no hang), and --adopt-archives finishes the adoption, exact."""
    h = lost_state(daemon_factory)
    stored = kill_adoption_half_way(h)
    marker = h.state_dir / MARKER
    marker.unlink()
    spoil(marker)
    plain = run_nbankd(h)
    assert plain.returncode == 2 and "--adopt-archives" in plain.stdout, plain.stdout[-3000:]
    done = run_nbankd(h, "--adopt-archives")
    assert "Traceback" not in done.stdout, done.stdout[-3000:]
    assert done.returncode == 0, done.stdout[-3000:]
    assert registered(h) == {n: sha1(d) for n, d in stored.items()}
    assert run_nbankd(h).returncode == 0


def test_a_marker_link_planted_is_never_written_through(daemon_factory: Factory) -> None:
    """A dangling link planted at the marker's path before adoption: adoption runs
    and the file it points to is never created or written."""
    h = lost_state(daemon_factory)
    plant(h.archive, "aa01.wav", b"one")
    h.state_dir.mkdir()
    target = h.root / "elsewhere" / "planted-target"
    target.parent.mkdir()
    (h.state_dir / MARKER).symlink_to(target)
    done = run_nbankd(h, "--adopt-archives")
    assert not target.exists()
    assert registered(h) == {"aa01": sha1(b"one")}, done.stdout[-3000:]


def test_a_marker_removed_by_hand_mid_way_does_not_stop_adoption(
    daemon_factory: Factory,
) -> None:
    """The marker deleted by hand while adoption runs: it still registers everything
    stored and ends without a traceback."""
    h = lost_state(daemon_factory)
    stored = {f"r{i:05d}": os.urandom(64) for i in range(2000)}
    for name, data in stored.items():
        plant(h.archive, name, data)
    proc = spawn(h, "--adopt-archives")
    wait_for(lambda: count_registered(h) > 0 or proc.poll() is not None, 60, "adoption to register")
    (h.state_dir / MARKER).unlink(missing_ok=True)
    done = finish(h, proc)
    assert "Traceback" not in done.stdout
    assert registered(h) == {n: sha1(d) for n, d in stored.items()}


def test_a_long_adoption_says_how_far_it_got(daemon_factory: Factory) -> None:
    """Adoption hashing for longer than a keep-alive period (10 s) logs its progress
    meanwhile: an admin watching a silent journal cannot tell it from a hang."""
    h = lost_state(daemon_factory)
    os.truncate(plant(h.archive, "aa01.wav"), 3 << 30)  # sparse: ~15 s of hashing here
    done = run_nbankd(h, "--adopt-archives")
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    end = next(i for i, x in enumerate(lines) if x["event"] == "adopted archive")
    began = datetime.fromisoformat(lines[0]["timestamp"])
    took = (datetime.fromisoformat(lines[end]["timestamp"]) - began).total_seconds()
    said = [x for x in lines[:end] if "progress" in x["event"]]
    assert took < 10 or said, f"{took:.0f} s of adoption without a word: {lines[:end]}"


# --- adoption: kill -9 of a resumed adoption ------------------------------------------


def test_a_resumed_adoption_killed_again_then_finished_is_exact(daemon_factory: Factory) -> None:
    """Adoption over two archives (half the resources copied in both) killed -9, its
    re-run killed -9 further on, then run to the end: each resource once, its SHA-1,
    a location in exactly the archives holding it."""
    h, mirror = two_archives(daemon_factory)
    stored = {f"r{i:05d}": os.urandom(48) for i in range(3000)}
    for i, (name, data) in enumerate(stored.items()):
        plant(h.archive, name, data)
        if i % 2:
            plant(mirror, name, data)
    first = spawn(h, "--adopt-archives")
    kill_when(first, lambda: count_registered(h) > 200, "a first part to be adopted")
    at = count_registered(h)
    second = spawn(h, "--adopt-archives")
    kill_when(
        second,
        lambda: count_registered(h) == len(stored) and bool(locations(h)),
        "the first archive to be adopted",
    )
    assert at < len(stored)
    done = run_nbankd(h, "--adopt-archives")
    assert done.returncode == 0, done.stdout[-3000:]
    assert registered(h) == {n: sha1(d) for n, d in stored.items()}
    want = {
        n: {h.archive_name, "mirror"} if i % 2 else {h.archive_name} for i, n in enumerate(stored)
    }
    assert locations(h) == want
    assert not (h.state_dir / MARKER).exists()


# --- archives mounted after the start -------------------------------------------------


def late_mount(h: DaemonHarness, *, keep_state: bool = False) -> Path:
    """Stops ``h`` (state_dir lost unless ``keep_state``), moves its archive aside (not
    mounted yet), starts it with create: false; returns where the archive waits."""
    h.stop()
    if not keep_state:
        shutil.rmtree(h.state_dir)
    unmounted = h.root / "not-mounted-yet"
    h.archive.rename(unmounted)
    h.edit_config(lambda c: c["archives"][0].update(create=False))
    h.start()
    return unmounted


def held_said(h: DaemonHarness) -> bool:
    return any("--adopt-archives" in d for d in status_json(h)[1]["degraded"])


def held_over_lost_state(daemon_factory: Factory) -> DaemonHarness:
    """A daemon whose late-mounted archive holds kept01 over a lost state_dir, new01
    waiting in the inbox, the hold said in status."""
    h = daemon_factory()
    h.start()
    h.drop("kept01.wav", b"stored before state_dir was lost")
    h.wait_settled(1)
    unmounted = late_mount(h)
    unmounted.rename(h.archive)
    h.drop("new01.wav", b"recorded after the restart")
    wait_for(lambda: held_said(h), 60, "deposits into the late archive to be held")
    return h


def test_a_new_empty_archive_mounted_late_takes_deposits(daemon_factory: Factory) -> None:
    """A new, empty archive whose filesystem is mounted after the start (a fresh
    state_dir too) is not held: the first file dropped is deposited."""
    h = daemon_factory()
    h.start()
    unmounted = late_mount(h)
    unmounted.rename(h.archive)
    h.drop("first01.wav", b"the first recording of a new lab")
    wait_for(lambda: h.receipt("first01"), 60, "first01 to be deposited")
    assert not held_said(h)
    h.stop()


def test_a_hold_survives_a_reload(daemon_factory: Factory) -> None:
    """A late archive held over a lost state_dir stays held across nbankctl reload:
    the input waiting is still not deposited, and status still says why."""
    h = held_over_lost_state(daemon_factory)
    h.reload_with(lambda c: c["inboxes"][0].update(settle_seconds=0.4))
    h.drop("new02.wav", b"dropped after the reload")
    more_scans(h, 3)
    assert h.receipt("new01") is None and h.receipt("new02") is None
    assert held_said(h)
    assert "kept01" not in registered(h) and (h.inbox / "new02.wav").exists()
    h.stop()


def test_a_hold_survives_the_archive_flapping(daemon_factory: Factory) -> None:
    """A held late archive unmounted then mounted again stays held: nothing deposited
    into it, the hold said again once it is back."""
    h = held_over_lost_state(daemon_factory)
    away = h.root / "not-mounted-again"
    h.archive.rename(away)
    wait_for(
        lambda: status_json(h)[1]["inboxes"][0]["archive_problem"] is not None,
        60,
        "the archive to be seen missing",
    )
    away.rename(h.archive)

    def back() -> bool:
        problem = status_json(h)[1]["inboxes"][0]["archive_problem"]
        return problem is None or "state_dir" in problem

    wait_for(back, 60, "the archive to be seen again")
    more_scans(h, 2)
    assert held_said(h)
    assert h.receipt("new01") is None and (h.inbox / "new01.wav").exists()
    h.stop()


def test_a_manual_deposit_does_not_lift_the_hold(daemon_factory: Factory) -> None:
    """While a late archive is held over a lost state_dir, an nbankctl deposit into it
    does not end the hold: what it held before is still unrecorded, so the inbox's
    input still waits."""
    h = held_over_lost_state(daemon_factory)
    extra = h.root / "manual01.wav"
    extra.write_bytes(b"deposited by hand during the hold")
    manual = nbankctl(h, "deposit", "-d", h.dtype, str(h.archive), str(extra), timeout=120)
    assert manual.returncode != 0 and extra.exists(), manual.stderr  # refused, left in place
    more_scans(h, 3)
    assert "kept01" not in registered(h)
    assert h.receipt("new01") is None and (h.inbox / "new01.wav").exists()
    assert held_said(h)
    h.stop()
