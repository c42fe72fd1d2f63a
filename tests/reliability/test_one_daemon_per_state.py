"""One daemon per state directory (hostile round B): a second ``nbankd`` started by
mistake with the same configuration exits 2 at once, naming the first one's pid,
before it opens the journal: it never resumes, stages or publishes anything.

The first daemon holds an item in flight (an injected fault after staging makes it
wait), which is exactly what the second one's journal recovery used to drive.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from fixtures.daemon import NBANKD, DaemonHarness, wait_for, work_entries
from reliability import figures


def _tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-1 of every file under ``folder`` (the lock file aside)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "nbankd.lock":
            out[str(path.relative_to(folder))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def test_second_daemon_on_the_same_state_dir_touches_nothing(daemon_factory: Any) -> None:
    """With an item of the first daemon in flight, a second daemon on the same state
    directory exits 2 naming the first's pid, logs no resumption, and leaves the
    state directory and the archive's staging area byte for byte as they were."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_RAISE_AT": "after-stage"})  # the item waits after staging
    h.drop("inflight.wav", os.urandom(100_000))
    wait_for(
        lambda: "after-stage" in h.log_path.read_text(errors="replace"),
        what="the first daemon's item to wait after staging",
    )
    h.proc.send_signal(19)  # SIGSTOP: the first daemon writes nothing while we look
    try:
        state_before = _tree_digest(h.state_dir)
        staging_before = _tree_digest(h.archive / "staging")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}
        second = subprocess.run(
            [NBANKD, "-c", str(h.config_path)], capture_output=True, text=True, timeout=60, env=env
        )
        state_after = _tree_digest(h.state_dir)
        staging_after = _tree_digest(h.archive / "staging")
    finally:
        h.proc.send_signal(18)  # SIGCONT
    changed = {
        k
        for k in state_before.keys() | state_after.keys()
        if state_before.get(k) != state_after.get(k)
    }
    staged_changed = {
        k
        for k in staging_before.keys() | staging_after.keys()
        if staging_before.get(k) != staging_after.get(k)
    }
    figures.record(
        "one_daemon_per_state",
        "second_daemon_same_state_dir",
        {
            "exit": second.returncode,
            "state_files_changed": len(changed),
            "staged_files_changed": len(staged_changed),
        },
    )
    pid = h.proc.pid  # type: ignore[union-attr]
    assert second.returncode == 2, second.stderr
    assert f"in use by another nbankd (pid {pid})" in second.stderr
    assert "resuming" not in second.stdout
    assert changed == set() and staged_changed == set()
    assert staging_before  # the first daemon's staged copy was there to be driven
    h.stop()


def test_state_dir_removed_while_running_stops_deposits(daemon_factory: Any) -> None:
    """``rm -rf state_dir`` under a running daemon: status turns degraded naming it and
    a file dropped afterwards is left in the inbox, untouched, not claimed."""
    import shutil

    from fixtures.daemon import status_json
    from nbankd.control.client import call

    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("before.wav", b"deposited while the state was there")
    h.wait_settled(1)
    shutil.rmtree(h.state_dir)

    def degraded() -> list[str]:
        # the test's own tmp_path holds "state_dir" too: match the line's start
        return [d for d in status_json(h)[1]["degraded"] if d.startswith("state_dir ")]

    [line] = wait_for(degraded, 30, "status to name the removed state directory")
    assert str(h.state_dir) in line and "restore state_dir from its backup" in line
    src = h.drop("after.wav", b"must stay where it is")

    def ready_but_left() -> bool:  # each queue request is answered from a fresh scan
        pending = call(h.socket_path, "queue")["pending"]
        return any(p["relpath"] == "after.wav" and p["state"] == "ready" for p in pending)

    wait_for(ready_but_left, 30, "a scan to find after.wav ready and leave it alone")
    assert src.read_bytes() == b"must stay where it is"
    assert not (h.inbox / ".nbank").exists() or work_entries(h.inbox / ".nbank") == []
    h.stop()


def test_embedded_registry_replaced_while_running_stops_deposits(daemon_factory: Any) -> None:
    """The embedded registry's file replaced under a running daemon (a restore of it
    alone, say): status turns degraded naming it, and nothing more is claimed."""
    import shutil

    from fixtures.daemon import status_json

    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("before.wav", b"deposited while the registry was there")
    h.wait_settled(1)
    db = h.state_dir / "registry.sqlite3"
    shutil.copy2(db, h.root / "registry-copy")
    os.replace(h.root / "registry-copy", db)

    def degraded() -> list[str]:
        return [d for d in status_json(h)[1]["degraded"] if "state_dir" in d]

    [line] = wait_for(degraded, 30, "status to name the replaced registry")
    assert "registry.sqlite3 was replaced" in line and "restore state_dir" in line
    h.stop()


def test_lost_state_dir_refuses_an_empty_registry_then_adopts(daemon_factory: Any) -> None:
    """After state_dir is lost, nbankd will not start a new empty registry over an
    archive that holds resources (exit 2 naming both ways out); with --adopt-archives
    it registers every stored file with its SHA-1, marked adopted, and runs on."""
    import shutil

    h: DaemonHarness = daemon_factory()
    h.start()
    data = os.urandom(5000)
    h.drop("kept01.wav", data)
    h.wait_settled(1)
    h.stop()
    shutil.rmtree(h.state_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}
    refused = subprocess.run(
        [NBANKD, "-c", str(h.config_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 2, refused.stderr
    assert "is empty, but archive(s)" in refused.stderr and str(h.archive) in refused.stderr
    assert "restore state_dir from its backup" in refused.stderr
    assert "--adopt-archives" in refused.stderr
    h.start(args=["--adopt-archives"])
    with h.open_registry() as reg:
        record = reg.get_resource("kept01")
    assert record is not None and record.sha1 == hashlib.sha1(data).hexdigest()
    assert "adopted" in record.metadata and record.locations == (h.archive_name,)
    h.drop("new01.wav", b"after the adoption")
    wait_for(lambda: any(r["id"] == "new01" for r in h.receipts()), 30, "a new deposit")
    h.stop()
