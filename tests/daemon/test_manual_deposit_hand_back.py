"""A deposit handed to the daemon whose refused file cannot simply go back: what
``nbankctl deposit`` tells the user."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fixtures.cli_backends import NBANKCTL, json_stream
from fixtures.daemon import DaemonHarness, wait_for
from fixtures.sshfs import Sshfs


def manual_deposit(h: DaemonHarness, *files: str) -> subprocess.CompletedProcess[str]:
    """``nbankctl -c CONFIG deposit ARCHIVE -d DTYPE -j FILES`` (handed to the daemon)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    argv = [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype]
    return subprocess.run(
        [*argv, "-j", *files],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.xfail(
    strict=True,
    reason="SSHFS gives a moved file a new inode number: the hand-back's identity check "
    "(never move another file) refuses it, and the file stays in nbank-rejected/",
)
def test_a_refused_file_on_sshfs_whose_place_is_free_goes_back_in_place(
    sshfs: Sshfs, daemon_factory: Any
) -> None:
    """A duplicate handed to the daemon from a folder on SSHFS, its name free, is put
    back where it was (as on a local disk), not kept in nbank-rejected/ as "its place
    was taken"."""
    mount = sshfs.mount("rig")
    h: DaemonHarness = daemon_factory()
    h.start()
    try:
        folder = mount.mountpoint / "session"
        folder.mkdir()
        (folder / "first.wav").write_bytes(b"same bytes")
        assert manual_deposit(h, str(folder / "first.wav")).returncode == 0
        again = folder / "again.wav"
        again.write_bytes(b"same bytes")
        r = manual_deposit(h, str(again))
    finally:
        h.stop()
    assert r.returncode == 1, r.stderr
    [line] = json_stream(r.stdout)
    assert line["source"] == str(again) and "first" in line["error"], r.stderr
    assert "kept_at" not in line, r.stderr
    assert again.read_bytes() == b"same bytes"


def test_a_hand_back_that_fails_still_reports_every_file_handed_to_the_daemon(
    daemon_factory: Any,
) -> None:
    """When the daemon cannot move a refused file back (here: its folder made immutable
    while it was being refused; on NFS, renameat2 says EINVAL), `nbankctl deposit` still
    reports the refusal and where the file is, not the daemon's internal error."""
    h: DaemonHarness = daemon_factory()
    release = h.root / "release"
    h.start(env={"NBANKD_PAUSE_AT": "after-reject-move", "NBANKD_PAUSE_UNTIL": str(release)})
    folder = h.root / "session"
    folder.mkdir()
    try:
        (folder / "first.wav").write_bytes(b"same bytes")
        assert manual_deposit(h, str(folder / "first.wav")).returncode == 0
        again = folder / "again.wav"
        again.write_bytes(b"same bytes")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
        argv = [NBANKCTL, "-c", str(h.config_path), "deposit", str(h.archive), "-d", h.dtype]
        proc = subprocess.Popen(
            [*argv, "-j", str(again)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            held = folder / "nbank-rejected" / "again.wav"
            wait_for(lambda: held.exists(), 60, "the refused file to be moved aside")
            subprocess.run(["chattr", "+i", str(folder)], check=True)
            release.touch()
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
        h.stop()
    assert proc.returncode == 1, err
    lines = json_stream(out)
    assert len(lines) == 1, err
    [line] = lines
    assert line["source"] == str(again) and "first" in line["error"], err
    assert Path(line["kept_at"]).read_bytes() == b"same bytes"
