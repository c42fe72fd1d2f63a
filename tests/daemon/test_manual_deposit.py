"""nbankctl deposit with a daemon's configuration: the daemon's lock, and its start
finishing what an interrupted manual deposit left in its state directory."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from fixtures.cli_backends import NBANKCTL
from fixtures.daemon import DaemonHarness, wait_for


def manual_deposit(h: DaemonHarness, *files: str, env: dict[str, str] | None = None) -> Any:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    full.update(env or {})
    return subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype, *files],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_running_daemon_refuses_a_manual_deposit_with_its_configuration(
    daemon_factory: Any,
) -> None:
    """While nbankd runs, `nbankctl -c ITS_CONFIG deposit` names it and touches nothing."""
    h: DaemonHarness = daemon_factory()
    h.start()
    src = h.root / "rec.wav"
    src.write_bytes(b"manual bytes")
    r = manual_deposit(h, str(src))
    h.stop()
    assert r.returncode == 2
    assert "nbankd is running" in r.stderr
    assert src.read_bytes() == b"manual bytes"


def test_the_daemon_start_finishes_an_interrupted_manual_deposit(daemon_factory: Any) -> None:
    """A manual deposit killed after registering is finished when the daemon starts."""
    h: DaemonHarness = daemon_factory()
    h.start()  # creates the archive and the registry
    h.stop()
    folder = h.root / "session"
    folder.mkdir()
    src = folder / "song.wav"
    src.write_bytes(b"interrupted manual deposit")
    crashed = manual_deposit(h, str(src), env={"NBANKD_CRASH_AT": "after-register"})
    assert crashed.returncode == -9, crashed.stderr
    assert not src.exists()
    h.start()
    stored = h.archive / "resources" / "so" / "song.wav"
    wait_for(stored.exists, 30, "the daemon to finish the manual deposit")
    wait_for(lambda: not any((folder / ".nbank").iterdir()), 30, "the claimed input to be released")
    h.stop()
    assert stored.read_bytes() == b"interrupted manual deposit"
