"""Second edges of "an input still open for writing is not taken for finished": a
folder input deeper than the asker's walk can recurse, how soon a held file is asked
about again when other scans come, and what status says of it while the inbox is
paused."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from fixtures.holders import held_open

#: seconds: past HELD_RECHECK (5 s), when a held file would be asked about again
HELD_RECHECK_PLUS = 6.0


def _nest(top: Path, depth: int) -> None:
    """``top`` with ``depth`` folders one inside the other and a file at the bottom
    (made from descriptors: the whole path may be longer than PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        f = os.open("f.dat", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"bottom")
        os.close(f)
    finally:
        os.close(fd)


def test_a_very_deep_folder_input_does_not_stop_the_daemon(daemon_factory: Any) -> None:
    """A folder resource 600 folders deep (its identity and the scan walk it fine) must
    not end the daemon when it is asked about open writers: the other inputs of the
    inbox are still deposited and the daemon keeps running."""
    from nbankd.archive.opening import create_archive

    h: DaemonHarness = daemon_factory(
        inbox_options={"settle_seconds": 0.3, "directories": "resources", "rescan_every": "1h"}
    )
    h.write_config()
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.inbox.mkdir()
    _nest(h.inbox / "deep", 600)
    h.drop("plain.dat", b"an ordinary recording")
    h.start()
    try:
        wait_for(
            lambda: h.receipts() or h.proc is None or h.proc.poll() is not None,
            60,
            "a receipt or the daemon's end",
        )
        assert h.proc is not None and h.proc.poll() is None, (
            "the daemon ended: "
            + h.log_path.read_text(errors="replace")[-1500:].replace("\\n", "\n")
        )
        assert [r["source"].rsplit("/", 1)[-1] for r in h.receipts()] == ["plain.dat"]
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.stop()


def _inbox(h: DaemonHarness) -> dict[str, Any]:
    _, doc = status_json(h)
    [entry] = doc["inboxes"]
    return entry


def test_a_held_file_is_not_asked_again_sooner_than_the_floor_when_other_scans_come(
    daemon_factory: Any,
) -> None:
    """HELD_RECHECK (5 s) is the floor between two questions about a held input: a scan
    brought by something else (here ``nbankctl rescan``; another file's writes bring
    one every 0.2 s) must not ask about it again one second after it was held."""
    from nbankd.daemon.intents import HELD_RECHECK

    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.3, "rescan_every": "1h"})
    h.start()
    try:
        path = h.inbox / "held.dat"
        path.write_bytes(b"recording")
        src = str(path)
        with held_open(path):
            wait_for(
                lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
                30,
                "the daemon to find the file open for writing",
            )
            held_at = _inbox(h)["last_scan"]
        nbankctl(h, "rescan")  # closed now; a scan for another reason, inside the floor
        wait_for(lambda: h.receipts(), 30, "the file's deposit")
        [receipt] = h.receipts()
        db = sqlite3.connect(f"file:{h.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            [(created,)] = db.execute(
                "SELECT created FROM items WHERE token = ?", (receipt["token"],)
            ).fetchall()
        finally:
            db.close()
        assert created >= held_at + HELD_RECHECK, (
            f"asked again {created - held_at:.2f} s after it was held "
            f"(floor {HELD_RECHECK} s): every scan re-asks a held input"
        )
    finally:
        h.stop()


def test_a_paused_inbox_does_not_keep_reporting_a_closed_file_open_for_writing(
    daemon_factory: Any,
) -> None:
    """A file held open, then the inbox paused and the file closed: status (and the
    nbankd_inbox_open_for_writing_files gauge built from it) must not go on saying a
    program holds it open, scan after scan, for as long as the pause lasts."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.3, "rescan_every": "1h"})
    h.start()
    try:
        path = h.inbox / "held.dat"
        path.write_bytes(b"recording")
        src = str(path)
        with held_open(path):
            wait_for(
                lambda: "open for writing" in nbankctl(h, "explain", src).stdout,
                30,
                "the daemon to find the file open for writing",
            )
            assert nbankctl(h, "pause").returncode == 0
        closed_at = _inbox(h)["last_scan"]
        wait_for(
            lambda: (
                nbankctl(h, "rescan").returncode == 0
                and (_inbox(h)["last_scan"] or 0) >= closed_at + HELD_RECHECK_PLUS
            ),
            60,
            "scans past the held file's next question",
        )
        entry = _inbox(h)
        assert entry["paused"]
        assert entry["open_for_writing"] == [], (
            f"closed {entry['last_scan'] - closed_at:.1f} s ago, still reported open for "
            f"writing: {entry['open_for_writing']}"
        )
    finally:
        h.stop()
