"""The inotify shell on real folders: who is woken, for what, and clean shutdown.

Negative checks rely on one fact: every watch of an InboxWatcher shares one inotify
instance, whose events arrive in the order they happened. So "write A (must not
wake), then write B (must wake), wait for B's wake, check nothing came for A" is
deterministic: had A produced a wake-up it would have been recorded before B's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbankd.watch.observer import InboxWatcher, Mode, Wakeups

WAIT_S = 10.0

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


def test_excluded_folder_created_later_is_not_watched(
    watcher: InboxWatcher, recorder: Recorder, tmp_path: Path
):
    """A rejected folder made after arming gets no watch: writes inside wake nobody."""
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
    w = InboxWatcher(recorder)
    w.start()
    w.add_inbox("rig3", inbox)
    assert w.is_alive()
    assert w.stop(timeout=WAIT_S)
    assert not w.is_alive()
    names = {t.name for t in threading.enumerate()}
    assert not names & {"nbankd-watch", "nbankd-inotify", "nbankd-watch-stop"}
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
import json, os, sys
from pathlib import Path
from nbankd.watch.observer import InboxWatcher, Wakeups

root, grow = Path(sys.argv[1]), sys.argv[2] == "grow"
wakes = Wakeups()
w = InboxWatcher(wakes.notify)
w.start()
out = {"added": w.add_inbox("rig3", root).__repr__()}
if grow:
    (root / "late").mkdir()
    seen = {}
    while "" not in seen.get("rig3", []) and wakes.wait(10):
        for k, v in wakes.take().items():
            seen.setdefault(k, []).extend(v)
    out["woken"] = seen.get("rig3", [])
status = w.status()["rig3"]
out["after"] = {"mode": status.mode.value, "reason": status.reason, "degraded": status.degraded}
status = w.rearm()["rig3"]
out["rearmed"] = {"mode": status.mode.value, "reason": status.reason}
out["alive"] = w.is_alive()
out["stopped"] = w.stop(10)
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
        timeout=60,
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
    """A sub-folder created once the limit is reached wakes the inbox and degrades it."""
    (tmp_path / "a").mkdir()
    out = _run_with_limit(2, tmp_path, "grow")
    assert "inotify" in out["added"]
    assert "" in out["woken"]
    assert out["after"]["mode"] == "poll" and "limit" in out["after"]["reason"]
    assert out["alive"] and out["stopped"]


def test_no_inotify_instance_means_every_inbox_polls(tmp_path: Path):
    """When inotify_init itself is refused (EMFILE), start() degrades instead of raising."""
    out = _run_with_limit(0, tmp_path, "add", sysctl="instances")
    assert out["after"]["mode"] == "poll" and out["after"]["degraded"]
    assert "inotify instance limit reached" in out["after"]["reason"]
    assert not out["alive"] and out["stopped"]
