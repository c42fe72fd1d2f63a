"""Hostile review of a lost or restored state_dir: ``nbankd --adopt-archives`` over
archives holding hostile or awkward content, the refusal to start over an orphaned
archive, and the report of work files no journal owns. Real daemon subprocesses,
real archives and registries; polling with deadlines, never sleeps.

Findings, all fixed: one bad entry cut adoption short; a resource copied to a second
archive could not be adopted; adoption named nothing it skipped; one cut short could
not be finished, and a plain start then ran with resources unrecorded; an archive
mounted after the start took deposits into an empty registry; a .nbank swapped for a
link was followed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.adoption import plant
from fixtures.daemon import NBANKD, DaemonHarness, nbankctl, status_json, wait_for, work_entries

Factory = Callable[..., DaemonHarness]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}


def lost_state(daemon_factory: Factory, **options: object) -> DaemonHarness:
    """A daemon whose archive was made by a first start and whose state_dir is then lost."""
    h = daemon_factory(**options)
    h.start()
    h.stop()
    shutil.rmtree(h.state_dir)
    return h


def run_nbankd(
    h: DaemonHarness, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``nbankd ARGS`` until it exits, or until it serves its control socket (then
    stopped by SIGTERM): its exit status and everything it said."""
    if not h.config_path.exists():
        h.write_config()
    h.socket_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [NBANKD, "-c", str(h.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or h.socket_path.exists(),
            timeout,
            "adoption to end or the daemon to serve",
        )
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def adopt_run(h: DaemonHarness, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``nbankd --adopt-archives`` (see :func:`run_nbankd`)."""
    return run_nbankd(h, "--adopt-archives", timeout=timeout)


def registered(h: DaemonHarness) -> dict[str, str | None]:
    """name -> sha1 of every resource in the embedded registry."""
    db = sqlite3.connect(f"file:{h.state_dir / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT name, sha1 FROM resource"))
    finally:
        db.close()


def two_archives(daemon_factory: Factory) -> tuple[DaemonHarness, Path]:
    """A daemon with a second archive (and an inbox depositing into it), both made by
    a first start, then its state_dir lost."""
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


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def count_registered(h: DaemonHarness) -> int:
    """How many resources the embedded registry holds now (0 before it is readable)."""
    try:
        return len(registered(h))
    except sqlite3.Error:
        return 0


GOOD = {"aa01.wav": b"first recording", "zz03.wav": b"third recording"}


def plant_good(h: DaemonHarness) -> None:
    for name, data in GOOD.items():
        plant(h.archive, name, data)


def good_registered(h: DaemonHarness) -> dict[str, str | None]:
    have = registered(h)
    return {n: have.get(n) for n in ("aa01", "zz03")}


GOOD_SHA1 = {"aa01": sha1(b"first recording"), "zz03": sha1(b"third recording")}


def _fifo(h: DaemonHarness) -> str:
    (h.archive / "resources" / "mm").mkdir(exist_ok=True)
    os.mkfifo(h.archive / "resources" / "mm" / "mm02.wav")
    return "mm02"


def _same_bytes(h: DaemonHarness) -> str:
    # nbank with require_hash: false allows it. Adoption goes through names in sorted
    # order, so these are bytes aa01 was adopted with; zz03 comes after and is adopted
    plant(h.archive, "mm02.wav", GOOD["aa01.wav"])
    return "mm02"


def _not_utf8(h: DaemonHarness) -> str:
    plant(h.archive, b"mm\xff02.wav", b"a name from a Latin-1 rig")
    return "02.wav"


# --- adoption over hostile archive content --------------------------------------------


@pytest.mark.parametrize("hostile", [_fifo, _same_bytes, _not_utf8], ids=lambda f: f.__name__)
def test_one_bad_entry_does_not_cut_adoption_short(
    daemon_factory: Factory, hostile: Callable[[DaemonHarness], str]
) -> None:
    """One entry adoption cannot register (a FIFO, bytes already adopted under another
    identifier, a name no registry takes) is named and skipped; every other stored
    resource is adopted with its SHA-1 and the daemon runs."""
    h = lost_state(daemon_factory)
    plant_good(h)
    named = hostile(h)
    done = adopt_run(h)
    assert "Traceback" not in done.stdout
    assert done.returncode == 0, done.stdout[-2000:]
    assert good_registered(h) == GOOD_SHA1
    assert named in done.stdout, done.stdout


def test_links_in_the_archive_are_never_followed_by_adoption(daemon_factory: Factory) -> None:
    """A resource name that is a symbolic link (to a file outside the archive, to
    /dev/zero, to a FIFO) is never registered and never read: adoption ends, the
    real resources adopted with their SHA-1."""
    h = lost_state(daemon_factory)
    plant_good(h)
    outside = h.root / "outside.txt"
    outside.write_bytes(b"someone's private file outside the archive")
    fifo = h.root / "pipe"
    os.mkfifo(fifo)
    stub = h.archive / "resources" / "ll"
    stub.mkdir()
    (stub / "ll01.wav").symlink_to(outside)
    (stub / "ll02.wav").symlink_to("/dev/zero")
    (stub / "ll03.wav").symlink_to(fifo)
    done = adopt_run(h, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    have = registered(h)
    assert set(have) == {"aa01", "zz03"}
    assert sha1(outside.read_bytes()) not in have.values()


def test_adoption_names_what_it_skipped(daemon_factory: Factory) -> None:
    """Entries of resources/ adoption does not register (a link, a partial transfer,
    a file in the wrong stub folder) are named in what nbankd says, so the admin
    knows the new registry lacks them."""
    h = lost_state(daemon_factory)
    plant_good(h)
    outside = h.root / "outside.txt"
    outside.write_bytes(b"outside")
    (h.archive / "resources" / "aa" / "aa09.wav").symlink_to(outside)
    (h.archive / "resources" / "aa" / ".aa08.wav.partial").write_bytes(b"half")
    (h.archive / "resources" / "aa" / "qq05.wav").write_bytes(b"misplaced")
    done = adopt_run(h, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    for name in ("aa09.wav", ".aa08.wav.partial", "qq05.wav"):
        assert name in done.stdout, name


def test_a_resource_copied_to_a_second_archive_is_adopted_with_both_locations(
    daemon_factory: Factory,
) -> None:
    """A resource stored in two configured archives with the same bytes (what
    nbankctl copy makes) is adopted once, with a location in each archive."""
    h, mirror = two_archives(daemon_factory)
    plant_good(h)
    (mirror / "resources" / "aa").mkdir()
    (mirror / "resources" / "aa" / "aa01.wav").write_bytes(GOOD["aa01.wav"])
    done = adopt_run(h)
    assert done.returncode == 0, done.stdout[-2000:]
    assert good_registered(h) == GOOD_SHA1
    with h.open_registry() as reg:
        record = reg.get_resource("aa01")
    assert record is not None and set(record.locations) == {h.archive_name, "mirror"}


def test_different_bytes_under_one_identifier_in_two_archives_are_not_silently_adopted(
    daemon_factory: Factory,
) -> None:
    """Two archives holding one identifier with different bytes: adoption never
    records one of them as the other's SHA-1 and never exits with a traceback."""
    h, mirror = two_archives(daemon_factory)
    plant(h.archive, "aa01.wav", b"the lab's recording")
    (mirror / "resources" / "aa").mkdir()
    (mirror / "resources" / "aa" / "aa01.wav").write_bytes(b"different bytes, same name")
    done = adopt_run(h)
    assert "Traceback" not in done.stdout
    have = registered(h)
    assert have.get("aa01") in (None, sha1(b"the lab's recording"))
    with h.open_registry() as reg:
        record = reg.get_resource("aa01")
    assert record is None or "mirror" not in record.locations


# --- adoption cut short ---------------------------------------------------------------


def kill_adoption_half_way(h: DaemonHarness) -> dict[str, bytes]:
    """Plants 3000 resources, starts nbankd --adopt-archives and kills it (-9) once it
    registered some; returns what is stored (name -> bytes)."""
    h.write_config()
    stored = {f"r{i:05d}": os.urandom(64) for i in range(3000)}
    for name, data in stored.items():
        plant(h.archive, name, data)
    proc = subprocess.Popen(
        [NBANKD, "-c", str(h.config_path), "--adopt-archives"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        wait_for(lambda: count_registered(h) > 0, 60, "adoption to begin registering")
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert 0 < count_registered(h) < len(stored)  # really cut short
    return stored


def test_an_adoption_killed_half_way_is_finished_by_running_it_again(
    daemon_factory: Factory,
) -> None:
    """nbankd --adopt-archives killed -9 half way, then run again: every stored
    resource is registered, once, with its SHA-1."""
    h = lost_state(daemon_factory)
    stored = kill_adoption_half_way(h)
    done = adopt_run(h)
    assert done.returncode == 0, done.stdout[-2000:]
    assert registered(h) == {n: sha1(d) for n, d in stored.items()}
    assert run_nbankd(h).returncode == 0  # finished: a plain start runs


def test_a_rerun_reports_a_stored_resource_changed_since_it_was_registered(
    daemon_factory: Factory,
) -> None:
    """A resource whose bytes changed between a killed adoption and its re-run keeps
    the SHA-1 it was registered with, is named as a conflict, and the rest is adopted."""
    h = lost_state(daemon_factory)
    stored = kill_adoption_half_way(h)
    first = registered(h)
    changed = min(first)
    path = h.archive / "resources" / changed[:2] / changed
    path.chmod(0o644)
    path.write_bytes(b"altered after it was registered")
    done = adopt_run(h)
    assert done.returncode == 0, done.stdout[-2000:]
    assert registered(h) == {n: sha1(d) for n, d in stored.items()}
    assert "conflict" in done.stdout and changed in done.stdout


def test_a_plain_start_after_a_failed_adoption_does_not_run_with_resources_unrecorded(
    daemon_factory: Factory,
) -> None:
    """After --adopt-archives was killed half way, a plain start does not run over an
    archive whose stored resources the registry lacks: it refuses (exit 2) naming
    --adopt-archives."""
    h = lost_state(daemon_factory)
    kill_adoption_half_way(h)
    before = registered(h)
    done = run_nbankd(h)
    assert done.returncode == 2 and "--adopt-archives" in done.stdout, done.stdout[-2000:]
    assert registered(h) == before


def test_an_adoption_asks_systemd_for_more_start_time(daemon_factory: Factory) -> None:
    """Under systemd notify, nbankd --adopt-archives sends EXTEND_TIMEOUT_USEC while it
    adopts, before READY=1 (TimeoutStartSec= would kill a long adoption)."""
    h = lost_state(daemon_factory)
    plant_good(h)
    h.start(args=["--adopt-archives"])
    said = list(h.messages)
    h.stop()
    ready = next(i for i, m in enumerate(said) if "READY=1" in m)
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in said[:ready]), said


def test_adoption_refused_while_the_daemon_runs(daemon_factory: Factory) -> None:
    """nbankd --adopt-archives started beside a running daemon of the same state_dir
    exits without touching the registry, and the running daemon keeps answering."""
    h = lost_state(daemon_factory)
    plant_good(h)
    h.start(args=["--adopt-archives"])
    before = registered(h)
    second = subprocess.run(
        [NBANKD, "-c", str(h.config_path), "--adopt-archives"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert registered(h) == before == GOOD_SHA1
    assert status_json(h)[0] in (0, 1)
    h.stop()


# --- the refusal over an orphaned archive ---------------------------------------------


def test_an_archive_mounted_after_the_start_does_not_take_deposits_into_an_empty_registry(
    daemon_factory: Factory,
) -> None:
    """state_dir lost while the archive's filesystem is not mounted yet: once it
    appears, nbankd does not deposit into it over a registry that lacks every
    resource it holds (status says to restore state_dir or adopt)."""
    h = daemon_factory()
    h.start()
    h.drop("kept01.wav", b"stored before state_dir was lost")
    h.wait_settled(1)
    h.stop()
    shutil.rmtree(h.state_dir)
    unmounted = h.root / "not-mounted-yet"
    h.archive.rename(unmounted)
    h.edit_config(lambda c: c["archives"][0].update(create=False))
    h.start()
    unmounted.rename(h.archive)  # the mount arrives

    def mounted() -> bool:
        # found: usable, or held as holding resources the registry lacks (the hold may
        # be told as the archive's problem as soon as it is found)
        problem = status_json(h)[1]["inboxes"][0]["archive_problem"]
        return problem is None or "state_dir" in problem

    wait_for(mounted, 60, "the archive to be found")
    h.drop("new01.wav", b"recorded after the restart")

    def decided() -> object:
        said = [d for d in status_json(h)[1]["degraded"] if "adopt" in d or "state_dir" in d]
        return h.receipt("new01") or said

    wait_for(decided, 60, "new01 to be deposited or held with a reason")
    assert h.receipt("new01") is None, registered(h)
    assert (h.inbox / "new01.wav").exists()  # it waits in its inbox
    h.stop()


def test_a_late_archive_held_over_a_lost_state_dir_is_released_by_adopting(
    daemon_factory: Factory,
) -> None:
    """The way out status names works: after the hold, a start with --adopt-archives
    adopts what the archive held, then deposits the input that waited."""
    h = daemon_factory()
    h.start()
    h.drop("kept01.wav", b"stored before state_dir was lost")
    h.wait_settled(1)
    h.stop()
    shutil.rmtree(h.state_dir)
    unmounted = h.root / "not-mounted-yet"
    h.archive.rename(unmounted)
    h.edit_config(lambda c: c["archives"][0].update(create=False))
    h.start()
    unmounted.rename(h.archive)
    h.drop("new01.wav", b"recorded after the restart")

    def held() -> bool:
        return any("--adopt-archives" in d for d in status_json(h)[1]["degraded"])

    wait_for(held, 60, "deposits into the late archive to be held")
    h.stop()
    h.start(args=["--adopt-archives"])
    wait_for(lambda: h.receipt("new01"), 60, "new01 to be deposited")
    assert registered(h)["kept01"] == sha1(b"stored before state_dir was lost")
    h.stop()


def test_an_archive_mounted_after_the_start_over_a_kept_state_dir_takes_deposits(
    daemon_factory: Factory,
) -> None:
    """state_dir kept, the archive's filesystem mounted after the start: once it
    appears, deposits go into it as usual (the registry records what it holds)."""
    h = daemon_factory()
    h.start()
    h.drop("kept01.wav", b"stored before the restart")
    h.wait_settled(1)
    h.stop()
    unmounted = h.root / "not-mounted-yet"
    h.archive.rename(unmounted)
    h.edit_config(lambda c: c["archives"][0].update(create=False))
    h.start()
    unmounted.rename(h.archive)  # the mount arrives
    h.drop("new01.wav", b"recorded after the restart")
    wait_for(lambda: h.receipt("new01"), 60, "new01 to be deposited")
    assert not any("state_dir" in d for d in status_json(h)[1]["degraded"])
    h.stop()


# --- work files no journal owns ---------------------------------------------------------


def test_a_work_folder_swapped_for_a_link_is_reported_as_a_link(
    daemon_factory: Factory,
) -> None:
    """.nbank replaced by a link to another folder: status says .nbank is a link and
    never lists that folder's files as claimed inputs to move into the inbox."""
    h = daemon_factory()
    h.start()
    elsewhere = h.root / "someone-elses-folder"
    elsewhere.mkdir()
    (elsewhere / "private-notes.txt").write_bytes(b"never meant for the archive")
    shutil.rmtree(h.inbox / ".nbank")
    (h.inbox / ".nbank").symlink_to(elsewhere)
    _code, doc = status_json(h)
    assert doc["inboxes"][0]["unowned_work_files"] == []
    assert not any("private-notes.txt" in d or "no deposit" in d for d in doc["degraded"])
    assert any(".nbank is a link" in d for d in doc["degraded"]), doc["degraded"]
    h.stop()


def test_many_odd_orphans_are_reported_bounded_and_left_alone(daemon_factory: Factory) -> None:
    """A restored older state_dir over a .nbank holding 5000 unknown work files, a
    FIFO, a link and names shaped like a token's: status answers at once, names
    each in --json, keeps its text short, and nothing there is moved or changed."""
    h = daemon_factory()
    h.start()
    work = h.inbox / ".nbank"
    tokens = [os.urandom(16).hex() for _ in range(5000)]
    for t in tokens:
        (work / t).write_bytes(t.encode())
    odd = [f"{tokens[0]}.released", f"{tokens[1]}.sidecar.yaml", "pipe", "link", "A" * 32]
    (work / odd[0]).mkdir()
    (work / odd[1]).write_bytes(b"id: x\n")
    os.mkfifo(work / "pipe")
    (work / "link").symlink_to("/dev/zero")
    (work / odd[4]).write_bytes(b"upper-case token")
    before = {p.name: p.lstat() for p in work_entries(work)}
    code, doc = status_json(h)
    assert code == 1
    assert set(doc["inboxes"][0]["unowned_work_files"]) == set(tokens) | set(odd)
    text = nbankctl(h, "status", timeout=60)
    assert "and 5000 more" in text.stdout and len(text.stdout) < 20000
    after = {p.name: p.lstat() for p in work_entries(work)}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()
    }
    h.stop()
