"""Gaps of ``nbankctl requeue`` a previous session noted.

Findings, fixed since: over the raw protocol a requeue of a relative path was resolved
against the daemon's working directory, and one of a path holding a lone surrogate was
answered with an internal error.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fixtures.daemon import DaemonHarness, raw_request


def _raw_requeue(h: DaemonHarness, path: str) -> dict[str, Any]:
    line = json.dumps({"v": 1, "cmd": "requeue", "args": {"path": path}}).encode() + b"\n"
    return raw_request(h.socket_path, line)


def _rejected_one(h: DaemonHarness) -> None:
    h.start()
    h.drop("bad name.wav", b"a recording the registry refuses by its name")
    h.wait_settled(1)
    assert (h.rejected / "bad name.wav").exists()


def test_a_relative_path_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw requeue request with a relative path is refused as a usage error, never
    resolved against the daemon's working directory (here: a rejected input there)."""
    h: DaemonHarness = daemon_factory()
    _rejected_one(h)
    # the daemon was started from this process's working directory
    relative = os.path.relpath(h.rejected / "bad name.wav", os.getcwd())
    reply = _raw_requeue(h, relative)
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "absolute" in reply["error"]["message"]
    assert (h.rejected / "bad name.wav").exists()


def test_a_path_with_a_lone_surrogate_is_a_usage_error(daemon_factory: Any) -> None:
    """A raw requeue request whose path holds a lone surrogate (no file name can) is
    answered as a usage error, not as the daemon's own failure."""
    h: DaemonHarness = daemon_factory()
    h.start()
    reply = _raw_requeue(h, f"{h.rejected}/a\ud800.wav")
    assert reply["ok"] is False and reply["error"]["code"] == "usage", reply
    assert "surrogate" in reply["error"]["message"]
    assert b"control command failed" not in h.log_path.read_bytes()
