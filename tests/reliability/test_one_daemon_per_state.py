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

from fixtures.daemon import NBANKD, DaemonHarness, wait_for
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
