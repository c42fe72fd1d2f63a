"""Gaps in how the daemon reads and writes its state_dir, and names its own limits.

Noted by an earlier session and closed here:

- ``paused.json`` that cannot be opened for want of a file descriptor (EMFILE) was
  read as "nothing paused": a reload bringing a paused inbox back resumed it, and a
  pause of another inbox dropped the record of one a reload had left out. The daemon
  keeps the pauses it last read or wrote instead, and logs the open-file limit;
- ``nbankctl pause`` failing for want of descriptors blamed state_dir (and advised
  to check its owner); a webhook send blamed the webhook ("unreachable"); a failure to
  keep alerts.json said only "Too many open files". Each names nbankd's open-file
  limit now;
- ``state_dir/registry-moves.jsonl`` was read with ``read_text``: a FIFO put there
  hung ``history`` (and ``registry switch``), and a link was followed. It is read as
  a bounded regular file, never through a link, and anything else is told in a
  sentence.

The daemon is the real ``nbankd``; EMFILE comes either from its real open-file limit
lowered from outside (``prlimit``), from a subprocess that takes every descriptor, or,
where one file must fail and every other open succeed, from ``strace``'s fault
injection on that one path (``-P PATH -e inject=openat:error=EMFILE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.daemon import DaemonHarness, nbankctl, raw_request, wait_for
from fixtures.processes import TAKE_EVERY_DESCRIPTOR
from fixtures.webhooks import Hook

#: what a message naming the process's open-file limit (and how to raise it) looks like
NAMES_FD_LIMIT = re.compile(r"LimitNOFILE|RLIMIT_NOFILE|open-file limit", re.I)


def _request(h: DaemonHarness, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    line = json.dumps({"v": 1, "cmd": cmd, "args": args or {}}).encode() + b"\n"
    return raw_request(h.socket_path, line)


def _two_inboxes(daemon_factory: Any) -> tuple[DaemonHarness, dict[str, Any], list[Any]]:
    """A started daemon with two inboxes; its configuration and both inbox entries."""
    h: DaemonHarness = daemon_factory()
    h.write_config()
    cfg = yaml.safe_load(h.config_path.read_text())
    both = [cfg["inboxes"][0], {**cfg["inboxes"][0], "path": str(h.root / "inbox2")}]
    cfg["inboxes"] = both
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.start()
    return h, cfg, both


def _reload(h: DaemonHarness, cfg: dict[str, Any], inboxes: list[Any]) -> None:
    cfg["inboxes"] = inboxes
    h.config_path.write_text(yaml.safe_dump(cfg))
    reply = _request(h, "reload")
    assert reply["ok"] and reply["result"]["done"] is True, reply


@contextlib.contextmanager
def _emfile_on(pid: int, path: Path, trace: Path) -> Iterator[None]:
    """Every ``openat`` of ``path`` by any thread of ``pid`` fails with EMFILE (strace's
    fault injection) until the block ends; entered once the first one has failed
    (status reads paused.json: it is asked until then)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: this test injects EMFILE with it")
    argv = [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=openat"]
    argv += ["-e", "inject=openat:error=EMFILE", "-P", str(path), "-p", str(pid)]
    tracer = subprocess.Popen(argv)
    try:
        yield
    finally:
        tracer.terminate()
        tracer.wait(30)


def _injected(h: DaemonHarness, trace: Path) -> bool:
    _request(h, "status")  # reads paused.json (its problem line)
    return trace.exists() and "INJECTED" in trace.read_text(errors="replace")


def _paused(h: DaemonHarness) -> dict[str, bool]:
    return {e["path"]: e["paused"] for e in _request(h, "status")["result"]["inboxes"]}


# -- paused.json under EMFILE ------------------------------------------------------------


def test_an_inbox_put_back_while_paused_json_cannot_be_opened_comes_back_paused(
    daemon_factory: Any,
) -> None:
    """A paused inbox left out by one reload and put back by another while paused.json
    cannot be opened (EMFILE) comes back paused, the open-file limit logged."""
    h, cfg, both = _two_inboxes(daemon_factory)
    assert h.proc is not None
    assert _request(h, "pause", {"inbox": str(h.inbox)})["ok"]
    _reload(h, cfg, [both[1]])
    trace = h.root / "strace.out"
    with _emfile_on(h.proc.pid, h.state_dir / "paused.json", trace):
        wait_for(lambda: _injected(h, trace), 60, "an open of paused.json to meet EMFILE")
        _reload(h, cfg, both)
        paused = _paused(h)
    assert paused == {str(h.inbox): True, str(both[1]["path"]): False}, paused
    log = wait_for(
        lambda: next(
            (
                line
                for line in h.log_path.read_text(errors="replace").splitlines()
                if "paused inboxes not read" in line
            ),
            None,
        ),
        30,
        "the log to tell paused.json unread",
    )
    assert NAMES_FD_LIMIT.search(log), log


def test_a_pause_made_while_paused_json_cannot_be_opened_keeps_a_left_out_inbox_paused(
    daemon_factory: Any,
) -> None:
    """Pausing another inbox while paused.json cannot be opened (EMFILE) keeps the
    record of a paused inbox a reload left out: it still comes back paused."""
    h, cfg, both = _two_inboxes(daemon_factory)
    assert h.proc is not None
    assert _request(h, "pause", {"inbox": str(h.inbox)})["ok"]
    _reload(h, cfg, [both[1]])
    trace = h.root / "strace.out"
    with _emfile_on(h.proc.pid, h.state_dir / "paused.json", trace):
        wait_for(lambda: _injected(h, trace), 60, "an open of paused.json to meet EMFILE")
        reply = _request(h, "pause", {"inbox": str(both[1]["path"])})
    if not reply["ok"]:  # refused: it must say why in terms of the limit
        assert NAMES_FD_LIMIT.search(reply["error"]["message"]), reply
    on_disk = json.loads((h.state_dir / "paused.json").read_text())["paused"]
    assert str(h.inbox) in on_disk, on_disk
    _reload(h, cfg, both)
    assert _paused(h)[str(h.inbox)] is True


#: run in a subprocess: every descriptor under a soft limit of 64 taken, then the
#: paused inboxes read from the state folder ``argv[1]``
_LOAD_WITHOUT_DESCRIPTORS = (
    """
import os, resource, sys
from pathlib import Path
from nbankd.daemon import pauses
from nbankd.errors import NbankdError
"""
    + TAKE_EVERY_DESCRIPTOR
    + """
try:
    print("paused:", sorted(pauses.load(Path(sys.argv[1]))), flush=True)
except NbankdError as err:
    print("refused:", err, flush=True)
"""
)


def test_paused_json_unread_for_want_of_descriptors_is_never_nothing_paused(
    tmp_path: Path,
) -> None:
    """Reading paused.json with no descriptor left is an error naming the open-file
    limit, never an answer that nothing is paused."""
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
    assert "paused: []" not in proc.stdout, proc.stdout
    assert proc.stdout.startswith("refused:") and NAMES_FD_LIMIT.search(proc.stdout), proc.stdout


# -- wording under EMFILE ----------------------------------------------------------------


def _lowest_free_fd(pid: int) -> int:
    fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(fds) + 1) if n not in fds)


def _set_soft_nofile(pid: int, soft: int) -> None:
    """Sets the daemon's soft RLIMIT_NOFILE (the hard limit kept, so it can be raised)."""
    out = subprocess.run(
        ["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings", "-o", "HARD"],
        capture_output=True,
        text=True,
        check=True,
    )
    subprocess.run(
        ["prlimit", f"--pid={pid}", f"--nofile={soft}:{out.stdout.split()[0]}"], check=True
    )


def test_nbankctl_pause_without_descriptors_names_the_open_file_limit_not_state_dir(
    daemon_factory: Any,
) -> None:
    """nbankctl pause failing for want of descriptors names nbankd's open-file limit,
    never state_dir's permissions; the inbox is not paused."""
    h: DaemonHarness = daemon_factory()
    h.start()
    assert h.proc is not None
    pid = h.proc.pid
    _set_soft_nofile(pid, min(5, _lowest_free_fd(pid)))
    try:
        proc = nbankctl(h, "pause", str(h.inbox), timeout=60)
    finally:
        _set_soft_nofile(pid, 1024)
    assert proc.returncode != 0, proc.stdout
    said = proc.stderr + proc.stdout
    assert NAMES_FD_LIMIT.search(said), said
    assert "check that the daemon's user can write" not in said, said
    assert _paused(h) == {str(h.inbox): False}


#: run in a subprocess: every descriptor taken, then one alert sent to the webhook
#: ``argv[1]``; prints what the send raised
_SEND_WITHOUT_DESCRIPTORS = (
    """
import os, resource, sys
from nbankd.config.model import WebhookConfig
from nbankd.control.alert_rules import Message, Tracked
from nbankd.control.alerts import send_webhook
problem = Tracked(first_seen=0.0, summary="inbox silent", command="nbankctl status", key="k")
message = Message(problems=(problem,), resolved=())
"""
    + TAKE_EVERY_DESCRIPTOR
    + """
try:
    send_webhook(WebhookConfig(url=sys.argv[1]), message, "lab-host")
except Exception as err:
    print("failed:", err, flush=True)
else:
    print("sent", flush=True)
"""
)


def test_a_webhook_send_without_descriptors_names_the_open_file_limit_not_the_webhook(
    hook: Hook,
) -> None:
    """A webhook send failing for want of a descriptor names nbankd's open-file limit,
    never the webhook as unreachable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _SEND_WITHOUT_DESCRIPTORS, hook.url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("failed:"), proc.stdout
    assert NAMES_FD_LIMIT.search(proc.stdout) and "unreachable" not in proc.stdout, proc.stdout


#: run in a subprocess: every descriptor taken, then what alerts told kept in the
#: state folder ``argv[1]``; prints how a failure is told
_KEEP_WITHOUT_DESCRIPTORS = (
    """
import os, resource, sys
from pathlib import Path
from nbankd.control import alert_memory
"""
    + TAKE_EVERY_DESCRIPTOR
    + """
try:
    alert_memory.save(Path(sys.argv[1]), {})
except OSError as err:
    print("failed:", alert_memory.unsaved(Path(sys.argv[1]), err), flush=True)
else:
    print("kept", flush=True)
"""
)


def test_alerts_json_unwritten_for_want_of_descriptors_names_the_open_file_limit(
    tmp_path: Path,
) -> None:
    """Keeping what alerts told (alerts.json) failing for want of a descriptor is told
    as nbankd's open-file limit, not as a bare "Too many open files" on state_dir."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _KEEP_WITHOUT_DESCRIPTORS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("failed:"), proc.stdout
    assert NAMES_FD_LIMIT.search(proc.stdout), proc.stdout


# -- registry-moves.jsonl ----------------------------------------------------------------


def test_history_with_a_fifo_for_registry_moves_answers_with_a_sentence(
    daemon_factory: Any,
) -> None:
    """nbankctl history with a FIFO put at state_dir/registry-moves.jsonl answers at
    once, naming the file and what it is, never waits on the FIFO for ever."""
    h: DaemonHarness = daemon_factory()
    h.start()
    os.mkfifo(h.state_dir / "registry-moves.jsonl", 0o640)
    try:
        proc = nbankctl(h, "history", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("nbankctl history waits on the FIFO at registry-moves.jsonl")
    said = proc.stderr + proc.stdout
    assert proc.returncode == 1, said
    assert "registry-moves.jsonl" in said and "FIFO" in said, said


#: run in a subprocess: the registry switch's look for an interrupted switch
#: (moves.moved_to) in the state folder ``argv[1]``; prints what it found or said
_MOVED_TO = """
import sys
from pathlib import Path
from nbankd.deposit import moves
from nbankd.errors import NbankdError
try:
    print("found:", moves.moved_to(Path(sys.argv[1]), "https://new.example/api/"), flush=True)
except NbankdError as err:
    print("refused:", err, flush=True)
"""


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_registry_switch_never_reads_registry_moves_through_a_fifo_or_a_link(
    tmp_path: Path, kind: str
) -> None:
    """The registry switch's reading of registry-moves.jsonl neither waits on a FIFO
    nor follows a link put there: it says what is there instead."""
    state = tmp_path / "state"
    state.mkdir()
    path = state / "registry-moves.jsonl"
    if kind == "fifo":
        os.mkfifo(path, 0o640)
    else:
        real = tmp_path / "elsewhere.jsonl"
        move = {"from": "https://old.example/api/", "to": "https://new.example/api/"}
        real.write_text(json.dumps({**move, "time": "t", "export": None}) + "\n")
        path.symlink_to(real)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _MOVED_TO, str(state)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading registry-moves.jsonl waits on the {kind} there")
    assert proc.returncode == 0, proc.stderr
    noun = "FIFO" if kind == "fifo" else "symbolic link"
    assert proc.stdout.startswith("refused:") and noun in proc.stdout, proc.stdout
    assert "registry-moves.jsonl" in proc.stdout, proc.stdout


_READ_IN_A_CHILD = """
import json, sys
from pathlib import Path
from nbankd.control import alert_memory
from nbankd.daemon import pauses
state = Path(sys.argv[1])
print(json.dumps({
    "alerts": alert_memory.load(state, ["mail"]),
    "switch": pauses.unfinished_switch(state),
}))
"""


def test_a_fifo_for_alerts_json_or_the_switch_record_never_blocks_their_readers(
    tmp_path: Path,
) -> None:
    """A FIFO at state_dir/alerts.json or state_dir/migration/paused.json is refused
    at once (nothing remembered; an unreadable switch record told), never opened."""
    state = tmp_path / "state"
    (state / "migration").mkdir(parents=True)
    os.mkfifo(state / "alerts.json")
    os.mkfifo(state / "migration" / "paused.json")
    done = subprocess.run(
        [sys.executable, "-c", _READ_IN_A_CHILD, str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout.splitlines()[-1])
    assert read["alerts"] == {}
    assert read["switch"]["inboxes"] == [] and "FIFO" in read["switch"]["problem"], read
