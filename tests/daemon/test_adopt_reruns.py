"""What follows an adoption that skipped entries (the list kept in state_dir, a plain
start, a re-run), what adoption makes of a folder resource holding a link, and what
ends the hold of a late archive. Real daemon subprocesses, real archives and embedded
registries; polling with deadlines, never sleeps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.adoption import plant
from fixtures.daemon import NBANKD, DaemonHarness, more_scans, status_json, wait_for

Factory = Callable[..., DaemonHarness]
SKIPPED = "adoption-skipped.json"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}


def two_archives(daemon_factory: Factory) -> tuple[DaemonHarness, Path]:
    """A daemon with a second archive "mirror" (an inbox deposits into it), both made
    by a first start, then its state_dir lost."""
    h = daemon_factory()
    h.write_config()
    mirror = h.root / "mirror"

    def add(cfg: dict[str, Any]) -> None:
        cfg["archives"].append({"path": str(mirror), "name": "mirror", "create": True})
        cfg["inboxes"].append(
            {"path": str(h.root / "inbox2"), "archive": "mirror", "dtype": h.dtype}
        )

    h.edit_config(add)
    h.start()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.socket_path.unlink(missing_ok=True)
    return h, mirror


def run_nbankd(h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    """``nbankd ARGS`` until it exits or serves its control socket (then SIGTERM)."""
    h.socket_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [NBANKD, "-c", str(h.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        wait_for(lambda: proc.poll() is not None or h.socket_path.exists(), 180, "nbankd to settle")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def registered(h: DaemonHarness) -> dict[str, str | None]:
    db = sqlite3.connect(f"file:{h.state_dir / 'registry.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT name, sha1 FROM resource"))
    finally:
        db.close()


def conflicted(daemon_factory: Factory) -> tuple[DaemonHarness, Path]:
    """Adopted over two archives, the mirror's copy of aa01 a conflict; returns the
    harness and that copy."""
    h, mirror = two_archives(daemon_factory)
    plant(h.archive, "aa01.wav", b"the lab's recording")
    copy = plant(mirror, "aa01.wav", b"a corrupted copy")
    first = run_nbankd(h, "--adopt-archives")
    assert first.returncode == 0 and "conflict" in first.stdout, first.stdout[-3000:]
    return h, copy


def test_a_plain_start_runs_after_an_adoption_that_skipped_entries(
    daemon_factory: Factory,
) -> None:
    """An adoption that ended with a conflict keeps its list in state_dir and says how
    to adopt it later; a plain start runs meanwhile (no babysitting)."""
    h, _copy = conflicted(daemon_factory)
    kept = json.loads((h.state_dir / SKIPPED).read_text())
    assert kept["skipped"] == 1 and "conflict" in kept["first"][0]
    plain = run_nbankd(h)
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert "--adopt-archives" in plain.stdout  # the reminder


def test_a_rerun_with_nothing_left_to_skip_forgets_the_list(daemon_factory: Factory) -> None:
    """Once a re-run adopts what was skipped, the list goes, and a further
    --adopt-archives over the filled registry is refused again (exit 2)."""
    h, copy = conflicted(daemon_factory)
    copy.chmod(0o644)
    copy.write_bytes(b"the lab's recording")
    again = run_nbankd(h, "--adopt-archives")
    assert again.returncode == 0, again.stdout[-3000:]
    assert not (h.state_dir / SKIPPED).exists()
    refused = run_nbankd(h, "--adopt-archives")
    assert refused.returncode == 2 and "not empty" in refused.stdout, refused.stdout[-3000:]


def test_a_folder_resource_holding_a_link_is_not_adopted(daemon_factory: Factory) -> None:
    """A stored folder holding a link to a file outside the archive is skipped and
    named, never registered with a hash of the file the link points to."""
    h = daemon_factory()
    h.start()
    h.stop()
    shutil.rmtree(h.state_dir)
    h.socket_path.unlink(missing_ok=True)
    plant(h.archive, "aa01.wav", b"one")
    outside = h.root / "private.txt"
    outside.write_bytes(b"someone's private file")
    folder = h.archive / "resources" / "aa" / "aa02"
    folder.mkdir()
    (folder / "a.dat").write_bytes(b"a")
    (folder / "b.dat").symlink_to(outside)
    done = run_nbankd(h, "--adopt-archives")
    assert done.returncode == 0, done.stdout[-3000:]
    assert registered(h) == {"aa01": sha1(b"one")}
    assert "aa02" in done.stdout and "symbolic link" in done.stdout


def test_a_held_archive_is_released_only_by_a_record_of_what_it_held(
    daemon_factory: Factory,
) -> None:
    """A late archive held over a lost state_dir: a record of some other resource
    located there keeps the hold; a record of its first stored resource ends it, and
    the waiting input is deposited."""
    h = daemon_factory()
    h.start()
    h.drop("kept01.wav", b"stored before state_dir was lost")
    h.wait_settled(1)
    h.stop()
    shutil.rmtree(h.state_dir)
    away = h.root / "not-mounted-yet"
    h.archive.rename(away)
    h.edit_config(lambda c: c["archives"][0].update(create=False))
    h.start()
    away.rename(h.archive)
    h.drop("new01.wav", b"recorded after the restart")

    def held() -> bool:
        return any("--adopt-archives" in d for d in status_json(h)[1]["degraded"])

    wait_for(held, 60, "deposits into the late archive to be held")
    with h.open_registry() as reg:  # what a restored registry holds: the archive, too
        if reg.get_archive(h.archive_name) is None:
            reg.add_archive(h.archive_name, "neurobank", str(h.archive))
        reg.add_resource(name="other01", dtype=h.dtype, archive=h.archive_name, sha1=sha1(b"other"))
    more_scans(h, 3)
    assert held() and h.receipt("new01") is None
    with h.open_registry() as reg:
        reg.add_resource(
            name="kept01",
            dtype=h.dtype,
            archive=h.archive_name,
            sha1=sha1(b"stored before state_dir was lost"),
        )
    wait_for(lambda: h.receipt("new01") is not None, 60, "new01 to be deposited")
    # status learns of the lifted hold at the inbox's next scan, maybe after the deposit
    wait_for(lambda: not held(), 30, "status to stop telling the hold")
    h.stop()
