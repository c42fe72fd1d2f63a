"""Denial of service on the control socket (hostile round E), against a real daemon.

A user who can reach the socket holds connections open and trickles bytes into
them; a stranger floods it; a request nests JSON 10,000 deep; the daemon is
stopped with SIGSTOP. In each case an admin's ``nbankctl status`` still gets its
answer (or, for the stopped daemon, exit 3 within the short default timeout).
Each holder runs as its own process and user and says "ready" once its
connections are open, so the admin's command runs while they are held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.daemon import DaemonHarness
from fixtures.users import TestUser
from nbankd.control.server import ADMIN_RESERVED, MAX_CONNECTIONS, READ_TIMEOUT
from reliability import figures

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))
HOLDERS = 40

# Opens N connections, sends one byte on each, collects what the daemon answered at
# once (within a second), prints that as one JSON line, then trickles a byte a
# second into every connection still open until its stdin closes.
HOLD = r"""
import json, select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.send(b"{")
    except OSError:
        pass
    conns.append(s)
answers, deadline = [], time.monotonic() + 1.0
while conns and time.monotonic() < deadline:
    ready, _, _ = select.select(conns, [], [], max(0.0, deadline - time.monotonic()))
    for s in ready:
        answers.append(s.recv(4096).decode())
        conns.remove(s)
        s.close()
print(json.dumps({"held": len(conns), "answers": answers}), flush=True)
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if ready:
        break
    for s in conns:
        try:
            s.send(b" ")
        except OSError:
            pass
"""


@pytest.fixture(scope="module")
def lab(lab_group: str) -> Iterator[DaemonHarness]:
    """A root daemon whose readers are the lab group, its socket in a folder users reach."""
    root = Path(tempfile.mkdtemp(prefix="nbankd-dos-", dir="/tmp"))
    root.chmod(0o755)
    h = DaemonHarness(root=root, extra_config={"control": {"readers": [lab_group]}})
    h.start()
    h.socket_path.chmod(0o666)  # reachable by anyone: peer credentials must decide
    yield h
    if h.proc is not None and h.proc.poll() is None:
        h.stop()
    shutil.rmtree(root, ignore_errors=True)


def _hold(user: TestUser, h: DaemonHarness, n: int) -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen(
        user.argv([sys.executable, "-c", HOLD, str(h.socket_path), str(n)]),
        env=user.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the holder died before it was ready"
    return proc, json.loads(line)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def _admin_status(h: DaemonHarness, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    return subprocess.run(
        [NBANKCTL, "status", "--json", "--socket", str(h.socket_path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_readers_holding_every_slot_leave_the_admin_one(
    lab: DaemonHarness, unpriv_user: TestUser
) -> None:
    """A reader holding 40 trickling connections gets the shared slots and ``busy``
    beyond them; an admin's status is answered from the slots kept for admins."""
    holder, seen = _hold(unpriv_user, lab, HOLDERS)
    try:
        status = _admin_status(lab)
    finally:
        _release(holder)
    busy = sum("busy" in a for a in seen["answers"])
    figures.record(
        "control_dos",
        "reader_holds_slots",
        {"held": seen["held"], "busy": busy, "admin_status_exit": status.returncode},
    )
    assert seen["held"] == MAX_CONNECTIONS - ADMIN_RESERVED
    assert busy == HOLDERS - seen["held"]
    assert status.returncode in (0, 1), status.stderr
    assert json.loads(status.stdout)["pid"] == lab.proc.pid  # type: ignore[union-attr]


def test_stranger_is_refused_at_accept_and_holds_no_slot(
    lab: DaemonHarness, other_user: TestUser
) -> None:
    """Every connection of a user neither reader nor admin is answered ``denied`` at
    once, before it sends a request; none is held, and an admin's status is answered."""
    holder, seen = _hold(other_user, lab, HOLDERS)
    try:
        status = _admin_status(lab)
    finally:
        _release(holder)
    figures.record(
        "control_dos",
        "stranger_floods",
        {"held": seen["held"], "denied": len(seen["answers"]), "admin_status_exit": 0},
    )
    assert seen["held"] == 0
    assert len(seen["answers"]) == HOLDERS
    assert all('"denied"' in a and "may not use the control socket" in a for a in seen["answers"])
    assert status.returncode in (0, 1), status.stderr


def test_trickled_request_is_cut_at_the_whole_request_deadline(lab: DaemonHarness) -> None:
    """A request trickled a byte a second is answered ``bad-request`` while bytes still
    arrive: the deadline is for the whole request, not for each read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(lab.socket_path))
        s.settimeout(1.0)
        reply = b""
        sent = 0
        while not reply and sent < 3 * READ_TIMEOUT:
            try:
                s.send(b" ")
                sent += 1
            except OSError:
                pass
            try:
                reply = s.recv(4096)
            except TimeoutError:
                continue
    answer = json.loads(reply)
    assert answer["error"]["code"] == "bad-request"
    assert f"no complete request within {READ_TIMEOUT:g} s" in answer["error"]["message"]


def test_deeply_nested_request_is_a_bad_request(lab: DaemonHarness) -> None:
    """A request nesting JSON 10,000 deep gets an answer: ``bad-request``."""
    request = b'{"v": 1, "cmd": "status", "args": {"x": ' + b"[" * 10_000 + b"]" * 10_000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(lab.socket_path))
        s.settimeout(30)
        s.sendall(request + b"}}\n")
        reply = s.recv(65536)
    answer = json.loads(reply)
    assert answer["error"]["code"] == "bad-request"
    assert "nested too deeply" in answer["error"]["message"]


def test_status_of_a_stopped_daemon_exits_3_within_the_default_timeout(
    daemon_factory: object,
) -> None:
    """Against a daemon stopped with SIGSTOP, ``nbankctl status`` gives up after its
    short default timeout with exit 3, naming the wait; ``--timeout`` changes it."""
    h: DaemonHarness = daemon_factory()  # type: ignore[operator]
    h.start()
    assert h.proc is not None
    h.proc.send_signal(signal.SIGSTOP)
    try:
        default = _admin_status(h)
        short = _admin_status(h, "--timeout", "1")
    finally:
        h.proc.send_signal(signal.SIGCONT)
    assert default.returncode == 3
    assert "did not answer 'status' within 10 s" in default.stderr
    assert short.returncode == 3
    assert "did not answer 'status' within 1 s" in short.stderr
    h.stop()
