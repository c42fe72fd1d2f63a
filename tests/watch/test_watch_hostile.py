"""Hostile review of the watcher and the settle tracker: an unlucky lab and an inbox
writer against the scan, the settle rules, the inotify shell and the daemon's scan
loop that feeds the deposit lane.

Every test not labelled "guard" fails on the code it was written against and names
the behaviour expected once fixed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for
from fixtures.holders import holding
from nbankd.watch.liveness import write_canary

# --- the system clock stepping under a running daemon ---------------------------------
#
# The real nbankd runs under a wrapper that only shifts what ``time.time()`` answers
# (the wall clock, as an NTP step, a rig without a battery-backed clock syncing at
# boot, or an administrator's ``date -s`` shift it); ``time.monotonic()`` is left
# alone. On SIGUSR1 the wrapper adds the seconds written in ``step`` to the wall
# clock and writes ``stepped``. Nothing of nbankd is replaced.

_CLOCK_WRAPPER = r"""
import os, runpy, signal, sys, time

here = os.path.dirname(os.path.abspath(__file__))
_real = time.time
_shift = [0.0]

def _wall():
    return _real() + _shift[0]

def _step(signum, frame):
    with open(os.path.join(here, "step")) as f:
        _shift[0] += float(f.read())
    with open(os.path.join(here, "stepped.tmp"), "w") as f:
        f.write(repr(_shift[0]))
    os.rename(os.path.join(here, "stepped.tmp"), os.path.join(here, "stepped"))

time.time = _wall
signal.signal(signal.SIGUSR1, _step)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _clock_daemon(daemon_factory: Any, **inbox_options: Any) -> DaemonHarness:
    h: DaemonHarness = daemon_factory(inbox_options=inbox_options)
    wrapper = h.root / "clock" / "wrapper.py"
    wrapper.parent.mkdir()
    wrapper.write_text(_CLOCK_WRAPPER)
    h.wrap_argv = [sys.executable, str(wrapper)]
    return h


def _step_clock(h: DaemonHarness, seconds: float) -> None:
    """Steps the daemon's wall clock by ``seconds`` and waits until it has."""
    folder = h.root / "clock"
    (folder / "stepped").unlink(missing_ok=True)
    (folder / "step").write_text(repr(seconds))
    assert h.proc is not None
    h.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: (folder / "stepped").exists(), 60, "the daemon's clock to step")


def _queue(h: DaemonHarness) -> dict[str, Any]:
    """``nbankctl queue --json`` as root: answered from a scan made for the request."""
    proc = nbankctl(h, "queue", "--json", timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def _pending(doc: dict[str, Any], relpath: str) -> dict[str, Any] | None:
    for entry in doc.get("pending", []):
        if entry.get("relpath") == relpath:
            return entry
    return None


def _journaled(doc: dict[str, Any], relpath: str) -> bool:
    return any(i.get("relpath") == relpath for i in doc.get("items", []))


def test_a_wall_clock_step_forward_never_makes_a_file_written_a_moment_ago_ready(
    daemon_factory: Any,
) -> None:
    """Settling is measured on a monotonic clock: a file whose writer paused a moment ago
    (settle_seconds 600) is still settling after the wall clock steps a day forward."""
    # 600 s: room for a loaded CI's nbankctl calls and clock step, far below the day
    h = _clock_daemon(daemon_factory, settle_seconds=600, rescan_every="1h")
    h.start()
    try:
        path = h.inbox / "rec.wav"
        # a rig writing in place and closing the file between blocks (no program holds
        # it open): one block now; had it been taken, the next would start a new file
        with open(path, "wb") as f:
            f.write(b"first half of the recording ")
        wait_for(lambda: _pending(_queue(h), "rec.wav"), 60, "the daemon to see rec.wav")
        _step_clock(h, 86400.0)
        doc = _queue(h)  # a fresh scan, made after the step
        journaled = _journaled(doc, "rec.wav") or any(
            r.get("source", "").endswith("rec.wav") for r in h.receipts()
        )
        entry = _pending(doc, "rec.wav")
        assert not journaled and entry is not None and entry["state"] == "settling", (
            "a file last written under a second ago was taken for finished after the "
            f"wall clock stepped: {entry}, items {doc.get('items')}"
        )
    finally:
        h.stop()


def test_a_wall_clock_step_back_does_not_silence_a_polled_inbox(daemon_factory: Any) -> None:
    """After the wall clock steps an hour back, a polled inbox (rescan_every 1s) is
    still scanned every second: a file dropped then is deposited within seconds."""
    h = _clock_daemon(daemon_factory, settle_seconds=0.3, rescan_every="1s", watch="poll")
    h.start()
    try:
        h.drop("before.wav", b"dropped before the step")
        h.wait_settled(1, timeout=60)
        _step_clock(h, -3600.0)
        h.drop("after.wav", b"dropped after the step")
        try:
            h.wait_settled(2, timeout=60)
        except AssertionError:
            raise AssertionError(
                "a file dropped after the wall clock stepped back an hour was not "
                "deposited within 60 s (rescan_every 1s): the polled inbox went silent"
            ) from None
    finally:
        h.stop()


# --- an input that changes between the scan that found it settled and its claim ---------


def test_an_input_appended_to_after_it_settled_is_not_claimed_until_it_settles_again(
    daemon_factory: Any,
) -> None:
    """An input written to after the scan found it settled, before its claim (the lane
    busy with earlier inputs: here held at after-journal-add), is not deposited until it
    has stayed unchanged for settle_seconds again."""
    settle = 3.0
    h: DaemonHarness = daemon_factory(
        inbox_options={"settle_seconds": settle, "rescan_every": "1h"}
    )
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-journal-add", "NBANKD_PAUSE_UNTIL": str(go)})
    try:
        path = h.inbox / "rec.wav"
        with open(path, "wb") as f:  # the rig writes a block, closes the file, pauses
            f.write(b"block 1 of the recording\n")
        wait_for(lambda: Path(f"{go}.reached").exists(), 60, "rec.wav to be journaled")
        with open(path, "ab") as f:  # ... and goes on: the recording was not finished
            f.write(b"block 2 of the recording\n")
        appended = time.monotonic()
        go.touch()
        h.wait_settled(1, timeout=60)
        quiet = time.monotonic() - appended
        [receipt] = h.receipts()
        assert quiet >= settle, (
            f"rec.wav was deposited {quiet:.2f}s after its last write (settle_seconds "
            f"{settle:g}): the claim took an input that changed after it settled; "
            f"receipt {receipt.get('size')} bytes"
        )
    finally:
        h.stop()


# --- the inbox folder itself swapped for a link --------------------------------------


def _inotify_watched_inodes(pid: int) -> set[int]:
    """Inode numbers of every folder process ``pid``'s inotify instances watch, as the
    kernel lists them in /proc/PID/fdinfo."""
    found: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("inotify wd:"):
                fields = dict(w.split(":", 1) for w in line.split()[1:] if ":" in w)
                found.add(int(fields["ino"], 16))
    return found


def test_an_inbox_folder_swapped_for_a_link_is_neither_scanned_nor_watched_through_it(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The inbox folder replaced by a link (by anyone who may write its parent folder)
    is never followed (guarantee 7): the daemon neither lists what the link points to
    (its names would show in ``queue``) nor puts inotify watches on its folders."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.3, "rescan_every": "1h"})
    h.start()
    try:
        private = tmp_path / "someone-elses"  # e.g. / or another user's home
        for sub in ("mail", "projects/secret"):
            (private / sub).mkdir(parents=True)
            (private / sub / "plans.txt").write_bytes(b"not for the archive")
        folders = {os.stat(p).st_ino for p in [private, *private.rglob("*")] if p.is_dir()}
        os.rename(h.inbox, tmp_path / "inbox.moved-away")
        os.symlink(private, h.inbox)
        first = _queue(h)  # a scan made after the swap
        _queue(h)  # and another: the first one's re-arming of the watch is done by then
        listed = sorted(e["relpath"] for e in first.get("pending", []))
        watched = _inotify_watched_inodes(h.proc.pid) & folders if h.proc else set()
        assert (listed, len(watched)) == ([], 0), (
            f"through the link the daemon listed {listed} and watches {len(watched)} of "
            f"the {len(folders)} folders it points to"
        )
    finally:
        h.stop()


def test_the_liveness_canary_is_never_written_into_a_folder_put_in_the_inboxs_place(
    tmp_path: Path,
) -> None:
    """The watch's canary goes only into the inbox folder the daemon checked: with the
    inbox's path swapped for a link to another folder, nothing is written there."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    st = os.stat(inbox)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(inbox, tmp_path / "moved-away")
    os.symlink(elsewhere, inbox)
    with pytest.raises(FileNotFoundError):
        write_canary(str(inbox), 1, (st.st_dev, st.st_ino))
    assert list(elsewhere.iterdir()) == []


# --- guards: attacks that held up (pass on the code reviewed) ---------------------------


def _inbox_doc(h: DaemonHarness) -> dict[str, Any]:
    proc = nbankctl(h, "status", "--json", timeout=60)
    [inbox] = json.loads(proc.stdout)["inboxes"]
    return inbox


def test_guard_watch_limit_reached_inside_the_inbox_falls_back_to_polling(
    daemon_factory: Any,
) -> None:
    """Guard: with fs.inotify.max_user_watches exhausted (lowered in a user namespace),
    new folders left unwatched put the inbox in the poll fallback, and a file written
    into one of them later is deposited (rescans an hour apart)."""
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 1 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"needs user namespaces (unshare -U -r): {probe.stderr!r}")
    options = {
        "settle_seconds": 0.3,
        "rescan_every": "1h",
        "watch_check_every": "1s",
        "fallback_poll_every": "1s",
    }
    h: DaemonHarness = daemon_factory(inbox_options=options)
    limit = 'echo 6 > /proc/sys/user/max_inotify_watches && exec "$@"'
    h.wrap_argv = ["unshare", "-U", "-r", "sh", "-c", limit, "sh"]
    h.start()
    try:
        for i in range(8):  # the inbox, .nbank and rejected hold 3 of the 6 watches
            (h.inbox / f"session{i}").mkdir()
        wait_for(lambda: _inbox_doc(h)["watch_mode"] == "poll", 60, "the poll fallback")
        assert "inotify" in (_inbox_doc(h)["watch_problem"] or "")
        h.drop("session7/late.wav", b"written into a folder inotify does not watch")
        h.wait_settled(1, timeout=60)
        assert [r["id"] for r in h.receipts()] == ["late"]
    finally:
        h.stop()


_HOLD_IN_OWN_MOUNT_NS = (
    "import sys; f = open(sys.argv[1], 'ab'); f.write(b' more'); f.flush();"
    " print('open', flush=True); sys.stdin.read(); f.write(b' end'); f.close()"
)


def test_guard_a_quiet_writer_in_another_mount_namespace_is_waited_for(
    daemon_factory: Any,
) -> None:
    """Guard: a program in its own mount namespace holding the recording open, quiet
    for longer than settle_seconds, keeps it in the inbox; it is deposited whole once
    closed."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.3, "rescan_every": "1h"})
    h.start()
    try:
        path = h.inbox / "held.wav"
        path.write_bytes(b"start")
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-c"]
        with holding([*argv, _HOLD_IN_OWN_MOUNT_NS, str(path)]):
            wait_for(lambda: "held.wav" in _inbox_doc(h)["open_for_writing"], 60, "held.wav held")
            assert h.receipts() == [] and path.exists()
        h.wait_settled(1, timeout=60)
        [receipt] = h.receipts()
        assert Path(receipt["archive_path"]).read_bytes() == b"start more end"
    finally:
        h.stop()


_MMAP_WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)  # only the shared writable mapping is left
m[0:5] = b"half:"
print("open", flush=True)
sys.stdin.read()
m[5:10] = b"whole"
m.close()
"""


def test_guard_a_file_written_through_a_shared_mapping_is_waited_for(
    daemon_factory: Any,
) -> None:
    """Guard: a file whose size never changes, written through a shared writable mapping
    whose descriptor was closed, stays in the inbox while mapped and is deposited whole."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.3, "rescan_every": "1h"})
    h.start()
    try:
        path = h.inbox / "mapped.wav"
        with open(path, "wb") as f:
            f.truncate(4096)
        with holding([sys.executable, "-c", _MMAP_WRITER, str(path)]):
            wait_for(
                lambda: "mapped.wav" in _inbox_doc(h)["open_for_writing"], 60, "mapped.wav held"
            )
            assert h.receipts() == []
        h.wait_settled(1, timeout=60)
        [receipt] = h.receipts()
        assert Path(receipt["archive_path"]).read_bytes()[:10] == b"half:whole"
    finally:
        h.stop()


def test_guard_a_name_with_a_newline_and_undecodable_bytes_is_woken_for(
    daemon_factory: Any,
) -> None:
    """Guard: a file named with a newline and a byte that is not UTF-8, dropped with
    rescans an hour apart, is found by its inotify wake-up and deposited."""
    h: DaemonHarness = daemon_factory(inbox_options={"rescan_every": "1h", "auto_id": True})
    h.start()
    try:
        h.drop(b"take\n2\xff.wav", b"an oddly named recording")
        h.wait_settled(1, timeout=60)
        [receipt] = h.receipts()
        assert receipt["outcome"] == "deposited"
        assert not (h.inbox / os.fsdecode(b"take\n2\xff.wav")).exists()
    finally:
        h.stop()
