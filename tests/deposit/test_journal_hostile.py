"""Hostile review: the daemon's journal and the rest of its state directory, as an
unlucky lab and a careless admin treat them.

Each test but the guards at the end fails on the code it was written against and
names the behaviour expected once fixed:

- an admin's ``sqlite3`` shell holding the journal's write lock makes ``nbankctl
  status`` time out (exit 3, "daemon unreachable", to monitoring) while the daemon
  runs: the journal's Python lock is held through SQLite's 30 s busy wait, and
  status reads the journal under that lock; the line it gives asks whether the
  filesystem is full;
- any member of the daemon's group (the journal's -shm is group-readable, as the
  deployment guide sets it) can stop every deposit with one shared ``fcntl`` lock;
- ``journal.sqlite3-wal`` removed under a running daemon goes unnoticed: every commit
  after it lives in an unlinked file, and a crash then strands a claimed input in
  ``.nbank/`` under a token, its name lost;
- a journal with a damaged page past its header crashes the start with a traceback
  (exit 1, restarted by systemd) instead of exit 2 naming the damage;
- a receipts log nbankd cannot append to is reported as the archive's problem;
- ``paused.json`` as a FIFO hangs the start before READY; an unreadable one
  silently resumes the inboxes an operator paused (status healthy);
- a journal that is a symlink is refused as "writable by every user" with a chmod
  that cannot help.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import NBANKD, DaemonHarness, nbankctl, wait_for, work_entries
from fixtures.mountns import fill_to_the_last_block

JOURNAL = "journal.sqlite3"
#: SQLite's WAL write lock: byte 120 of the -shm file (WALINDEX_LOCK_OFFSET + 0)
WAL_WRITE_LOCK_BYTE = 120


def _env() -> dict[str, str]:
    """The environment for a daemon started by hand: no test seams, no notify socket."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}


def _status(h: DaemonHarness, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return nbankctl(h, "status", "--json", timeout=timeout)


def _degraded(h: DaemonHarness) -> tuple[int, list[str]]:
    out = _status(h)
    assert out.returncode in (0, 1), f"status: {out.returncode} {out.stderr}"
    return out.returncode, json.loads(out.stdout)["degraded"]


def _logged(h: DaemonHarness, phrase: str) -> bool:
    return phrase in h.log_path.read_text(errors="replace")


class SqliteShell:
    """The ``sqlite3`` command-line shell an admin leaves open on a database."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            ["sqlite3", str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, sql: str) -> str:
        """Runs ``sql`` and returns what the shell printed, once it has run."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{sql}\nSELECT 'nbankd-test-done';\n")
        self.proc.stdin.flush()
        said = ""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"sqlite3 ended: {said}")
            said += line
            if line.strip() == "nbankd-test-done":
                return said

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def shell_on_journal(daemon_factory: Any) -> Any:
    """A running daemon (one file deposited) and an admin's sqlite3 shell holding the
    journal's write lock (``BEGIN IMMEDIATE``), with a new file dropped behind it."""
    if not any(os.access(os.path.join(p, "sqlite3"), os.X_OK) for p in os.get_exec_path()):
        pytest.skip("needs the sqlite3 shell")
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("before.wav", os.urandom(5000))
    h.wait_settled(1)
    shell = SqliteShell(h.state_dir / JOURNAL)
    # a daemon that keeps others out of its journal (its fix, perhaps) refuses the shell
    locked = "locked" not in shell.run("BEGIN IMMEDIATE;")
    h.drop("behind.wav", os.urandom(5000))
    try:
        yield h, shell, locked
    finally:
        shell.close()


# --- an admin's sqlite3 shell on the journal ------------------------------------------


def test_status_answers_while_an_admin_shell_holds_the_journal_write_lock(
    shell_on_journal: Any,
) -> None:
    """While an admin's sqlite3 shell holds the journal's write lock, nbankctl status
    keeps answering (degraded, naming the journal), never exit 3 "did not answer",
    which monitoring reads as the daemon down; once released, the waiting file lands."""
    h, shell, locked = shell_on_journal
    if not locked:  # the shell could not lock the journal: nothing waits on it
        h.wait_settled(2, timeout=90)
        return
    wait_for(
        lambda: _logged(h, "journal not writable"), 60, "the daemon to find the journal locked"
    )
    started = time.monotonic()
    answers = []
    while time.monotonic() - started < 35:  # a whole 30 s busy wait and the rescan after
        out = _status(h)
        assert out.returncode in (0, 1), (
            f"status exit {out.returncode} after {len(answers)} answers while the journal "
            f"was locked by another process: {out.stderr.strip()}"
        )
        answers.append(out.returncode)
    shell.run("ROLLBACK;")
    shell.close()
    h.wait_settled(2, timeout=90)
    assert sorted(r["id"] for r in h.receipts()) == ["before", "behind"]


def test_a_journal_locked_by_another_process_is_not_called_a_full_filesystem(
    shell_on_journal: Any,
) -> None:
    """The status line for a journal another process holds locked says so (a lock,
    another process), and does not send the admin to look for a full filesystem."""
    h, shell, locked = shell_on_journal
    if not locked:  # the shell could not lock the journal: nothing to report
        return
    wait_for(
        lambda: _logged(h, "journal not writable"), 60, "the daemon to find the journal locked"
    )

    def journal_line() -> str | None:
        out = _status(h)
        if out.returncode not in (0, 1):  # not answering (see the test above): ask again
            return None
        lines = [d for d in json.loads(out.stdout)["degraded"] if "journal" in d]
        return lines[0] if lines else None

    line = wait_for(journal_line, 90, "status to name the journal")
    shell.run("ROLLBACK;")
    assert "filesystem full" not in line, line
    assert "lock" in line, line


def test_a_member_of_nbankds_group_cannot_stop_deposits_through_the_journal(
    daemon_factory: Any, unpriv_user: Any, other_user: Any
) -> None:
    """A user who may only read the journal (a member of nbankd's group: the journal and
    its -shm are 0640, as the deployment guide's UMask=0027 makes them) cannot stop
    deposits: a shared lock on the -shm file's write-lock byte must not freeze them."""
    h: DaemonHarness = daemon_factory(user=unpriv_user)
    h.start()
    h.drop("before.wav", os.urandom(5000))
    h.wait_settled(1)
    shm = h.state_dir / (JOURNAL + "-shm")
    journal = (h.state_dir / JOURNAL).stat()
    assert journal.st_gid == unpriv_user.gid
    holder = (  # a daemon that keeps its -shm to itself (its fix, perhaps) refuses it
        "import fcntl, os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        f"    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, {WAL_WRITE_LOCK_BYTE})\n"
        "    print('held', flush=True)\n"
        "except OSError as err:\n"
        "    print('refused', err, flush=True)\n"
        "sys.stdin.read()\n"
    )
    # other_user, with nbankd's group as a supplementary group: read access only
    argv = [
        "setpriv",
        f"--reuid={other_user.uid}",
        f"--regid={other_user.gid}",
        f"--groups={unpriv_user.gid}",
        "--inh-caps=-all",
        "--",
        sys.executable,
        "-c",
        holder,
        str(shm),
    ]
    reader = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None
        said = reader.stdout.readline()
        assert said.startswith(("held", "refused")), reader.stderr.read() if reader.stderr else ""
        writes = subprocess.run(  # a reader indeed: it cannot open the journal for writing
            [*argv[:6], sys.executable, "-c", f"open({str(h.state_dir / JOURNAL)!r}, 'r+b')"],
            capture_output=True,
            timeout=60,
        )
        assert writes.returncode != 0
        h.drop("during.wav", os.urandom(5000))
        try:
            h.wait_settled(2, timeout=60)
        except AssertionError:
            pytest.fail(
                "a read-only member of nbankd's group holding a shared lock on the "
                "journal's -shm stopped every deposit"
            )
    finally:
        reader.kill()
        reader.wait()


# --- the journal's files removed or damaged -------------------------------------------


def test_journal_wal_removed_under_a_running_daemon_never_strands_a_claimed_input(
    daemon_factory: Any,
) -> None:
    """journal.sqlite3-wal removed while nbankd runs (an admin freeing space or clearing
    "leftovers"), then a crash: no input is left in .nbank/ under a token the journal
    does not know; the daemon notices the removal (stops claiming, or makes its commits
    durable again), and the input is deposited once after the restart."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"NBANKD_CRASH_AT": "after-claim-rename"})
    wal = h.state_dir / (JOURNAL + "-wal")
    assert wal.exists()
    wal.unlink()
    h.drop("late.wav", os.urandom(5000))

    def crashed_or_told() -> bool:
        assert h.proc is not None
        out = _status(h)
        if h.proc.poll() is not None:
            return True
        if out.returncode != 1:
            return False
        degraded = json.loads(out.stdout)["degraded"]
        return any("wal" in d.lower() or "journal" in d for d in degraded)

    wait_for(crashed_or_told, 60, "the crash at the claim, or status naming the journal")
    if h.proc is not None and h.proc.poll() is None:
        h.kill9()
    h.start()

    def outcome() -> tuple[list[str], list[str]] | None:
        out = _status(h)
        doc = json.loads(out.stdout)
        ids = [r["id"] for r in h.receipts()]
        unowned = doc["inboxes"][0]["unowned_work_files"]
        return (ids, unowned) if ids or unowned else None

    ids, unowned = wait_for(outcome, 60, "late.wav deposited, or reported stranded")
    assert unowned == [], f"claimed input stranded in .nbank/ under a token: {unowned}"
    assert ids == ["late"]


def test_a_journal_with_a_damaged_page_exits_2_naming_it_damaged(daemon_factory: Any) -> None:
    """A journal whose header is sound but whose items table has a damaged page (a bad
    sector, a torn copy): nbankd exits 2 saying the journal is damaged (restore it),
    without a traceback, as for a journal that is not SQLite at all, never exit 1 from
    an uncaught error that systemd restarts for ever."""
    h: DaemonHarness = daemon_factory()
    h.start()
    for name in ("a.wav", "b.wav", "c.wav"):
        h.drop(name, os.urandom(3000))
    h.wait_settled(3)
    h.stop()
    path = h.state_dir / JOURNAL
    db = sqlite3.connect(path)
    try:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'items'").fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (h.state_dir / (JOURNAL + suffix)).unlink()
    assert root > 1
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(os.urandom(page_size))
    out = subprocess.run(
        [NBANKD, "-c", str(h.config_path)], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 2, out.stderr[-3000:]
    assert str(path) in out.stderr


# --- receipts, paused.json ------------------------------------------------------------


def test_a_receipts_log_nbankd_cannot_append_to_is_not_called_the_archives_problem(
    daemon_factory: Any,
) -> None:
    """A receipts log the daemon cannot append to (made immutable, owned by another
    user by a careless restore): status names the state directory's receipts as what
    the input waits on, not the archive (which is fine and which the admin would go
    and check)."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("a.wav", os.urandom(2000))
    h.wait_settled(1)
    log = next((h.state_dir / "receipts").glob("*.jsonl"))
    if subprocess.run(["chattr", "+i", str(log)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i on the filesystem of tmp_path")
    try:
        h.drop("b.wav", os.urandom(2000))

        def receipts_line() -> str | None:
            code, degraded = _degraded(h)
            lines = [d for d in degraded if str(log.parent) in d]
            return lines[0] if code == 1 and lines else None

        line = wait_for(receipts_line, 60, "status to name the receipts log")
    finally:
        subprocess.run(["chattr", "-i", str(log)], check=True)
    assert not line.startswith("archive "), line
    h.wait_settled(2, timeout=90)
    assert sorted(r["id"] for r in h.receipts()) == ["a", "b"]


def test_paused_json_that_is_a_fifo_does_not_hang_the_start(daemon_factory: Any) -> None:
    """state_dir/paused.json that is a FIFO (or any file that never ends): nbankd
    starts (treating it as unreadable) or refuses with a message; it never blocks
    before READY for ever, where systemd's start timeout kills it with no word why."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    os.mkfifo(h.state_dir / "paused.json", 0o640)
    try:
        h.start(timeout=20)
    except AssertionError:
        assert h.proc is not None
        if h.proc.poll() is None:
            pytest.fail("nbankd hangs at start reading state_dir/paused.json (a FIFO)")
        assert "paused.json" in h.log_path.read_text(errors="replace")


def test_an_unreadable_paused_json_does_not_silently_resume_paused_inboxes(
    daemon_factory: Any,
) -> None:
    """An inbox paused with nbankctl pause, then paused.json damaged (a hand edit, a
    torn restore): after a restart the inbox stays paused, or status is degraded
    naming paused.json; never "healthy" with the operator's pause quietly dropped."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert nbankctl(h, "pause", str(h.inbox)).returncode == 0
    h.stop()
    paused = h.state_dir / "paused.json"
    text = paused.read_text()
    assert str(h.inbox) in text
    paused.write_text(text[: len(text) // 2])
    h.start()
    out = _status(h)
    doc = json.loads(out.stdout)
    still_paused = doc["inboxes"][0]["paused"]
    told = any("paused.json" in d for d in doc["degraded"])
    assert still_paused or (out.returncode == 1 and told), doc["degraded"]


def test_a_journal_that_is_a_link_is_refused_as_a_link(daemon_factory: Any) -> None:
    """state_dir/journal.sqlite3 made a symlink (an admin moving it to a faster disk):
    refused (exit 2) with a message that says it is a link, not that it "is writable by
    every user" with a chmod that changes the link's target and cannot help."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.stop()
    journal = h.state_dir / JOURNAL
    moved = h.root / "fast" / JOURNAL
    moved.parent.mkdir(mode=0o700)
    journal.rename(moved)
    moved.chmod(0o600)
    journal.symlink_to(moved)
    out = subprocess.run(
        [NBANKD, "-c", str(h.config_path)], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert out.returncode == 2, out.stderr
    assert "writable by every user" not in out.stderr, out.stderr
    assert "link" in out.stderr, out.stderr


# --- guards (pass today): what held up ------------------------------------------------


def test_guard_state_dir_full_at_a_rounds_commit_leaves_each_input_in_one_place(
    daemon_factory: Any, mount_ns: Any
) -> None:
    """Guard: state_dir (a small tmpfs) filled while a round of small files is held
    between its fsyncs and its commit: the commit fails, status names the journal,
    each input is whole in its inbox or work folder, and once space returns (no
    restart) every input lands exactly once."""
    h: DaemonHarness = daemon_factory(wrap_argv=mount_ns.enter)
    mnt = h.root / "statemnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "4m")
    h.state_dir = mnt / "state"
    h.write_config()
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "after-round-fsyncs", "NBANKD_PAUSE_UNTIL": str(go)})
    view = mount_ns.view(mnt)
    h.state_dir = view / "state"
    payloads = {f"r{i:02d}.dat": os.urandom(3000 + i) for i in range(12)}
    for name, data in payloads.items():
        h.drop(name, data)
    reached = Path(str(go) + ".reached")
    wait_for(reached.exists, 60, "a round to reach its commit")
    filler = view / "filler"
    fill_to_the_last_block(filler)
    go.touch()

    def journal_told() -> bool:
        code, degraded = _degraded(h)
        return code == 1 and any("journal" in d for d in degraded)

    wait_for(journal_told, 60, "status to name the journal")
    assert h.proc is not None and h.proc.poll() is None
    work = h.inbox / ".nbank"
    for name, data in payloads.items():
        places = [p for p in [h.inbox / name] if p.exists()]
        places += [p for p in work_entries(work) if p.is_file() and p.read_bytes() == data]
        stored = [p for p in h.archive_files().values() if p.is_file() and p.read_bytes() == data]
        assert len(places) <= 1 and (places or stored), (name, places, stored)
        for p in places:
            assert p.read_bytes() == data
    filler.unlink()
    h.wait_settled(len(payloads), timeout=120)
    ids = [r["id"] for r in h.receipts()]
    assert sorted(ids) == sorted(Path(n).stem for n in payloads)
    stored = {p.name: p.read_bytes() for p in h.archive_files().values() if p.is_file()}
    assert stored == payloads
    assert h.reasons() == []
    wait_for(lambda: work_entries(work) == [], 30, "the work folder to empty")
    h.stop()


def test_guard_registry_write_lock_held_by_a_shell_waits_and_status_answers(
    daemon_factory: Any,
) -> None:
    """Guard: an admin's sqlite3 shell holding the embedded registry's write lock: the
    registration waits (registry-unavailable, status answers at once and says so), and
    the file lands once the shell lets go."""
    if not any(os.access(os.path.join(p, "sqlite3"), os.X_OK) for p in os.get_exec_path()):
        pytest.skip("needs the sqlite3 shell")
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop("before.wav", os.urandom(5000))
    h.wait_settled(1)
    shell = SqliteShell(h.state_dir / "registry.sqlite3")
    try:
        shell.run("BEGIN IMMEDIATE;")
        h.drop("behind.wav", os.urandom(5000))

        def told() -> bool:
            started = time.monotonic()
            code, degraded = _degraded(h)
            # a fresh nbankctl each time, on a loaded machine; blocked on the lock, it
            # would take the registry's 30 s busy timeout
            assert time.monotonic() - started < 15, "status was slow to answer"
            return code == 1 and any("database is locked" in d for d in degraded)

        wait_for(told, 90, "status to name the locked registry")
        shell.run("ROLLBACK;")
    finally:
        shell.close()
    h.wait_settled(2, timeout=90)
    assert sorted(r["id"] for r in h.receipts()) == ["before", "behind"]
    h.stop()
