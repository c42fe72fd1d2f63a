"""The inotify shell on real folders: who is woken, for what, and clean shutdown.

Negative checks rely on one fact: every watch of an InboxWatcher shares one inotify
instance, whose events arrive in the order they happened. So "write A (must not
wake), then write B (must wake), wait for B's wake, check nothing came for A" is
deterministic: had A produced a wake-up it would have been recorded before B's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.events import EventsLostEvent

from nbankd.names import CANARY_NAME
from nbankd.watch.liveness import kernel_watches
from nbankd.watch.observer import DEAF_SEAM, InboxWatcher
from nbankd.watch.wakeups import Mode, Wakeups

WAIT_S = 60.0  # a bound on a hang; an event takes milliseconds, on a loaded CI seconds

Event = tuple[str, str]


class Recorder:
    """An ``on_change`` that records (inbox id, relpath) and lets tests wait on it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[Event] = []

    def __call__(self, inbox_id: str, relpath: str) -> None:
        with self.cond:
            self.events.append((inbox_id, relpath))
            self.cond.notify_all()

    def wait_for(self, event: Event) -> list[Event]:
        """Waits until ``event`` was recorded; returns everything recorded before it."""
        with self.cond:
            ok = self.cond.wait_for(lambda: event in self.events, WAIT_S)
            assert ok, f"no wake-up {event} within {WAIT_S} s; got {self.events}"
            return self.events[: self.events.index(event)]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watcher(recorder: Recorder) -> Iterator[InboxWatcher]:
    w = InboxWatcher(recorder)
    w.start()
    yield w
    assert w.stop(timeout=WAIT_S)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    (root / ".nbank").mkdir(parents=True)
    (root / "rejected" / "sub").mkdir(parents=True)
    (root / "bird" / "day1").mkdir(parents=True)
    return root


def write(path: Path, data: bytes = b"data") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- waking ----------------------------------------------------------------------------


def test_wakes_for_file_in_nested_folder(watcher: InboxWatcher, recorder: Recorder, inbox: Path):
    """A file written in an existing nested folder wakes the inbox with its relpath."""
    assert watcher.add_inbox("rig3", inbox).mode is Mode.INOTIFY
    write(inbox / "bird" / "day1" / "a.wav")
    recorder.wait_for(("rig3", "bird/day1/a.wav"))


def test_wakes_for_file_in_folder_made_after_start(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path
):
    """Folders created while watching are watched too (mkdir -p, then a file)."""
    watcher.add_inbox("rig3", inbox)
    (inbox / "new" / "deeper" / "still").mkdir(parents=True)
    write(inbox / "new" / "deeper" / "still" / "b.wav")
    recorder.wait_for(("rig3", "new/deeper/still/b.wav"))


@pytest.mark.parametrize(
    "quiet",
    [".nbank/claimed.wav", "rejected/x.wav", "rejected/sub/deep.wav", ".partial", "a.tmp"],
)
def test_excluded_and_ignored_paths_do_not_wake(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path, quiet: str
):
    """Writes in the work and rejected folders, or to ignored names, wake nobody."""
    watcher.add_inbox("rig3", inbox, exclude=[".nbank", "rejected"], ignore=[".*", "*.tmp"])
    write(inbox / quiet)
    write(inbox / "bird" / "real.wav")
    before = recorder.wait_for(("rig3", "bird/real.wav"))
    top = quiet.split("/")[0]
    assert [rel for _, rel in before if rel.split("/")[0] == top] == []


def test_excluded_folder_created_later_wakes_nobody(
    watcher: InboxWatcher, recorder: Recorder, tmp_path: Path
):
    """Writes in a rejected folder made after arming wake nobody."""
    root = tmp_path / "fresh"
    root.mkdir()
    watcher.add_inbox("rig3", root, exclude=[".nbank", "rejected"])
    (root / "rejected").mkdir()
    write(root / "rejected" / "x.wav")
    write(root / "real.wav")
    before = recorder.wait_for(("rig3", "real.wav"))
    assert not any(rel.startswith("rejected") for _, rel in before)


def test_claiming_into_work_folder_wakes_for_the_old_name_only(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path
):
    """Renaming a file into .nbank is a change at its old name, never a work-folder path."""
    write(inbox / "a.wav")
    watcher.add_inbox("rig3", inbox)
    os.rename(inbox / "a.wav", inbox / ".nbank" / "a.wav")
    write(inbox / "bird" / "after.wav")
    before = recorder.wait_for(("rig3", "bird/after.wav"))
    assert ("rig3", "a.wav") in before
    assert not any(rel.startswith(".nbank") for _, rel in recorder.events)


@pytest.fixture
def split(recorder: Recorder) -> Iterator[tuple[InboxWatcher, Recorder]]:
    """A watcher reporting names that left the inbox to a second recorder."""
    removed = Recorder()
    w = InboxWatcher(recorder, on_removed=removed)
    w.start()
    yield w, removed
    assert w.stop(timeout=WAIT_S)


def test_claim_into_work_folder_is_reported_as_a_removal(
    split: tuple[InboxWatcher, Recorder], recorder: Recorder, inbox: Path
):
    """A name moved into .nbank goes to on_removed, not on_change (a claim readies nothing)."""
    watcher, removed = split
    write(inbox / "a.wav")
    watcher.add_inbox("rig3", inbox)
    os.rename(inbox / "a.wav", inbox / ".nbank" / "a.wav")
    removed.wait_for(("rig3", "a.wav"))
    write(inbox / "after.wav")
    before = recorder.wait_for(("rig3", "after.wav"))
    assert ("rig3", "a.wav") not in before


def test_deleted_file_is_reported_as_a_removal(
    split: tuple[InboxWatcher, Recorder], recorder: Recorder, inbox: Path
):
    """Deleting a file from the inbox goes to on_removed, not on_change."""
    watcher, removed = split
    write(inbox / "bird" / "gone.wav")
    watcher.add_inbox("rig3", inbox)
    (inbox / "bird" / "gone.wav").unlink()
    removed.wait_for(("rig3", "bird/gone.wav"))
    write(inbox / "after.wav")
    assert ("rig3", "bird/gone.wav") not in recorder.wait_for(("rig3", "after.wav"))


def test_rename_within_inbox_wakes_for_the_new_name(
    split: tuple[InboxWatcher, Recorder], recorder: Recorder, inbox: Path
):
    """A rename inside the inbox (a writer's temp name to its final one) is a change."""
    watcher, removed = split
    write(inbox / "take.part")
    watcher.add_inbox("rig3", inbox)
    os.rename(inbox / "take.part", inbox / "bird" / "take.wav")
    recorder.wait_for(("rig3", "bird/take.wav"))
    assert removed.events == []


def test_put_back_from_work_folder_wakes_for_the_returned_name(
    split: tuple[InboxWatcher, Recorder], recorder: Recorder, inbox: Path
):
    """A file moved from .nbank back into the inbox (put back) is a change at its name."""
    watcher, removed = split
    write(inbox / ".nbank" / "tok")
    watcher.add_inbox("rig3", inbox)
    os.rename(inbox / ".nbank" / "tok", inbox / "back.wav")
    recorder.wait_for(("rig3", "back.wav"))
    assert removed.events == []


def test_reading_a_file_does_not_wake(watcher: InboxWatcher, recorder: Recorder, inbox: Path):
    """Opening and reading (what the daemon itself does) is not a change."""
    write(inbox / "old.wav")
    watcher.add_inbox("rig3", inbox)
    (inbox / "old.wav").read_bytes()
    write(inbox / "new.wav")
    assert recorder.wait_for(("rig3", "new.wav")) == []


def test_non_recursive_inbox_ignores_nested_changes(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path
):
    """A non-recursive watch wakes for the top level only."""
    watcher.add_inbox("rig3", inbox, recursive=False)
    write(inbox / "bird" / "day1" / "nested.wav")
    write(inbox / "top.wav")
    before = recorder.wait_for(("rig3", "top.wav"))
    assert not any(rel.startswith("bird/") for _, rel in before)


def test_poll_inbox_gets_no_watch(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path, tmp_path: Path
):
    """watch: poll reports POLL and produces no wake-ups; other inboxes still wake."""
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    status = watcher.add_inbox("nfs", nfs, mode="poll")
    assert (status.mode, status.reason, status.degraded) == (Mode.POLL, "watch: poll", False)
    watcher.add_inbox("rig3", inbox)
    write(nfs / "polled.wav")
    write(inbox / "x.wav")
    assert recorder.wait_for(("rig3", "x.wav")) == []


def test_inbox_added_before_start_is_armed_at_start(recorder: Recorder, inbox: Path):
    """Inboxes registered before start() report POLL until started, then INOTIFY."""
    w = InboxWatcher(recorder)
    assert w.add_inbox("rig3", inbox).mode is Mode.POLL
    w.start()
    try:
        assert w.status()["rig3"].mode is Mode.INOTIFY
        write(inbox / "a.wav")
        recorder.wait_for(("rig3", "a.wav"))
    finally:
        assert w.stop(timeout=WAIT_S)


def test_failing_callback_does_not_stop_watching(inbox: Path):
    """An exception in on_change is logged; later changes still wake."""
    rec = Recorder()
    calls = []

    def flaky(inbox_id: str, relpath: str) -> None:
        calls.append(relpath)
        if len(calls) == 1:
            raise RuntimeError("boom")
        rec(inbox_id, relpath)

    w = InboxWatcher(flaky)
    w.start()
    try:
        w.add_inbox("rig3", inbox)
        write(inbox / "first.wav")
        write(inbox / "second.wav")
        rec.wait_for(("rig3", "second.wav"))
        assert w.is_alive()
    finally:
        assert w.stop(timeout=WAIT_S)


# --- the inbox folder itself ---------------------------------------------------------------


def test_deleted_inbox_is_rearmed_when_it_returns(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path
):
    """Deleting the inbox wakes it and drops to POLL; once recreated, rearm() watches again."""
    watcher.add_inbox("rig3", inbox)
    shutil.rmtree(inbox)
    recorder.wait_for(("rig3", ""))
    status = watcher.rearm()["rig3"]
    assert status.mode is Mode.POLL and status.degraded
    assert "inbox folder unavailable" in status.reason
    inbox.mkdir()
    assert watcher.rearm()["rig3"].mode is Mode.INOTIFY
    write(inbox / "back.wav")
    recorder.wait_for(("rig3", "back.wav"))


def test_inbox_replaced_by_new_folder_is_rearmed(
    watcher: InboxWatcher, recorder: Recorder, inbox: Path, tmp_path: Path
):
    """An inbox moved away and replaced by a new folder is watched at its path again."""
    watcher.add_inbox("rig3", inbox)
    inbox.rename(tmp_path / "moved")
    inbox.mkdir()
    assert watcher.rearm()["rig3"].mode is Mode.INOTIFY
    write(tmp_path / "moved" / "old-tree.wav")
    write(inbox / "new-tree.wav")
    assert ("rig3", "old-tree.wav") not in recorder.wait_for(("rig3", "new-tree.wav"))


def test_missing_inbox_is_polled_until_it_exists(
    watcher: InboxWatcher, recorder: Recorder, tmp_path: Path
):
    """A missing inbox folder is reported, not fatal, and armed by rearm() once made."""
    path = tmp_path / "later"
    status = watcher.add_inbox("rig3", path)
    assert status.mode is Mode.POLL and "unavailable" in status.reason
    path.mkdir()
    assert watcher.rearm()["rig3"].mode is Mode.INOTIFY
    write(path / "a.wav")
    recorder.wait_for(("rig3", "a.wav"))


# --- lifecycle ---------------------------------------------------------------------------------


def test_stop_joins_all_threads(recorder: Recorder, inbox: Path):
    """stop() returns True in time, is_alive() turns False and no watcher thread is left."""
    before = set(threading.enumerate())
    w = InboxWatcher(recorder)
    w.start()
    w.add_inbox("rig3", inbox)
    assert w.is_alive()
    assert len(set(threading.enumerate()) - before) >= 3  # observer, emitter, inotify reader
    assert w.stop(timeout=WAIT_S)
    assert not w.is_alive()
    assert set(threading.enumerate()) - before == set()
    assert w.stop() is True  # idempotent
    assert w.status()["rig3"].mode is Mode.POLL


def test_remove_inbox_stops_its_wakeups(watcher: InboxWatcher, recorder: Recorder, inbox: Path):
    """After remove_inbox, changes there wake nobody; other inboxes still do."""
    other = inbox.parent / "other"
    other.mkdir()
    watcher.add_inbox("rig3", inbox)
    watcher.add_inbox("rig4", other)
    watcher.remove_inbox("rig3")
    write(inbox / "a.wav")
    write(other / "b.wav")
    assert recorder.wait_for(("rig4", "b.wav")) == []
    assert "rig3" not in watcher.status()


def test_add_inbox_rejects_unknown_mode(watcher: InboxWatcher, inbox: Path):
    """Only 'auto' and 'poll' are watch modes."""
    with pytest.raises(ValueError, match="auto"):
        watcher.add_inbox("rig3", inbox, mode="inotify")


def test_wakeups_mailbox_collects_and_clears():
    """Wakeups.notify marks inboxes pending; take() returns and clears them."""
    w = Wakeups(keep=2)
    assert not w.wait(0)
    for rel in ("a", "b", "c"):
        w.notify("rig3", rel)
    w.notify("rig4")
    assert w.wait(0)
    assert w.take() == {"rig3": ["a", "b"], "rig4": [""]}
    assert not w.wait(0) and w.take() == {}


# --- inotify limits (ENOSPC), in a user namespace with its own limit -------------------------

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from nbankd.watch.observer import InboxWatcher
from nbankd.watch.wakeups import Wakeups
from nbankd.watch.scan import scan_inbox

root, grow = Path(sys.argv[1]), sys.argv[2] == "grow"
wakes = Wakeups()
w = InboxWatcher(wakes.notify)
w.start()
out = {"added": w.add_inbox("rig3", root).__repr__()}


def woken_until(relpath):
    seen = []
    while relpath not in seen and wakes.wait(60):
        seen += wakes.take().get("rig3", [])
    return seen


if grow:
    (root / "late").mkdir()
    out["woken"] = woken_until("late")  # watchdog has tried to watch it by now
    folders = {}
    scan_inbox(root, recursive=True, folders=folders)
    w.verify_coverage("rig3", folders)
    w.check(time.monotonic() + 100)  # the grace has passed
    out["woken"] += woken_until("")
status = w.status()["rig3"]
out["after"] = {"mode": status.mode.value, "reason": status.reason, "degraded": status.degraded}
status = w.rearm()["rig3"]
out["rearmed"] = {"mode": status.mode.value, "reason": status.reason}
out["alive"] = w.is_alive()
out["stopped"] = w.stop(60)
print(json.dumps(out))
"""


def _run_with_limit(limit: int, root: Path, action: str, sysctl: str = "watches") -> dict:
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 1 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
    )
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"needs user namespaces (unshare -U -r): {probe.stderr!r}")
    setting = f"/proc/sys/user/max_inotify_{sysctl}"
    script = f'echo {limit} > {setting} && exec "$0" -c "$1" "$2" "$3"'
    done = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", script, sys.executable, CHILD, str(root), action],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    *logged, last = done.stdout.splitlines()  # structlog's default output goes to stdout
    return {**json.loads(last), "log": "\n".join(logged)}


@pytest.mark.parametrize(
    ("limit", "folders"), [(0, []), (2, ["a", "b", "c"])], ids=["inbox-folder", "sub-folder"]
)
def test_watch_limit_falls_back_to_poll(tmp_path: Path, limit: int, folders: list[str]):
    """A refused watch (ENOSPC) on the inbox or any sub-folder means POLL, with the reason."""
    for name in folders:
        (tmp_path / name).mkdir()
    out = _run_with_limit(limit, tmp_path, "add")
    assert out["after"]["mode"] == "poll" and out["after"]["degraded"]
    assert "inotify watch limit reached" in out["after"]["reason"]
    assert out["rearmed"]["mode"] == "poll"  # sticky until the inbox is re-added
    assert "inotify refused a watch" in out["log"]
    assert out["alive"] and out["stopped"]


def test_watch_limit_hit_by_new_folder_falls_back_to_poll(tmp_path: Path):
    """A sub-folder the kernel would not watch (seen by the coverage check against the
    kernel's own list) wakes the inbox and degrades it, naming the folder."""
    (tmp_path / "a").mkdir()
    out = _run_with_limit(2, tmp_path, "grow")
    assert "inotify" in out["added"]
    assert "" in out["woken"]
    assert out["after"]["mode"] == "poll" and "limit" in out["after"]["reason"]
    assert "first: late" in out["after"]["reason"]
    assert "inotify does not watch every folder" in out["log"]
    assert out["alive"] and out["stopped"]


def test_no_inotify_instance_means_every_inbox_polls(tmp_path: Path):
    """When inotify_init itself is refused (EMFILE), the inbox polls instead of raising."""
    out = _run_with_limit(0, tmp_path, "add", sysctl="instances")
    assert out["after"]["mode"] == "poll" and out["after"]["degraded"]
    assert "inotify instance limit reached" in out["after"]["reason"]
    assert out["rearmed"]["mode"] == "poll" and out["stopped"]


# --- proof of life: the canary, lost events, coverage --------------------------------------


def test_live_watch_answers_its_canary(watcher: InboxWatcher, inbox: Path):
    """A check writes the canary; its event arrives and the inbox stays INOTIFY."""
    watcher.add_inbox("rig3", inbox)
    sent = time.monotonic()
    watcher.check(sent)
    assert watcher.wait_answered("rig3", WAIT_S)
    watcher.check(sent + 60)  # long past the grace: nothing outstanding to judge
    assert watcher.status()["rig3"].mode is Mode.INOTIFY
    assert (inbox / CANARY_NAME).is_file()


def test_canary_event_wakes_nobody(watcher: InboxWatcher, recorder: Recorder, inbox: Path):
    """The canary's own event is not a change in the inbox."""
    watcher.add_inbox("rig3", inbox)
    watcher.check()
    assert watcher.wait_answered("rig3", WAIT_S)
    write(inbox / "after.wav")
    assert recorder.wait_for(("rig3", "after.wav")) == []


def test_deaf_watch_falls_back_to_polling_and_logs_once(recorder: Recorder, inbox: Path):
    """With every event dropped (the seam), the unanswered canary makes the inbox POLL,
    degraded with the reason, wakes it for a rescan, and is logged once."""
    w = InboxWatcher(recorder, environ={DEAF_SEAM: "1"})
    w.start()
    try:
        w.add_inbox("rig3", inbox, check_every=2.0)
        with capture_logs() as logs:
            sent = time.monotonic()
            w.check(sent)
            assert w.status()["rig3"].mode is Mode.INOTIFY  # not judged before the grace
            w.check(sent + 2.5)
            w.rearm()
            w.check(sent + 5.0)  # the next canary goes unanswered too
            w.check(sent + 7.5)
        status = w.status()["rig3"]
        assert status.mode is Mode.POLL and status.degraded
        assert "no inotify event within 2s of the liveness check" in status.reason
        assert ("rig3", "") in recorder.events
        failed = [e for e in logs if "liveness check" in e["event"]]
        assert len(failed) == 1 and failed[0]["inbox"] == "rig3"
    finally:
        assert w.stop(timeout=WAIT_S)


def test_unwritable_canary_falls_back_then_recovers(watcher: InboxWatcher, inbox: Path):
    """A canary that cannot be written means polling with the reason; once it can be
    written and its event arrives, the inbox is INOTIFY again."""
    (inbox / CANARY_NAME).mkdir()  # a folder in the canary's place
    watcher.add_inbox("rig3", inbox)
    now = time.monotonic()
    watcher.check(now)
    status = watcher.status()["rig3"]
    assert status.mode is Mode.POLL and "cannot write the liveness canary" in status.reason
    (inbox / CANARY_NAME).rmdir()
    watcher.rearm()
    watcher.check(now + 60)
    assert watcher.wait_answered("rig3", WAIT_S)
    assert watcher.status()["rig3"].mode is Mode.INOTIFY


def test_canary_never_writes_through_a_link(watcher: InboxWatcher, inbox: Path, tmp_path: Path):
    """A symbolic link or hard link in the canary's place is replaced, its target untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    (inbox / CANARY_NAME).symlink_to(outside)
    watcher.add_inbox("rig3", inbox)
    now = time.monotonic()
    watcher.check(now)
    assert watcher.wait_answered("rig3", WAIT_S)
    assert not (inbox / CANARY_NAME).is_symlink()
    (inbox / CANARY_NAME).unlink()
    os.link(outside, inbox / CANARY_NAME)
    watcher.check(now + 60)
    assert watcher.wait_answered("rig3", WAIT_S)
    assert outside.read_bytes() == b"precious" and outside.stat().st_nlink == 1


def test_lost_events_wake_the_whole_inbox(watcher: InboxWatcher, recorder: Recorder, inbox: Path):
    """watchdog's EventsLostEvent (a kernel queue overflow) asks for a rescan of the inbox."""
    watcher.add_inbox("rig3", inbox)
    for emitter in list(watcher._observer.emitters):  # type: ignore[union-attr]
        emitter.queue_event(EventsLostEvent(str(inbox), is_directory=True))
    recorder.wait_for(("rig3", ""))
    assert watcher.status()["rig3"].mode is Mode.INOTIFY


def test_kernel_lists_every_folder_of_a_watched_inbox(watcher: InboxWatcher, inbox: Path):
    """The kernel's watch list (/proc/self/fdinfo) names the inbox and its folders."""
    watcher.add_inbox("rig3", inbox)
    watched = kernel_watches()
    assert watched is not None
    for folder in (inbox, inbox / "bird", inbox / "bird" / "day1"):
        assert folder.stat().st_ino in watched


def test_coverage_of_a_fully_watched_inbox_stays_inotify(watcher: InboxWatcher, inbox: Path):
    """Folders that all hold watches leave the inbox INOTIFY after the grace."""
    watcher.add_inbox("rig3", inbox)
    folders = {p.stat().st_ino: str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_dir()}
    watcher.verify_coverage("rig3", {inbox.stat().st_ino: "", **folders})
    watcher.check(time.monotonic() + 60)
    assert watcher.status()["rig3"].mode is Mode.INOTIFY


def test_unwatched_folder_that_vanished_is_not_held_against_the_inbox(
    watcher: InboxWatcher, inbox: Path
):
    """A folder missing from the kernel's list but gone by the re-check is no refusal."""
    watcher.add_inbox("rig3", inbox)
    watcher.verify_coverage("rig3", {999_999_999: "gone-by-now"})
    watcher.check(time.monotonic() + 60)
    assert watcher.status()["rig3"].mode is Mode.INOTIFY


def test_two_writers_of_one_canary_never_fail(inbox: Path):
    """Two daemons on one inbox rewrite the same canary while it is removed under
    them: every write succeeds (a lost create race is tried again, not reported)."""
    from nbankd.watch.liveness import write_canary as _write_canary

    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            for seq in range(1500):
                _write_canary(str(inbox), seq)
        except BaseException as err:
            errors.append(err)

    def remover() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(inbox / CANARY_NAME)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    pest = threading.Thread(target=remover)
    pest.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    pest.join()
    assert errors == []


def test_a_users_file_under_the_canary_name_is_never_touched(watcher: InboxWatcher, inbox: Path):
    """A plain file nbankd did not write, named like the canary, is left byte for byte;
    the check fails with the reason (polling), and passes once the file is moved."""
    mine = inbox / CANARY_NAME
    mine.write_bytes(b"a user's notes, not a canary")
    watcher.add_inbox("rig3", inbox)
    now = time.monotonic()
    watcher.check(now)
    status = watcher.status()["rig3"]
    assert status.mode is Mode.POLL and "a file nbankd did not write" in status.reason
    assert mine.read_bytes() == b"a user's notes, not a canary"
    mine.rename(inbox / "notes.txt")
    watcher.rearm()
    watcher.check(now + 60)
    assert watcher.wait_answered("rig3", WAIT_S)
    assert (inbox / "notes.txt").read_bytes() == b"a user's notes, not a canary"
