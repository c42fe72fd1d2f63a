"""A reload that failed keeps status degraded until a reload succeeds, whether it was
asked by SIGHUP or by ``nbankctl reload`` over the control socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness


def _ctl(h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    """nbankctl over the daemon's socket (named: the file being edited may not load)."""
    ctl = str(Path(sys.executable).with_name("nbankctl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    command = [ctl, args[0], "--socket", str(h.socket_path), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)


def _status(h: DaemonHarness) -> tuple[int, dict[str, Any]]:
    proc = _ctl(h, "status", "--json")
    return proc.returncode, json.loads(proc.stdout)


def test_a_failed_nbankctl_reload_is_shown_until_a_reload_succeeds(daemon_factory: Any) -> None:
    """A file the loader refuses (the socket's answer is the ConfigError) and a file
    the daemon cannot apply (an inbox that is a file) each make status degraded,
    naming the file and why; fixing the file and reloading makes it healthy again."""
    h: DaemonHarness = daemon_factory()
    h.start()
    good = h.config_path.read_text()
    not_a_folder = h.root / "rig5"
    not_a_folder.write_text("a file where the lab meant a folder")
    seen = []
    for change in (
        lambda cfg: cfg.update(no_such_setting=1),
        lambda cfg: cfg["inboxes"].append(
            {"path": str(not_a_folder), "archive": h.archive_name, "dtype": h.dtype}
        ),
    ):
        h.config_path.write_text(good)
        h.edit_config(change)
        answer = _ctl(h, "reload")
        code, doc = _status(h)
        seen.append((answer.returncode, code, [x for x in doc["degraded"] if "reload" in x]))
    h.config_path.write_text(good)
    answer = _ctl(h, "reload")
    after = _status(h)
    h.stop()
    for returncode, code, lines in seen:
        assert returncode == 2 and code == 1 and len(lines) == 1, seen
        assert lines[0].startswith(f"reload of {h.config_path} failed: "), lines
    assert "no_such_setting" in seen[0][2][0] and "rig5" in seen[1][2][0], seen
    assert answer.returncode == 0 and after == (0, after[1]) and after[1]["healthy"], after
