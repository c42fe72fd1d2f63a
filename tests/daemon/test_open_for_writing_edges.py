"""Edges of "an input still open for writing is not taken for finished": a program
opening the file for writing while the daemon holds its read lease, the walk to
nested files (descriptors, links, FIFOs), how often a held file is asked about
again, and a folder one of whose files is held open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for
from fixtures.holders import held_open
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.daemon.intents import open_for_writing
from nbankd.deposit import folderproof, inboxfs
from nbankd.deposit.spec import InboxSpec
from nbankd.names import WORK_DIR_NAME
from nbankd.watch import writers

REPO = Path(__file__).resolve().parents[2]


# -- a writer opening the file while the lease is held ---------------------------------

# Runs one of the daemon's "open for writing?" questions in a process of its own; the
# moment the kernel has granted the read lease (seen in /proc/locks), another process
# opens the file for writing, and the asker goes on only once the kernel is breaking
# the lease (it has sent the lease-break signal by then). Nothing is replaced: the
# asker's own code runs, the profiler hook only places the writer in that instant.
_RACE = r"""
import fcntl, os, subprocess, sys, time
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from nbankd.deposit import manual
from nbankd.watch import writers

path, which = sys.argv[1], sys.argv[2]
ino, pid = os.stat(path).st_ino, os.getpid()
fired = []

def lease(state):
    return any(f":{ino} " in line and state in line and f" {pid} " in line
               for line in open("/proc/locks"))

def hook(frame, event, arg):
    if event == "c_return" and arg is fcntl.fcntl and not fired and lease("ACTIVE"):
        fired.append(subprocess.Popen([sys.executable, "-c", f"open({path!r}, 'r+b')"]))
        deadline = time.monotonic() + 30
        while not lease("BREAKING"):
            assert time.monotonic() < deadline, "the writer never broke the lease"

sys.setprofile(hook)
if which == "manual":  # nbankctl deposit handed to the daemon (workers.submit_manual)
    answer = manual.writers_gone(Path(path))
else:  # the scan's and the stage step's question
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    answer = writers.open_for_writing_at(fd, os.fsencode(os.path.basename(path)))
sys.setprofile(None)
assert fired, "the lease was never seen held"
fired[0].wait(timeout=60)
print("survived", answer)
"""


@pytest.mark.parametrize("which", ["scan", "manual"])
def test_a_writer_opening_the_file_during_the_question_does_not_kill_the_asker(
    tmp_path: Path, which: str
) -> None:
    """A program opening the file for writing in the instant the daemon holds its read
    lease breaks the lease; the lease-break signal must not end the daemon (SIGIO's
    default action would): the scan's question and the manual deposit's question,
    which the daemon runs too and with CAP_LEASE can ask of anyone's file."""
    path = tmp_path / "take.dat"
    path.write_bytes(b"recording")
    proc = subprocess.run(
        [sys.executable, "-c", _RACE, str(path), which, str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode < 0:
        pytest.fail(f"the asker was killed by {signal.Signals(-proc.returncode).name}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("survived"), proc.stdout


# -- the walk to nested files ----------------------------------------------------------


def _spec(inbox: Path, archive: Path) -> InboxSpec:
    work_id, rejected_id = inboxfs.prepare_folders(inbox, work=WORK_DIR_NAME, rejected="rejected")
    return InboxSpec.of(
        InboxConfig(path=inbox, archive="arch", dtype="test-file"),
        ArchiveConfig(name="arch", path=archive),
        work_id=work_id,
        rejected_id=rejected_id,
    )


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_asking_about_folders_walks_them_from_descriptors(tmp_path: Path) -> None:
    """A folder input is held when a file deep inside is open for writing, not when
    none is; a link inside it is never followed to a file held open outside."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    spec = _spec(inbox, tmp_path / "arch")
    for name in ("busy", "quiet", "linked"):
        (inbox / name / "a" / "b").mkdir(parents=True)
        (inbox / name / "a" / "b" / "f.dat").write_bytes(b"x")
    (outside / "held.dat").write_bytes(b"y")
    os.symlink(outside / "held.dat", inbox / "linked" / "a" / "l.dat")
    before = _open_fds()
    with held_open(inbox / "busy" / "a" / "b" / "f.dat"), held_open(outside / "held.dat"):
        held, unknown = open_for_writing(spec, [("busy", True), ("quiet", True), ("linked", True)])
    assert _open_fds() == before
    assert (held, unknown) == (["busy"], [])


def test_an_inbox_whose_filesystem_says_open_for_every_file_cannot_tell(tmp_path: Path) -> None:
    """When the work folder's token, which nothing holds open, reads "open for writing"
    too (NFSv4 without a delegation, CIFS without an oplock), the files said to be open
    are "cannot tell", never held for ever."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spec = _spec(inbox, tmp_path / "arch")
    token = inbox / WORK_DIR_NAME / folderproof.PROOF_NAME
    token.write_bytes(b"0" * 64)
    (inbox / "rec.dat").write_bytes(b"x")
    try:
        with held_open(token), held_open(inbox / "rec.dat"):  # every file reads "open"
            assert open_for_writing(spec, [("rec.dat", False)]) == ([], ["rec.dat"])
        with held_open(inbox / "rec.dat"):  # the token closed again: trusted
            assert open_for_writing(spec, [("rec.dat", False)]) == (["rec.dat"], [])
    finally:
        fd = os.open(inbox / WORK_DIR_NAME, os.O_RDONLY | os.O_DIRECTORY)
        writers.calibrate(fd, folderproof.PROOF_NAME.encode())
        os.close(fd)


def test_asking_about_many_nested_files_holds_no_descriptor(tmp_path: Path) -> None:
    """Asking about 300 files three folders deep leaves no descriptor open, finds the
    one held open, and neither follows a folder swapped for a link nor blocks on a
    FIFO swapped in for a file."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    spec = _spec(inbox, tmp_path / "arch")
    rels = []
    for i in range(300):
        rel = f"d{i % 7}/e{i % 3}/f{i % 2}/r{i}.dat"
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
        rels.append(rel)
    (outside / "f0").mkdir()
    (outside / "f0" / "secret.dat").write_bytes(b"s")
    os.mkfifo(inbox / "d1" / "e1" / "f1" / "pipe.dat")
    os.symlink(outside, inbox / "d2" / "e2l")
    extra = ["d1/e1/f1/pipe.dat", "d2/e2l/f0/secret.dat"]
    before = _open_fds()
    with held_open(inbox / rels[5]), held_open(outside / "f0" / "secret.dat"):
        held, unknown = open_for_writing(spec, [(rel, False) for rel in rels + extra])
    assert _open_fds() == before
    assert held == [rels[5]]
    assert sorted(unknown) == sorted(extra)


# -- how often a held file is asked about again ----------------------------------------


def _status_inbox(h: DaemonHarness) -> dict[str, Any]:
    from fixtures.daemon import status_json

    _, doc = status_json(h)  # exits 1 while a problem (a stalled file) is shown
    [entry] = doc["inboxes"]
    return entry


def test_a_held_file_with_settle_seconds_zero_does_not_make_the_daemon_rescan_nonstop(
    daemon_factory: Any,
) -> None:
    """``settle_seconds: 0`` (allowed) and a file a program keeps open: the daemon asks
    about it again, but not in a loop listing the whole inbox twenty times a second
    (the main loop's floor of 50 ms): at most a few scans over two seconds."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0, "rescan_every": "1h"})
    h.start()
    try:
        path = h.inbox / "held.dat"
        path.write_bytes(b"recording")
        with held_open(path):
            src = str(path)
            wait_for(
                lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
                30,
                "the daemon to find the file open for writing",
            )
            first = _status_inbox(h)
            wait_for(
                lambda: (_status_inbox(h)["last_scan"] or 0) >= first["last_scan"] + 2.0,
                60,
                "two seconds of the daemon's scans",
            )
            later = _status_inbox(h)
        scans = later["scans"] - first["scans"]
        assert scans <= 10, f"{scans} scans of the inbox in two seconds for one held file"
    finally:
        h.stop()


# -- a held file that grew before it went quiet ----------------------------------------


def test_a_quiet_file_held_open_after_growing_is_never_reported_stalled(
    daemon_factory: Any,
) -> None:
    """A recording that grew, then went quiet while its program keeps it open, waits
    (open for writing); rescans in between (``nbankctl rescan``, as any other file's
    event or a fresh-scan request causes) must not report it "still changing" past
    stall_after, which would warn and fire a ``stalled`` alert for a file unchanged."""
    h: DaemonHarness = daemon_factory(
        inbox_options={"settle_seconds": 0.5, "stall_after": 1.0, "rescan_every": "1h"}
    )
    h.start()
    try:
        path = h.inbox / "grew.dat"
        src = str(path)
        with open(path, "wb") as writer:
            writer.write(b"first block")
            writer.flush()
            wait_for(
                lambda: "settling" in nbankctl(h, "explain", src).stdout,
                30,
                "the daemon to see the file",
            )
            writer.write(b" second block")  # it grew once: a change the daemon sees
            writer.flush()
            wait_for(
                lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
                30,
                "the daemon to find the file open for writing",
            )
            held_at = _status_inbox(h)["last_scan"]
            seen_stalled: list[str] = []

            def three_stall_periods_scanned() -> bool:
                nbankctl(h, "rescan")
                entry = _status_inbox(h)
                seen_stalled.extend(entry.get("stalled") or [])
                return (entry["last_scan"] or 0) >= held_at + 3.0

            wait_for(three_stall_periods_scanned, 30, "three stall periods of rescans")
        assert seen_stalled == [], f"reported stalled while held open and unchanged: {seen_stalled}"
    finally:
        h.stop()


# -- a folder one of whose files stays open ----------------------------------------------


def _log_codes(h: DaemonHarness, code: str) -> int:
    """How many items (claims) of the daemon's log ended a step with ``code``."""
    import json

    items = set()
    for line in h.log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("code") == code:
            items.add(event.get("item"))
    return len(items)


def test_a_folder_with_a_file_held_open_is_not_claimed_again_and_again(
    daemon_factory: Any,
) -> None:
    """A folder resource one of whose files a program keeps open is held before its
    claim (never claimed, copied up to the open file and put back, over and over); once
    the program closes the file, the folder is deposited whole."""
    from nbankd.archive.opening import create_archive

    h: DaemonHarness = daemon_factory(
        inbox_options={"settle_seconds": 0.3, "directories": "resources", "rescan_every": "1h"}
    )
    h.write_config()
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.inbox.mkdir()
    session = h.inbox / "session1"
    session.mkdir()
    (session / "a.dat").write_bytes(os.urandom(200_000))
    (session / "z.dat").write_bytes(b"recording")
    h.start()
    try:
        with held_open(session / "z.dat"):
            src = str(session)
            wait_for(
                lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
                30,
                "explain to say the folder waits for its open file",
            )
            first = _status_inbox(h)["last_scan"]
            wait_for(
                lambda: (_status_inbox(h)["last_scan"] or 0) >= first + 6.0,
                60,
                "six seconds of the daemon's scans (the held folder asked again)",
            )
            assert _log_codes(h, "open-for-writing") == 0  # never claimed and put back
            assert h.receipts() == [] and (session / "z.dat").exists()
        h.wait_settled(1)
        assert h.archive_files()["session1"].is_dir()
    finally:
        h.stop()
