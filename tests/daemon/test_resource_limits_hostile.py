"""Regression tests (from a hostile review): the daemon when the process runs out of
descriptors or threads.

The real ``nbankd`` runs; its limits are changed while it runs, from outside, the way
a lab meets them (a burst of work against systemd's default ``LimitNOFILE=1024``, a
unit's ``TasksMax=`` reached): the open-file limit with ``prlimit --pid`` (the soft
limit only, the hard one is left as it was, so it can be raised back), the number of
threads with a private cgroup of the ``pids`` controller that only the daemon is moved
into (removed at the end). Nothing of nbankd is replaced.

What they keep:

- ``accept()`` failing with EMFILE is logged once and retried after a pause, never a
  busy loop flooding the log; ``nbankctl status`` still answers (the control server
  accepts into its spare descriptor), degraded, naming the open-file limit;
- a descriptor shortage is told as the process's open-file limit with what to do,
  never as an unavailable archive or an inbox folder "replaced" or "tampered with";
- the alert check that cannot list a rejected folder for want of descriptors logs the
  open-file limit once, never a traceback at each check; ``paused.json`` unread for
  want of descriptors is told as the limit, never as a file that cannot be read;
- a thread that cannot be started while the daemon runs (deposits, a SIGHUP reload)
  never ends the daemon: inputs wait or the reload fails, and all resumes;
- a control connection whose serving thread cannot be started is answered naming the
  thread limit, not closed without a word;
- started under too low an open-file limit, nbankd exits naming it (no traceback, no
  advice to move the inbox's work folder away), or becomes ready with a control
  server that answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for
from fixtures.processes import TAKE_EVERY_DESCRIPTOR
from fixtures.webhooks import Hook

PIDS_ROOT = Path("/sys/fs/cgroup/pids")

# what a message naming the process's open-file limit (and how to raise it) looks like
NAMES_FD_LIMIT = re.compile(
    r"LimitNOFILE|RLIMIT_NOFILE|ulimit -n|open[- ]file(s)? limit|descriptor limit", re.I
)


# -- helpers ---------------------------------------------------------------------------


def _open_fds(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def _lowest_free_fd(pid: int) -> int:
    fds = _open_fds(pid)
    return next(n for n in range(len(fds) + 1) if n not in fds)


def _set_soft_nofile(pid: int, soft: int) -> None:
    """Sets the daemon's soft RLIMIT_NOFILE (the hard limit kept, so it can be raised)."""
    hard = int(
        subprocess.run(
            ["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings", "-o", "HARD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
    )
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _started(daemon_factory: Any, **inbox_options: Any) -> DaemonHarness:
    """A daemon with one input deposited (its threads and descriptors at rest)."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.2, **inbox_options})
    h.start()
    h.drop("warm.wav", b"warm-up recording " * 64)
    h.wait_settled(1)
    return h


class PidsCgroup:
    """A private cgroup of the pids controller (cgroup v1 or v2) holding the daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def hold(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def current(self) -> int:
        return int((self.path / "pids.current").read_text())

    def limit(self, value: int | str) -> None:
        (self.path / "pids.max").write_text(str(value))

    def refused(self) -> int:
        """How many forks or thread creations the limit has refused so far."""
        for line in (self.path / "pids.events").read_text().splitlines():
            key, _, count = line.partition(" ")
            if key == "max":
                return int(count)
        return 0


@pytest.fixture
def pids_cgroup() -> Iterator[PidsCgroup]:
    root = PIDS_ROOT if (PIDS_ROOT / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    path = root / f"nbankd-limits-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as err:
        pytest.skip(f"needs a writable pids cgroup under {root}: {err}")
    if not (path / "pids.max").exists():
        path.rmdir()
        pytest.skip(f"no pids controller in {root}")
    group = PidsCgroup(path)
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.limit("max")
        # the daemon_factory fixture kills what is left after this one; wait for it to go
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                path.rmdir()
                break
            except OSError:
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.05)


# -- descriptors (RLIMIT_NOFILE) -------------------------------------------------------


def test_accept_failing_for_want_of_descriptors_does_not_spin_flooding_the_log(
    daemon_factory: Any,
) -> None:
    """With no descriptor left, a waiting control connection makes at most a few log
    lines and little CPU, not a busy loop of "control socket accept failed"."""
    h = _started(daemon_factory, rescan_every="1h")
    assert h.proc is not None
    pid = h.proc.pid
    # descriptors 0..4 (standard streams, the state folder and its lock) stay open
    # for the daemon's life: below this soft limit every new descriptor is refused
    _set_soft_nofile(pid, min(5, _lowest_free_fd(pid)))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        log_before = h.log_path.stat().st_size
        cpu_before = _cpu_ticks(pid)
        client.connect(str(h.socket_path))  # queued by the kernel: the listener is readable
        start = time.monotonic()
        lines = 0
        while time.monotonic() - start < 3.0:  # a rate is measured over a window
            with open(h.log_path, "rb") as f:
                f.seek(log_before)
                lines = f.read().count(b"control socket accept failed")
            if lines > 1000:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        cpu = (_cpu_ticks(pid) - cpu_before) / os.sysconf("SC_CLK_TCK")
        grown = h.log_path.stat().st_size - log_before
    finally:
        client.close()
        _set_soft_nofile(pid, 1024)
    assert lines <= 20, (
        f"{lines} 'control socket accept failed' lines in {elapsed:.1f} s "
        f"({grown} bytes of log, {cpu:.1f} s of CPU)"
    )
    assert cpu < 0.5 * elapsed, f"the daemon used {cpu:.1f} s of CPU in {elapsed:.1f} s"


def test_status_answers_degraded_naming_the_open_file_limit_when_descriptors_run_out(
    daemon_factory: Any,
) -> None:
    """With every descriptor in use, nbankctl status still answers, degraded, naming the
    open-file limit; once the limit is raised the waiting input is deposited by itself."""
    h = _started(daemon_factory)
    assert h.proc is not None
    pid = h.proc.pid
    _set_soft_nofile(pid, min(5, _lowest_free_fd(pid)))
    try:
        data = os.urandom(4000)
        h.drop("during.wav", data)
        proc = nbankctl(h, "status", "--json", timeout=60)
    finally:
        _set_soft_nofile(pid, 1024)
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr.strip()}"
    degraded = json.loads(proc.stdout)["degraded"]
    assert any(NAMES_FD_LIMIT.search(line) for line in degraded), degraded
    h.wait_settled(2, timeout=30)
    assert h.archive_files()["during.wav"].read_bytes() == data
    assert nbankctl(h, "status", timeout=60).returncode == 0


def test_a_descriptor_shortage_is_not_blamed_on_the_archive_or_the_inbox_folder(
    daemon_factory: Any,
) -> None:
    """With only a few descriptors free, status and the waiting input's error name the
    process's open-file limit, never an unavailable archive or a replaced inbox folder."""
    h = _started(daemon_factory)
    assert h.proc is not None
    pid = h.proc.pid
    _set_soft_nofile(pid, _lowest_free_fd(pid) + 6)  # scans work, staging does not
    try:
        data = os.urandom(4000)
        h.drop("short.wav", data)
        row = wait_for(
            lambda: next(
                (r for r in h.journal_rows() if r["relpath"] == "short.wav" and r["code"]), None
            ),
            30,
            "the input to wait after an error",
        )
        proc = nbankctl(h, "status", "--json", timeout=60)
    finally:
        _set_soft_nofile(pid, 1024)
    assert proc.returncode == 1, proc.stderr
    degraded = json.loads(proc.stdout)["degraded"]
    blamed = [
        line
        for line in degraded
        if re.search(r"archive-unavailable|replaced since|tampered|give nbankd's user", line)
    ]
    assert not blamed, blamed
    assert row["code"] != "archive-unavailable", row
    assert any(NAMES_FD_LIMIT.search(line) for line in degraded), degraded
    h.wait_settled(2, timeout=30)
    assert h.archive_files()["short.wav"].read_bytes() == data


def test_paused_json_unread_for_want_of_descriptors_is_told_as_the_open_file_limit(
    daemon_factory: Any,
) -> None:
    """With no descriptor left, status tells paused.json unread as nbankd's open-file
    limit, never as a file that "cannot be read" whose pauses are lost."""
    h = _started(daemon_factory)
    assert h.proc is not None
    assert nbankctl(h, "pause").returncode == 0  # state_dir/paused.json written
    pid = h.proc.pid
    _set_soft_nofile(pid, min(5, _lowest_free_fd(pid)))
    try:
        proc = nbankctl(h, "status", "--json", timeout=60)
    finally:
        _set_soft_nofile(pid, 1024)
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr.strip()}"
    degraded = json.loads(proc.stdout)["degraded"]
    told = [line for line in degraded if "paused.json" in line]
    assert told, degraded
    for line in told:
        assert NAMES_FD_LIMIT.search(line) and "cannot be read" not in line, line


#: run in a subprocess: every descriptor under a soft limit of 64 taken, then the
#: paused inboxes read from the state folder ``argv[1]`` (the log goes to stdout)
_LOAD_WITHOUT_DESCRIPTORS = (
    """
import os, resource, sys
from pathlib import Path
from nbankd.daemon import pauses
from nbankd.errors import OpenFileLimit
"""
    + TAKE_EVERY_DESCRIPTOR
    + """
try:
    print("paused:", sorted(pauses.load(Path(sys.argv[1]))), flush=True)
except OpenFileLimit as err:  # nothing known: never "nothing paused"
    print("paused inboxes not read:", err, flush=True)
"""
)


def test_paused_json_unread_for_want_of_descriptors_is_logged_as_the_open_file_limit(
    tmp_path: Path,
) -> None:
    """Reading the paused inboxes with no descriptor left logs nbankd's open-file limit,
    never that paused.json "cannot be read" (nor to pause the inboxes again)."""
    (tmp_path / "paused.json").write_text('{"paused": ["/srv/inbox/rig1"]}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_DESCRIPTORS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "paused inboxes not read" in said and NAMES_FD_LIMIT.search(said), said
    assert "cannot read" not in said and "pause the inboxes again" not in said, said


def _alerting(daemon_factory: Any, hook: Hook) -> DaemonHarness:
    """A daemon checking for alerts every 0.3 s whose rejection of one input (a name the
    registry refuses) was told to ``hook``."""
    alerts = {"webhook": {"url": hook.url}, "check_every": "0.3s", "group_wait": "0s"}
    h: DaemonHarness = daemon_factory(
        inbox_options={"settle_seconds": 0.2, "rescan_every": "1h"},
        extra_config={"alerts": alerts},
    )
    h.start()
    h.drop("bad name.wav", b"a name the registry refuses")
    wait_for(
        lambda: any(str(a["path"]).endswith("bad name.wav") for a in hook.alerts()),
        60,
        "the rejection told",
    )
    return h


@contextlib.contextmanager
def _tracing_opens(pid: int, trace: Path) -> Iterator[Callable[[Path], int]]:
    """``strace`` on every thread of ``pid``, writing its failed openat calls to ``trace``;
    yields how many of them so far opened a given path and met EMFILE."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: this test counts the daemon's calls with it")
    argv = [strace, "-f", "-qq", "-s", "4096", "-e", "trace=openat", "-e", "status=failed"]
    tracer = subprocess.Popen([*argv, "-o", str(trace), "-p", str(pid)])

    def refused(path: Path) -> int:
        text = trace.read_text(errors="replace") if trace.exists() else ""
        return sum(f'"{path}"' in line and "EMFILE" in line for line in text.splitlines())

    try:
        yield refused
    finally:
        tracer.terminate()
        tracer.wait(30)


def test_a_rejected_folder_unlisted_for_want_of_descriptors_is_logged_once_by_alerts(
    daemon_factory: Any, hook: Hook
) -> None:
    """The alert check that cannot list a rejected folder for want of descriptors logs
    the open-file limit once, not an "alert check failed" traceback every check_every."""
    h = _alerting(daemon_factory, hook)
    assert h.proc is not None
    pid = h.proc.pid
    log_before = h.log_path.stat().st_size
    _set_soft_nofile(pid, min(5, _lowest_free_fd(pid)))
    try:
        with _tracing_opens(pid, h.root / "strace.out") as refused:
            # the walk to the rejected folder starts at its inbox (scans wait an hour)
            wait_for(lambda: refused(h.inbox) >= 5, 60, "five checks refused the inbox folder")
    finally:
        _set_soft_nofile(pid, 1024)

    def since_the_limit() -> str:
        with open(h.log_path, "rb") as f:
            f.seek(log_before)
            return f.read().decode(errors="replace")

    # the log writer's thread may write the line well after the check that logged it
    telling = ("rejected inputs not listed", "alert check failed", "Traceback")
    wait_for(lambda: any(t in since_the_limit() for t in telling), 60, "the checks logged")
    said = since_the_limit()
    assert "alert check failed" not in said and "Traceback" not in said, said[-2000:]
    told = [line for line in said.splitlines() if "rejected inputs not listed" in line]
    assert len(told) == 1 and NAMES_FD_LIMIT.search(told[0]), told


# -- threads (a unit's TasksMax, RLIMIT_NPROC) -------------------------------------------


def test_worker_pool_unable_to_grow_keeps_the_daemon_running(
    daemon_factory: Any, pids_cgroup: PidsCgroup
) -> None:
    """With no thread to be had when a burst of large inputs needs more deposit workers,
    the daemon keeps running (the inputs wait) and deposits them all once threads
    return, instead of exiting on RuntimeError: can't start new thread."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.2})
    h.start()
    assert h.proc is not None
    h.drop("warm.wav", os.urandom(6_000_000))  # large: a worker of the pool deposits it
    h.wait_settled(1)
    pids_cgroup.hold(h.proc.pid)
    pids_cgroup.limit(pids_cgroup.current())
    inputs = {f"burst{i}.wav": os.urandom(6_000_000) for i in range(3)}
    for name, data in inputs.items():
        h.drop(name, data)
    wait_for(
        lambda: h.proc.poll() is not None or pids_cgroup.refused() >= 3 or len(h.receipts()) == 4,
        30,
        "thread creations refused, or the burst deposited",
    )
    pids_cgroup.limit("max")
    wait_for(
        lambda: h.proc.poll() is not None or len(h.receipts()) == 4,
        60,
        "the burst deposited once threads returned",
    )
    assert h.proc.poll() is None, (
        f"nbankd exited ({h.proc.returncode}): " + h.log_path.read_text(errors="replace")[-600:]
    )
    h.wait_settled(4)
    files = h.archive_files()
    for name, data in inputs.items():
        assert files[name].read_bytes() == data


def test_reload_signal_without_a_thread_to_spare_keeps_the_daemon_running(
    daemon_factory: Any, pids_cgroup: PidsCgroup
) -> None:
    """SIGHUP (systemctl reload) when no thread can be started is refused or retried,
    and the daemon goes on running and depositing."""
    h = _started(daemon_factory)
    assert h.proc is not None
    pids_cgroup.hold(h.proc.pid)
    pids_cgroup.limit(pids_cgroup.current())
    h.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: h.proc.poll() is not None or pids_cgroup.refused() >= 1,
        30,
        "the reload's thread to be refused",
    )
    pids_cgroup.limit("max")
    data = os.urandom(3000)
    h.drop("after.wav", data)
    wait_for(
        lambda: h.proc.poll() is not None or len(h.receipts()) == 2,
        30,
        "the daemon to deposit after the reload",
    )
    assert h.proc.poll() is None, (
        f"nbankd exited ({h.proc.returncode}) on SIGHUP: "
        + h.log_path.read_text(errors="replace")[-400:]
    )
    assert h.archive_files()["after.wav"].read_bytes() == data


def test_status_without_a_thread_to_spare_answers_instead_of_closing_the_connection(
    daemon_factory: Any, pids_cgroup: PidsCgroup
) -> None:
    """With no thread to serve a control connection, nbankctl status gets an answer
    naming the thread limit, not a closed connection read as "daemon unreachable"."""
    h = _started(daemon_factory)
    assert h.proc is not None
    pids_cgroup.hold(h.proc.pid)
    pids_cgroup.limit(pids_cgroup.current())
    try:
        proc = nbankctl(h, "status", timeout=60)
    finally:
        pids_cgroup.limit("max")
    said = proc.stdout + proc.stderr
    assert "closed the connection" not in said, said
    assert re.search(r"thread|tasks|process(es)? limit|TasksMax", said, re.I), said
    assert nbankctl(h, "status", timeout=60).returncode == 0


def test_started_with_too_few_descriptors_nbankd_exits_naming_the_limit_never_wedges(
    daemon_factory: Any,
) -> None:
    """Started under open-file limits from too low to just enough, nbankd either becomes
    ready with a control socket that answers, or exits non-zero naming the open-file
    limit; it never tells to move the inbox's work folder away (it holds the inputs in
    flight), never dies on a traceback, and never runs on without its control server."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 0.2})
    h.write_config()
    h.start()  # the inbox, its work folder and the state directory made once
    h.stop()
    problems: list[str] = []
    for nofile in range(12, 40, 2):
        h.wrap_argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
        log_before = h.log_path.stat().st_size
        try:
            h.start(timeout=60)
        except AssertionError:
            assert h.proc is not None
            if h.proc.poll() is None:  # no READY=1, still running
                h.kill9()
                problems.append(f"{nofile}: runs without becoming ready")
                continue
            with open(h.log_path, "rb") as f:
                f.seek(log_before)
                said = f.read().decode(errors="replace")
            if "Traceback" in said:
                problems.append(f"{nofile}: exits on a traceback: {said.strip()[-160:]}")
            elif "move it away" in said or not NAMES_FD_LIMIT.search(said):
                problems.append(f"{nofile}: exits {h.proc.returncode}: {said.strip()[-240:]}")
            h.wait_exit()
            continue
        status = nbankctl(h, "status", timeout=30)
        h.stop()
        if status.returncode not in (0, 1):
            problems.append(f"{nofile}: ready, but status exits {status.returncode}")
            continue
        break  # enough descriptors to run: the higher limits are the ordinary case
    assert not problems, "\n".join(problems)
