"""Hostile review: the daemon's start, stop and state directory (what a lab gets wrong).

Each test but the guards at the end fails on the code it was written against and
names the behaviour expected once fixed:

- the state directory's lock lives in a file anyone with write access to the folder
  can delete, and a second daemon then runs on the same journal;
- a state directory other users can write (or that another user owns) is used as it
  is, so a local user can plant a journal entry that makes a root daemon deposit, and
  so remove, a file of root's they cannot even read;
- SIGTERM waits for a worker stuck on a hung registry (the pool's threads are joined
  at exit), not the few seconds ``shutdown`` and the unit file promise;
- a full state directory at start is reported as an unreadable journal, with the
  advice to move the journal aside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import NBANKD, DaemonHarness, wait_for
from fixtures.mountns import fill_to_the_last_block


def _env() -> dict[str, str]:
    """The environment for a daemon started by hand: no test seams, no notify socket."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}


def _run_nbankd(
    config: Path, *, wrap: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(wrap or []), NBANKD, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


@pytest.fixture
def shared_top() -> Iterator[Path]:
    """A folder under /tmp that other users can traverse (pytest's tmp_path is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="nbankd-svc-hostile-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


# --- one daemon per state directory --------------------------------------------------


def test_second_daemon_refused_after_the_lock_file_is_removed(daemon_factory: Any) -> None:
    """With nbankd.lock deleted under a running daemon (an admin clearing a "stale lock",
    a cleaner), a second daemon on the same state_dir still exits 2 naming the first,
    and never resumes the first one's item in flight."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_RAISE_AT": "after-stage"})  # the item stays in flight, retried
    h.drop("inflight.wav", os.urandom(100_000))
    wait_for(
        lambda: "after-stage" in h.log_path.read_text(errors="replace"),
        what="the first daemon's item to wait after staging",
    )
    (h.state_dir / "nbankd.lock").unlink()
    # the same configuration but its own control socket (a second config file, or the
    # same unit started twice under two names)
    cfg = yaml.safe_load(h.config_path.read_text())
    cfg["control_socket"] = str(h.root / "second.sock")
    second_config = h.root / "second.yaml"
    second_config.write_text(yaml.safe_dump(cfg))
    second_log = h.root / "second.log"
    with open(second_log, "wb") as out:
        second = subprocess.Popen(
            [NBANKD, "-c", str(second_config)], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    try:
        wait_for(
            lambda: second.poll() is not None or "resuming" in second_log.read_text(),
            30,
            "the second daemon to exit or to resume the first one's item",
        )
        said = second_log.read_text(errors="replace")
        assert "resuming" not in said, "the second daemon drives the first one's item"
        assert second.returncode == 2, said[-2000:]
        assert f"pid {h.proc.pid}" in said  # type: ignore[union-attr]
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=30)
        h.stop()


# --- who may write the state directory ------------------------------------------------

# Run as the unprivileged user: puts a journal of its own making in place of the
# daemon's (a folder the user may write: renaming the root-owned file is allowed),
# holding one manual deposit of a root-owned file the user cannot even read.
_PLANT = r"""
import json, os, sys, time
from pathlib import Path
from nbankd.deposit.journal import Journal
from nbankd.deposit.manual import PREFIX
state, folder, archive, archive_path, registry, dtype = sys.argv[1:7]
journal = Path(state) / "journal.sqlite3"
for suffix in ("", "-wal", "-shm"):
    p = Path(str(journal) + suffix)
    if p.exists():
        os.rename(p, Path(state) / ("old-" + p.name))
key = PREFIX + json.dumps(
    {"folder": folder, "archive": archive, "archive_path": archive_path,
     "registry": registry, "dtype": dtype, "metadata": {}, "auto_id": None,
     "zip_directories": False, "file_metadata": "skip"},
    sort_keys=True, separators=(",", ":"))
now = time.time()
Journal(journal).add(token="ab" * 16, inbox=key, relpath=b"secret.txt", kind="file",
    archive=archive, archive_path=archive_path, placement="copy", verify=1,
    created=now, updated=now)
"""


@pytest.mark.parametrize("misconfig", ["world-writable", "owned-by-a-user"])
def test_state_dir_other_users_can_write_is_refused(
    daemon_factory: Any, unpriv_user: Any, shared_top: Path, misconfig: str
) -> None:
    """A root daemon refuses (exit 2, naming it) a state_dir that other users can write
    or that another user owns, so a journal entry a user planted there never makes it
    move a file of root's out of a folder the user cannot read."""
    h: DaemonHarness = daemon_factory()
    h.state_dir = shared_top / "state"
    h.state_dir.mkdir()
    h.start()
    h.stop()  # a stop (an upgrade, a reboot): the user's moment
    if misconfig == "world-writable":
        h.state_dir.chmod(0o777)  # "fixing" a permission error the quick way
    else:
        os.chown(h.state_dir, unpriv_user.uid, unpriv_user.gid)  # a lab member's folder
        h.state_dir.chmod(0o750)
    private = shared_top / "private"
    private.mkdir(mode=0o700)  # root's, unreadable by the user
    secret = private / "secret.txt"
    secret.write_bytes(b"root's own bytes")
    planted = unpriv_user.python(
        _PLANT,
        str(h.state_dir),
        str(private),
        h.archive_name,
        str(h.archive),
        h.registry_address,
        h.dtype,
    )
    assert planted.returncode == 0, planted.stderr
    log = h.root / "restart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [NBANKD, "-c", str(h.config_path)], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    try:
        wait_for(
            lambda: proc.poll() is not None or not secret.exists(),
            60,
            "nbankd to refuse the state directory, or to take root's file",
        )
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    assert secret.exists() and secret.read_bytes() == b"root's own bytes", (
        "root's file was deposited (and removed from its folder) on a journal entry a user planted"
    )
    assert proc.returncode == 2
    assert str(h.state_dir) in log.read_text(errors="replace")


# --- stopping ---------------------------------------------------------------------------


def test_stop_with_a_hung_registry_exits_within_the_grace(
    daemon_factory: Any, django_registry: Any, fault_proxy: Any
) -> None:
    """SIGTERM while a worker waits on a registry that never answers: nbankd exits within
    its 5 s grace (plus margin), leaving the item to the journal, as Daemon.shutdown and
    the unit file ("exits within a few seconds", TimeoutStopSec=30s) say."""
    h: DaemonHarness = daemon_factory(registry=fault_proxy.url, auth=django_registry.auth)
    h.dtype = django_registry.add_datatype(content_type="application/octet-stream")
    h.start()
    fault_proxy.inject("delay", delay=300)  # every answer held for five minutes
    h.drop("hung.dat", os.urandom(5000))
    wait_for(lambda: fault_proxy.count("delay") >= 1, 30, "the registry to hold a request")
    assert h.proc is not None
    started = time.monotonic()
    h.proc.send_signal(signal.SIGTERM)
    try:
        h.proc.wait(timeout=120)
    finally:
        fault_proxy.clear()
    took = time.monotonic() - started
    assert took < 15, f"nbankd took {took:.1f} s to exit after SIGTERM"
    assert h.receipts() == []  # nothing claimed done: the item resumes at the next start


# --- a full state directory at start -----------------------------------------------------


def test_full_state_dir_at_start_is_not_called_an_unreadable_journal(
    daemon_factory: Any, mount_ns: Any
) -> None:
    """A sound journal on a full state_dir at start: nbankd says the filesystem is full,
    and never tells the operator to restore a backup or move the journal aside (which
    would strand every claimed input in .nbank/)."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter)
    mnt = h.root / "statemnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "4m")
    h.state_dir = mnt / "state"
    h.write_config()
    h.start()
    view = mount_ns.view(mnt)
    h.state_dir = view / "state"  # read through the namespace from here on
    h.drop("kept.wav", os.urandom(5000))
    h.wait_settled(1)
    h.stop()
    # no -wal or -shm beside the journal: as after the guide's restore, or after any
    # program that opened the journal closed it
    checkpoint = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "db.execute('PRAGMA wal_checkpoint(TRUNCATE)'); db.close()"
    )
    subprocess.run(
        [*mount_ns.enter, sys.executable, "-c", checkpoint, str(mnt / "state" / "journal.sqlite3")],
        check=True,
        timeout=60,
    )
    assert not (view / "state" / "journal.sqlite3-wal").exists()
    fill_to_the_last_block(view / "filler")
    out = _run_nbankd(h.config_path, wrap=mount_ns.enter)
    said = out.stderr.lower()
    assert out.returncode != 0
    assert "move the journal aside" not in said, out.stderr
    assert "restore state_dir from its backup" not in said, out.stderr
    assert "space" in said or "full" in said, out.stderr


# --- guards (pass today): what held up ------------------------------------------------


def test_guard_journal_from_a_newer_release_exits_2_naming_the_upgrade(
    daemon_factory: Any,
) -> None:
    """Guard: a journal of a newer schema exits 2 with one line (no traceback)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    db = sqlite3.connect(h.state_dir / "journal.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    out = _run_nbankd(h.config_path)
    assert out.returncode == 2, out.stderr
    assert "newer than this nbankd understands" in out.stderr
    assert "Traceback" not in out.stderr


def test_guard_garbage_journal_exits_2_and_is_left_as_it_was(daemon_factory: Any) -> None:
    """Guard: a journal that is not SQLite exits 2 and is not rewritten."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (h.state_dir / ("journal.sqlite3" + suffix)).unlink()
    junk = os.urandom(8192)
    (h.state_dir / "journal.sqlite3").write_bytes(junk)
    out = _run_nbankd(h.config_path)
    assert out.returncode == 2, out.stderr
    assert "cannot be read" in out.stderr
    assert (h.state_dir / "journal.sqlite3").read_bytes() == junk


def test_guard_lock_file_replaced_by_a_link_is_refused(daemon_factory: Any) -> None:
    """Guard: nbankd.lock swapped for a symlink is refused (exit 2), its target untouched."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    target = h.root / "not-the-lock"
    target.write_bytes(b"keep me")
    lock = h.state_dir / "nbankd.lock"
    lock.unlink()
    lock.symlink_to(target)
    out = _run_nbankd(h.config_path)
    assert out.returncode == 2, out.stderr
    assert target.read_bytes() == b"keep me"


def test_guard_console_log_escapes_a_forged_line_in_a_file_name() -> None:
    """Guard: a file name with a newline and an ANSI escape stays on one console line."""
    import io

    from nbankd.service.logs import configure_logging, get_logger, reset_logging

    out = io.StringIO()
    try:
        configure_logging("console", "info", stream=out)
        get_logger().info("step done", source="x\n2026-01-01 [error    ] forged\x1b[2J")
    finally:
        reset_logging()
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text
